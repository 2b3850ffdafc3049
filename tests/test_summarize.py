"""experiments.summarize: seeds pool into one row, placements do not, values are right."""

import json
import os

from absl.testing import absltest

from experiments import config as config_lib
from experiments import summarize


def _write_run(root, name, accuracy, seed, parallel='none', num_devices=1, **config):
  workdir = os.path.join(root, name)
  os.makedirs(workdir)
  results = {'config': config_lib.make_config({'seed': seed, **config}).to_dict(),
             'test_accuracy': accuracy, 'block_test_accuracy': [0.5, accuracy],
             'wall_time_s': 10.0 + seed, 'images_per_sec': 100.0, 'parallel': parallel,
             'num_devices': num_devices}
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f)
  return workdir


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
    blocks_row, none_row = sorted(rows, key=lambda row: 'none' in row)
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


if __name__ == '__main__':
  absltest.main()
