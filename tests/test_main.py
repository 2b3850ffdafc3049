"""The command line end to end: outputs of a short run, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*flags, timeout=300, env=None):
  """Runs `python -m experiments.main FLAGS` in a fresh process; returns the CompletedProcess."""
  environ = {**os.environ, 'PYTHONPATH': REPO, **(env or {})}
  return subprocess.run([sys.executable, '-m', 'experiments.main', *flags], cwd=REPO,
                        env=environ, capture_output=True, text=True, timeout=timeout)


def _stderr_last_line(proc):
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  return lines[-1] if lines else ''


class EndToEndTest(absltest.TestCase):

  def test_short_digits_run_writes_every_output(self):
    workdir = self.create_tempdir().full_path
    proc = run_main('--dataset=digits', '--arch=resnet18', '--width=0.125', '--num_blocks=2',
                    '--max_steps=3', '--batch_size=32', '--remat', f'--workdir={workdir}')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn('test accuracy', proc.stdout)
    results = json.load(open(os.path.join(workdir, 'results.json')))
    for key in ('config', 'test_accuracy', 'block_test_accuracy', 'num_devices',
                'num_processes', 'parallel', 'images_per_sec', 'wall_time_s'):
      self.assertIn(key, results)
    self.assertLen(results['block_test_accuracy'], 2)
    self.assertEqual(results['test_accuracy'], results['block_test_accuracy'][-1])
    self.assertEqual(results['steps'], 3)
    self.assertEqual(results['config']['arch'], 'resnet18')
    self.assertTrue(results['config']['remat'])
    self.assertGreater(results['images_per_sec'], 0)
    records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
    self.assertEqual([r['split'] for r in records], ['train', 'test'])
    self.assertLen(records[0]['loss'], 2)
    self.assertTrue(os.listdir(os.path.join(workdir, 'tensorboard')))
    with Image.open(os.path.join(workdir, 'block_curves.png')) as plot:
      self.assertGreater(plot.size[0], 500)


class BadInputTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('unknown_arch', ['--arch=alexnet'], 'alexnet'),
      ('unknown_dataset', ['--dataset=mnist'], 'mnist'),
      ('unknown_mode', ['--mode=forward_forward'], 'forward_forward'),
      ('unknown_head', ['--aux_head=transformer'], 'transformer'),
      ('unknown_preset', ['--preset=paper_mnist'], 'unknown preset'),
      ('too_many_blocks', ['--arch=resnet18', '--num_blocks=9'], 'cannot cut 8 units'),
      ('bad_split_points', ['--split_points=3,1'], 'strictly increasing'),
      ('negative_width', ['--width=-1'], '--width must be positive'),
      ('stray_argument', ['train'], 'unexpected arguments'),
      ('blockwise_with_bp', ['--mode=bp', '--train_step=blockwise'], 'needs --mode=bwbpf'),
  )
  def test_flag_errors_are_one_line_and_exit_2(self, flags, expected):
    proc = run_main(*flags, '--max_steps=1', f'--workdir={self.create_tempdir().full_path}')
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertNotIn('Traceback', proc.stderr)
    self.assertIn(expected, _stderr_last_line(proc))

  def test_missing_data_folder(self):
    proc = run_main('--dataset=imagefolder', '--data_dir=/nonexistent/cifar', '--max_steps=1',
                    f'--workdir={self.create_tempdir().full_path}')
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertNotIn('Traceback', proc.stderr)
    self.assertIn('/nonexistent/cifar', _stderr_last_line(proc))

  def test_unreadable_image_is_named(self):
    root = self.create_tempdir().full_path
    for split in ('train', 'test'):
      for label in ('cat', 'dog'):
        os.makedirs(os.path.join(root, split, label))
        for i in range(4):
          Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(
              os.path.join(root, split, label, f'{i}.png'))
    with open(os.path.join(root, 'train', 'dog', 'broken.png'), 'wb') as f:
      f.write(b'not a png')
    proc = run_main('--dataset=imagefolder', f'--data_dir={root}', '--max_steps=1',
                    f'--workdir={self.create_tempdir().full_path}',
                    env={'BWBPF_CACHE_DIR': self.create_tempdir().full_path})
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertNotIn('Traceback', proc.stderr)
    self.assertIn('broken.png', _stderr_last_line(proc))


class ConfigTest(absltest.TestCase):

  def test_precedence_flag_over_preset_over_dataset_default(self):
    from experiments import config as config_lib  # pylint: disable=g-import-not-at-top
    self.assertEqual(config_lib.make_config({}).arch, 'vgg11')  # digits default
    preset = config_lib.make_config({}, 'paper_cifar10_resnet101_k8')
    self.assertEqual((preset.dataset, preset.arch, preset.num_blocks, preset.width),
                     ('cifar10', 'resnet101', 8, 1.0))
    overridden = config_lib.make_config({'num_blocks': 4}, 'paper_cifar10_resnet101_k8')
    self.assertEqual(overridden.num_blocks, 4)
    self.assertEqual(config_lib.make_config({'dataset': 'tiny_imagenet'}).stem, 'imagenet')
    round_trip = config_lib.config_from_json(overridden.to_json())
    self.assertEqual(round_trip, overridden)

  def test_every_paper_preset_builds(self):
    import bwbpf_jax as bw  # pylint: disable=g-import-not-at-top
    from experiments import config as config_lib  # pylint: disable=g-import-not-at-top
    for name in config_lib.PRESETS:
      config = config_lib.make_config({}, name)
      model = bw.build_model(config.arch, num_classes=10, num_blocks=config.num_blocks,
                             mode=config.mode)
      self.assertEqual(model.num_blocks, config.num_blocks, name)


if __name__ == '__main__':
  absltest.main()
