"""experiments.summarize: seeds pool into one row, placements do not, values are right."""

import csv
import io
import json
import os
import subprocess
import sys

from absl.testing import absltest
import numpy as np
import pytest

from experiments import config as config_lib
from experiments import summarize


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_run(root, name, accuracy, seed, parallel='none', num_devices=1, results=None,
               **config):
  workdir = os.path.join(root, name)
  os.makedirs(workdir)
  if parallel == 'blocks':
    config['parallel'] = parallel
  results = {'config': config_lib.make_config({'seed': seed, **config}).to_dict(),
             'test_accuracy': accuracy, 'block_test_accuracy': [0.5, accuracy],
             'wall_time_s': 10.0 + seed, 'images_per_sec': 100.0, 'parallel': parallel,
             'num_devices': num_devices, **(results or {})}
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f)
  return workdir


def _summarize(*args):
  return subprocess.run([sys.executable, '-m', 'experiments.summarize', *args], cwd=REPO,
                        env={**os.environ, 'PYTHONPATH': REPO}, capture_output=True, text=True,
                        timeout=120)


def _rows(table):
  """Each data row as a list of its cells."""
  return [[cell.strip() for cell in row.strip('|').split('|')]
          for row in table.splitlines()[2:]]


def _column(table, name):
  header = [cell.strip() for cell in table.splitlines()[0].strip('|').split('|')]
  return [row[header.index(name)] for row in _rows(table)]


class SummarizeTest(absltest.TestCase):

  def test_seeds_share_a_row_and_placements_do_not(self):
    root = self.create_tempdir().full_path
    workdirs = [
        _write_run(root, 'a', 0.90, seed=0, num_blocks=2),
        _write_run(root, 'b', 0.80, seed=1, num_blocks=2),
        _write_run(root, 'c', 0.70, seed=0, num_blocks=2, parallel='blocks', num_devices=2,
                   microbatches=4),
        os.path.join(root, 'unfinished')]
    rows = summarize.table(summarize.load(workdirs)).splitlines()[2:]
    self.assertLen(rows, 2)
    none_row, blocks_row = sorted(rows, key=lambda row: 'blocks x2' in row)
    self.assertIn('| 1 device |', none_row)
    self.assertIn('| blocks x2, M=4 |', blocks_row)
    self.assertIn('| 30.00 (30.00) |', blocks_row)
    self.assertIn('| 15.00 (10.00, 20.00) |', none_row)  # error %: mean (per seed)
    self.assertIn('| 50.0 / 85.0 |', none_row)  # every head's accuracy, mean over seeds
    self.assertIn('| 10, 11 |', none_row)  # wall time per seed

  def test_losses_get_rows_of_their_own_with_their_cost(self):
    root = self.create_tempdir().full_path
    workdirs = [_write_run(root, 'a', 0.9, seed=0, aux_head='infopro'),
                _write_run(root, 'b', 0.8, seed=0, aux_head='infopro', local_loss='xent_recon')]
    with open(os.path.join(workdirs[1], 'results.json')) as f:
      results = json.load(f)
    results['aux_flop_fraction'] = 0.0543
    with open(os.path.join(workdirs[1], 'results.json'), 'w') as f:
      json.dump(results, f)
    rows = summarize.table(summarize.load(workdirs)).splitlines()[2:]
    self.assertLen(rows, 2)
    self.assertTrue(any('| infopro, xent_recon (5.4% FLOPs) |' in row for row in rows), rows)

  def test_every_other_setting_separates_rows(self):
    root = self.create_tempdir().full_path
    workdirs = [_write_run(root, 'a', 0.9, seed=0, aux_head='auglocal'),
                _write_run(root, 'b', 0.8, seed=1, aux_head='auglocal', auglocal_depth=3),
                _write_run(root, 'c', 0.7, seed=0, split_by='activations'),
                _write_run(root, 'd', 0.6, seed=0, remat=True)]
    rows = summarize.table(summarize.load(workdirs)).splitlines()[2:]
    self.assertLen(rows, 4)
    self.assertTrue(any('| auglocal depth 3 |' in row for row in rows), rows)
    self.assertTrue(any('| 4 (by activations) |' in row for row in rows), rows)

  def test_no_results_is_exit_2(self):
    self.assertEqual(summarize.main(['summarize', self.create_tempdir().full_path]), 2)

  def test_finds_runs_at_any_depth_once_and_has_help(self):
    root = self.create_tempdir().full_path
    _write_run(root, 'vgg/k2/seed0', 0.9, seed=0, num_blocks=2)
    _write_run(root, 'vgg/k2/seed1', 0.8, seed=1, num_blocks=2)
    _write_run(root, 'other', 0.7, seed=0, num_blocks=4)
    # The parent, a nested folder and a run again: each run counted once.
    proc = _summarize(root, os.path.join(root, 'vgg'), os.path.join(root, 'other'))
    self.assertEqual(proc.returncode, 0, proc.stderr)
    self.assertEqual(sorted(_column(proc.stdout, 'seeds')), ['0', '0, 1'])
    help_proc = _summarize('--help')
    self.assertEqual(help_proc.returncode, 0, help_proc.stderr)
    self.assertIn('any depth', help_proc.stdout)
    empty = _summarize(self.create_tempdir().full_path)
    self.assertEqual(empty.returncode, 2)
    self.assertIn('no results.json at any depth under', empty.stderr)

  def test_repeated_seed_is_not_two_seeds(self):
    root = self.create_tempdir().full_path
    _write_run(root, 'a', 0.9, seed=0, results={'params_digest': 'abc'})
    _write_run(root, 'b', 0.9, seed=0, results={'params_digest': 'abc'})
    self.assertEqual(_column(summarize.table(summarize.load([root])), 'seeds'),
                     ['0 (2 identical runs)'])
    _write_run(root, 'c', 0.8, seed=0, results={'params_digest': 'def'})
    self.assertEqual(_column(summarize.table(summarize.load([root])), 'seeds'),
                     ['0, 0, 0'])

  def test_k_is_what_trained_and_flops_keep_two_digits(self):
    root = self.create_tempdir().full_path
    # A results.json from before --split_points and --num_blocks were checked against each
    # other: the config says 4 blocks, the split points made 3.
    _write_run(root, 'old', 0.9, seed=0, results={'split_points': [2, 4],
                                                  'aux_flop_fraction': 0.00034})
    _write_run(root, 'new', 0.9, seed=0, num_blocks=2,
               results={'split_points': [4], 'num_blocks': 2, 'aux_flop_fraction': 0.00026})
    table = summarize.table(summarize.load([root]))
    self.assertEqual(sorted(_column(table, 'K')), ['2', '3'])
    self.assertEqual(sorted(_column(table, 'head')),
                     ['linear (0.026% FLOPs)', 'linear (0.034% FLOPs)'])
    self.assertEqual([summarize.percent(v) for v in (0, 0.034, 2.44, 32.4, 329.0)],
                     ['0', '0.034', '2.4', '32', '329'])

  def test_runs_on_two_image_folders_never_pool(self):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from bwbpf_jax import data  # pylint: disable=g-import-not-at-top
    from experiments import train  # pylint: disable=g-import-not-at-top
    root = self.create_tempdir().full_path
    runs = os.path.join(root, 'runs')
    for name, classes in (('pets', ('cat', 'dog')), ('shapes', ('circle', 'square', 'star'))):
      folder = os.path.join(root, name)
      for split, count in (('train', 3), ('test', 1)):
        for k, class_name in enumerate(classes):
          os.makedirs(os.path.join(folder, split, class_name))
          for i in range(count):
            Image.new('RGB', (8, 8), (40 * k, 10 * i, 0)).save(
                os.path.join(folder, split, class_name, f'{i}.png'))
      config = {'dataset': 'imagefolder', 'data_dir': folder}
      dataset = data.load_dataset('imagefolder', folder, cache_dir=os.path.join(root, 'cache'))
      identity = train.data_identity(dataset, config_lib.make_config(config))
      # The same flags, and the same seed twice: a pooled row would read '0, 0'.
      _write_run(runs, name, 0.9 if name == 'pets' else 0.5, seed=0,
                 results={'data': identity}, **config)
    table = summarize.table(summarize.load([runs]))
    self.assertEqual(_column(table, 'seeds'), ['0', '0'])
    self.assertEqual(sorted(_column(table, 'data')),
                     ['pets (2 classes, 6 / 2 images)', 'shapes (3 classes, 9 / 3 images)'])
    # Results from before results.json named the data: the folders still keep them apart.
    old = os.path.join(root, 'old')
    for name in ('pets', 'shapes'):
      _write_run(old, name, 0.9, seed=0, dataset='imagefolder',
                 data_dir=os.path.join(root, name))
    self.assertEqual(sorted(_column(summarize.table(summarize.load([old])), 'data')),
                     ['pets', 'shapes'])

  def test_a_setting_that_differs_between_rows_gets_a_column(self):
    root = self.create_tempdir().full_path
    _write_run(root, 'a', 0.9, seed=0, lr=0.05)
    _write_run(root, 'b', 0.8, seed=1, lr=0.05)
    table = summarize.table(summarize.load([root]))
    self.assertNotIn('lr', table.splitlines()[0])  # One row: nothing differs.
    _write_run(root, 'c', 0.7, seed=0, lr=0.2, log_every=5)  # log_every changes nothing.
    table = summarize.table(summarize.load([root]))
    self.assertEqual(_column(table, 'lr'), ['0.05', '0.2'])
    self.assertEqual(_column(table, 'seeds'), ['0, 1', '0'])
    self.assertNotIn('log_every', table.splitlines()[0])

  @pytest.mark.slow
  def test_csv_and_json_for_plotting(self):
    root = self.create_tempdir().full_path
    _write_run(root, 'a', 0.9, seed=0, lr=0.05)
    _write_run(root, 'b', 0.8, seed=1, lr=0.05)
    _write_run(root, 'c', 0.7, seed=0, lr=0.2)
    proc = _summarize('--format=json', root)
    self.assertEqual(proc.returncode, 0, proc.stderr)
    records = json.loads(proc.stdout)
    self.assertEqual([(r['lr'], r['seeds']) for r in records], [(0.05, [0, 1]), (0.2, [0])])
    np.testing.assert_allclose(records[0]['test_error_pct'], [10.0, 20.0])
    self.assertAlmostEqual(records[0]['test_error_pct_mean'], 15.0)
    proc = _summarize('--format=csv', root)
    self.assertEqual(proc.returncode, 0, proc.stderr)
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    self.assertEqual([(r['lr'], r['seeds'], r['K']) for r in rows],
                     [('0.05', '0 1', '4'), ('0.2', '0', '4')])
    self.assertAlmostEqual(float(rows[1]['test_error_pct_mean']), 30.0)
    self.assertEqual(_summarize('--format=xml', root).returncode, 2)

  @pytest.mark.slow  # A training run in a subprocess.
  def test_a_max_steps_run_shows_its_steps_and_k(self):
    root = self.create_tempdir().full_path
    workdir = os.path.join(root, 'sweep', 'k3', 'seed0')
    proc = subprocess.run(
        [sys.executable, '-m', 'experiments.main', '--width=0.125', '--split_points=2,4',
         '--batch_size=64', '--max_steps=3', f'--workdir={workdir}'],
        cwd=REPO, env={**os.environ, 'PYTHONPATH': REPO}, capture_output=True, text=True,
        timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn('data: 10 classes, 1,437 train and 360 test images, 3 steps (--max_steps)',
                  proc.stdout)
    with open(os.path.join(workdir, 'results.json')) as f:
      results = json.load(f)
    self.assertEqual((results['num_blocks'], results['config']['num_blocks']), (3, 3))
    self.assertEqual({key: results['data'][key] for key in ('name', 'data_dir', 'num_classes',
                                                             'train_images', 'test_images')},
                     {'name': 'digits', 'data_dir': None, 'num_classes': 10,
                      'train_images': 1437, 'test_images': 360})
    table = _summarize(root).stdout
    self.assertEqual((_column(table, 'K'), _column(table, 'length'), _column(table, 'seeds')),
                     (['3'], ['3 steps'], ['0']))


if __name__ == '__main__':
  absltest.main()
