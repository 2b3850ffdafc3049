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
                    '--max_steps=3', '--batch_size=32', f'--workdir={workdir}')
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
    self.assertGreater(results['images_per_sec'], 0)
    records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
    self.assertEqual([r['split'] for r in records], ['train', 'test'])
    self.assertLen(records[0]['loss'], 2)
    self.assertTrue(os.listdir(os.path.join(workdir, 'tensorboard')))
    with Image.open(os.path.join(workdir, 'block_curves.png')) as plot:
      self.assertGreater(plot.size[0], 500)


  def test_reconstruction_loss_run_reports_the_heads_cost(self):
    workdir = self.create_tempdir().full_path
    proc = run_main('--dataset=digits', '--arch=resnet20', '--width=0.25', '--num_blocks=3',
                    '--aux_head=infopro', '--local_loss=xent_recon', '--loss_weights=2,1,0,1',
                    '--max_steps=2', '--batch_size=32', f'--workdir={workdir}')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn('auxiliary heads infopro with loss xent_recon:', proc.stdout)
    results = json.load(open(os.path.join(workdir, 'results.json')))
    self.assertLen(results['aux_flop_fraction_per_head'], 2)
    self.assertAlmostEqual(results['aux_flop_fraction'],
                           sum(results['aux_flop_fraction_per_head']))
    self.assertGreater(results['aux_flop_fraction'], 0.01)
    self.assertEqual(results['config']['loss_weights'], [2.0, 1.0, 0.0, 1.0])
    self.assertTrue(np.all(np.isfinite(results['block_test_loss'])))


class BadInputTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('unknown_arch', ['--arch=alexnet'], 'alexnet'),
      ('unknown_dataset', ['--dataset=mnist'], 'mnist'),
      ('unknown_mode', ['--mode=forward_forward'], 'forward_forward'),
      ('unknown_head', ['--aux_head=transformer'], 'transformer'),
      ('unknown_loss', ['--local_loss=hinge'], 'hinge'),
      ('bad_loss_weights', ['--local_loss=xent_recon', '--loss_weights=1,2'],
       'loss weights must be 4'),
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
                             split_points=config.split_points, mode=config.mode,
                             aux_head=config.aux_head, local_loss=config.local_loss,
                             loss_weights=config.loss_weights)
      self.assertEqual(model.num_blocks, config.num_blocks, name)

  def test_infopro_presets_follow_its_recipe(self):
    import bwbpf_jax as bw  # pylint: disable=g-import-not-at-top
    from experiments import config as config_lib  # pylint: disable=g-import-not-at-top
    config = config_lib.make_config({}, 'infopro_cifar10_resnet32_k4')
    self.assertEqual(
        (config.lr, config.batch_size, config.epochs, config.nesterov, config.momentum,
         config.weight_decay, config.warmup_epochs, config.aux_head, config.local_loss,
         config.loss_weights),
        (0.8, 1024, 160, True, 0.9, 1e-4, 10, 'infopro', 'supcon_recon', (6.0, 0.0, 1.0, 2.0)))
    # InfoPro's ResNet-32 K=4 ends blocks after layers (1, 2), (2, 1), (3, 0): 4 modules each.
    model = bw.build_model('resnet32', num_classes=10, split_points=config.split_points)
    self.assertEqual(bw.partition.block_unit_counts(model), (4, 4, 4, 4))
    self.assertEqual(config_lib.make_config({}, 'infopro_cifar10_resnet110_k4').split_points,
                     (13, 27, 41))
    self.assertEqual(config_lib.infopro_split_points([(0, 0), (3, 16)], 18), (1, 54))


if __name__ == '__main__':
  absltest.main()
