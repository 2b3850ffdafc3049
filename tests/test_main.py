"""The command line end to end: outputs of a short run, and one-line errors for bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time


from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
from PIL import Image
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*flags, timeout=300, env=None):
  """Runs `python -m experiments.main FLAGS` in a fresh process; returns the CompletedProcess."""
  environ = {**os.environ, 'PYTHONPATH': REPO, **(env or {})}
  return subprocess.run([sys.executable, '-m', 'experiments.main', *flags], cwd=REPO,
                        env=environ, capture_output=True, text=True, timeout=timeout)


# experiments.main on several flag lists, one after another in one fresh process: absl's
# app.run parses the flags again on each call (unparsed first, so nothing carries over from
# the case before), and each call's exit code, stdout and stderr (absl logging's included)
# are captured. It saves a process start (imports, data loading) per case: for checks of
# what a run prints and returns, not of process-wide things (signals, the unraisable hook).
_MAIN_CASES = r"""
import contextlib, io, json, sys, traceback
from absl import app
from absl import logging
from experiments import main
logging.use_absl_handler()
results, real_stdout = [], sys.stdout
for flags in json.load(sys.stdin):
  main.FLAGS.unparse_flags()
  out, err = (io.TextIOWrapper(io.BytesIO(), write_through=True) for _ in range(2))
  logging.get_absl_handler().python_handler.setStream(err)
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      app.run(main.main, argv=['experiments.main', *flags], flags_parser=main._parse_flags)
      code = 0
    except SystemExit as e:
      code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    except BaseException:  # What Python would print before exiting with 1.
      traceback.print_exc()
      code = 1
  results.append(dict(returncode=code, stdout=out.buffer.getvalue().decode(),
                      stderr=err.buffer.getvalue().decode()))
print(json.dumps(results), file=real_stdout)
"""


def run_main_cases(cases, timeout=300, env=None) -> list:
  """`experiments.main` on each flag list of `cases` in one fresh process (see _MAIN_CASES).

  Returns a CompletedProcess per case (args, returncode, stdout, stderr), as run_main does.
  """
  environ = {**os.environ, 'PYTHONPATH': REPO, **(env or {})}
  proc = subprocess.run([sys.executable, '-c', _MAIN_CASES], cwd=REPO, env=environ,
                        input=json.dumps([list(flags) for flags in cases]),
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-3000:]
  results = json.loads(proc.stdout.splitlines()[-1])
  return [subprocess.CompletedProcess(list(flags), **result)
          for flags, result in zip(cases, results)]


def _stderr_lines(proc):
  return [l for l in proc.stderr.splitlines() if l.strip()]


def _stderr_only_line(proc) -> str:
  """The one line a user error prints on stderr (asserts there is exactly one)."""
  lines = _stderr_lines(proc)
  assert len(lines) == 1, proc.stderr
  return lines[0]


def _test_sums_from_checkpoint(workdir):
  """The run's last checkpoint on the whole test set: (step, correct [K], loss [K], examples).

  One batch of exactly the test set, so nothing is padded: unlike the run's own
  evaluation (batches of batch_size, the last one padded and masked), this count
  does not go through the mask, and a run that counted its padding disagrees.
  """
  import bwbpf_jax as bw  # pylint: disable=g-import-not-at-top
  from bwbpf_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from bwbpf_jax import data  # pylint: disable=g-import-not-at-top
  from experiments import config as config_lib  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, 'config.json')) as f:
    config = config_lib.config_from_json(f.read())
  dataset = data.load_dataset(config.dataset, config.data_dir, image_size=config.image_size)
  model = bw.build_model(config.arch, num_classes=dataset.num_classes,
                         num_blocks=config.num_blocks, mode=config.mode, width=config.width)
  tx = bw.make_optimizer(config.optimizer, learning_rate=config.lr, total_steps=1,
                         momentum=config.momentum, weight_decay=config.weight_decay)
  manager = checkpoint.make_manager(os.path.join(workdir, 'checkpoints'))
  step = checkpoint.steps(manager)[-1]
  states, _ = checkpoint.restore(manager, step,
                                 bw.abstract_block_states(model, tx, dataset.image_shape))
  manager.close()
  mean, std = data.normalization_stats(dataset.train_images)
  num_test = len(dataset.test_labels)
  (batch,) = data.eval_batches(dataset.test_images, dataset.test_labels, batch_size=num_test,
                               mean=mean, std=std)
  assert batch['mask'].all()
  sums = bw.make_eval_step(model)(states, batch)
  return step, np.asarray(sums['correct']), np.asarray(sums['loss']), float(sums['count'])


def _recipe(config, *more) -> tuple:
  """The optimiser, schedule and head settings a literature preset must copy, in order."""
  return tuple(getattr(config, name) for name in (
      'lr', 'batch_size', 'epochs', 'nesterov', 'momentum', 'weight_decay', 'warmup_epochs',
      'aux_head', 'local_loss') + more)

@pytest.mark.slow
class EndToEndTest(absltest.TestCase):

  def test_short_digits_run_writes_every_output(self):
    workdir = self.create_tempdir().full_path
    proc = run_main('--dataset=digits', '--arch=resnet18', '--width=0.125', '--num_blocks=2',
                    '--max_steps=3', '--batch_size=32', '--augment=crop_flip', '--remat',
                    f'--workdir={workdir}')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn('test accuracy', proc.stdout)
    results = json.load(open(os.path.join(workdir, 'results.json')))
    for key in ('config', 'test_accuracy', 'block_test_accuracy', 'num_devices',
                'num_processes', 'parallel', 'images_per_sec', 'wall_time_s'):
      self.assertIn(key, results)
    self.assertLen(results['block_test_accuracy'], 2)
    # The reported accuracies and losses are the final states' on the test set: the same
    # examples right and the same mean loss, head by head, as recomputed here from the last
    # checkpoint without padding. The run's last test batch is 8 examples and 24 padded
    # rows, each with a non-zero loss: counted, they would change every head's loss.
    step, correct, loss, count = _test_sums_from_checkpoint(workdir)
    self.assertEqual(step, 3)
    np.testing.assert_array_equal(np.round(np.array(results['block_test_accuracy']) * count),
                                  correct)
    self.assertEqual(round(results['test_accuracy'] * count), correct[-1])
    np.testing.assert_allclose(results['block_test_loss'], loss / count, rtol=1e-5)
    self.assertEqual(results['steps'], 3)
    self.assertEqual(results['config']['arch'], 'resnet18')
    self.assertEqual(results['config']['augment'], 'crop_flip')
    self.assertTrue(results['config']['remat'])
    self.assertGreater(results['images_per_sec'], 0)
    records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
    self.assertEqual([r['split'] for r in records], ['train', 'test'])
    self.assertLen(records[0]['loss'], 2)
    for key in ('learning_rate', 'images_per_sec', 'elapsed_s'):
      self.assertIn(key, records[0])
    self.assertTrue(os.listdir(os.path.join(workdir, 'tensorboard')))
    with Image.open(os.path.join(workdir, 'block_curves.png')) as plot:
      self.assertGreater(plot.size[0], 500)


  def test_no_augmentation_activation_split_and_auglocal_depth(self):
    import bwbpf_jax as bw  # pylint: disable=g-import-not-at-top
    from bwbpf_jax import data  # pylint: disable=g-import-not-at-top
    workdir = self.create_tempdir().full_path
    proc = run_main('--dataset=digits', '--arch=vgg11', '--width=0.125', '--num_blocks=3',
                    '--max_steps=1', '--batch_size=32', '--noaugment', '--split_by=activations',
                    '--aux_head=auglocal', '--auglocal_depth=3', f'--workdir={workdir}')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn('augmentation none', proc.stdout)
    results = json.load(open(os.path.join(workdir, 'results.json')))
    self.assertEqual(results['config']['augment'], 'none')
    shape = data.load_dataset('digits').image_shape
    points = bw.activation_balanced_split_points('vgg11', 3, shape, batch_size=32, width=0.125)
    self.assertEqual(results['split_points'], list(points))
    self.assertNotEqual(points, bw.build_model('vgg11', num_classes=10,
                                               num_blocks=3).split_points)
    fraction = lambda depth: bw.aux_flop_fractions(bw.build_model(
        'vgg11', num_classes=10, split_points=points, aux_head='auglocal', width=0.125,
        auglocal_depth=depth), shape)['total']
    self.assertAlmostEqual(results['aux_flop_fraction'], fraction(3), places=6)
    self.assertNotAlmostEqual(results['aux_flop_fraction'], fraction(2), places=3)

  def test_reconstruction_loss_run_reports_the_heads_cost(self):
    workdir = self.create_tempdir().full_path
    proc = run_main('--dataset=digits', '--arch=resnet20', '--width=0.25', '--num_blocks=3',
                    '--aux_head=infopro', '--local_loss=xent_recon', '--loss_weights=2,1,0,1',
                    '--max_steps=2', '--batch_size=32', '--optimizer=adamw',
                    f'--workdir={workdir}')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn('auxiliary heads infopro with loss xent_recon:', proc.stdout)
    self.assertIn("adamw learning rate 0.001 (adamw's default), ", proc.stdout)
    results = json.load(open(os.path.join(workdir, 'results.json')))
    self.assertLen(results['aux_flop_fraction_per_head'], 2)
    self.assertAlmostEqual(results['aux_flop_fraction'],
                           sum(results['aux_flop_fraction_per_head']))
    self.assertGreater(results['aux_flop_fraction'], 0.01)
    self.assertEqual(results['config']['loss_weights'], [2.0, 1.0, 0.0, 1.0])
    self.assertTrue(np.all(np.isfinite(results['block_test_loss'])))


# (name, flags, what the one line on stderr says): mistakes a user can make on the command line.
FLAG_ERRORS = (
    ('unknown_arch', ['--arch=alexnet'], 'alexnet'),
    ('unknown_dataset', ['--dataset=mnist'], 'mnist'),
    ('unknown_mode', ['--mode=forward_forward'], 'forward_forward'),
    ('unknown_head', ['--aux_head=hebbian'], 'hebbian'),
    ('unknown_loss', ['--local_loss=hinge'], 'hinge'),
    ('bad_loss_weights', ['--local_loss=xent_recon', '--loss_weights=1,2'],
     'loss weights must be 4'),
    ('unknown_preset', ['--preset=paper_mnist'], 'unknown preset'),
    ('preset_near_miss', ['--preset=paper_cifar10_resnet50_k3'],
     "unknown preset 'paper_cifar10_resnet50_k3'; did you mean paper_cifar10_resnet50_k8 or "
     'paper_cifar10_resnet50_k4 or paper_cifar10_resnet50_k16? --list_presets lists all'),
    ('split_points_against_num_blocks', ['--split_points=2,4', '--num_blocks=4'],
     '--split_points=2,4 makes 3 blocks but --num_blocks=4; give one of the two'),
    ('loss_weights_without_reconstruction', ['--loss_weights=1,1,0,1'],
     '--loss_weights weighs the reconstruction losses; it needs --local_loss=xent_recon'),
    ('auglocal_depth_without_auglocal', ['--auglocal_depth=3'], 'needs --aux_head=auglocal'),
    ('microbatches_without_pipeline', ['--microbatches=2'], 'needs --parallel=blocks'),
    ('stop_at_step_past_max_steps', ['--stop_at_step=5'],
     '--stop_at_step=5 does not stop a run of --max_steps=1 steps early'),
    ('too_many_blocks', ['--arch=resnet18', '--num_blocks=9'], 'cannot cut 8 units'),
    ('bad_split_points', ['--split_points=3,1'], 'strictly increasing'),
    ('negative_width', ['--width=-1'], '--width must be positive'),
    ('stray_argument', ['train'], 'unexpected arguments'),
    ('blockwise_with_bp', ['--mode=bp', '--train_step=blockwise'], 'needs --mode=bwbpf'),
    ('split_by_and_points', ['--split_by=activations', '--split_points=2'],
     'drop --split_by=activations'),
    ('bad_auglocal_depth', ['--aux_head=auglocal', '--auglocal_depth=0'],
     'auglocal_depth must be at least 1'),
    ('bad_integer', ['--num_blocks=two'], 'flag --num_blocks=two'),
    ('bad_custom_arch', ['--arch=mypkg.nets:'], 'or give package.module:function'),
    # Flags the run would ignore.
    ('momentum_for_adamw', ['--optimizer=adamw', '--momentum=0.5'],
     '--momentum is a setting of --optimizer=sgd; --optimizer=adamw does not use it'),
    ('nesterov_without_momentum', ['--nesterov', '--momentum=0'], '--nesterov needs momentum'),
    ('epochs_with_max_steps', ['--epochs=3'],
     '--max_steps=1 trains that many steps instead of --epochs=3; give one of the two'),
    ('data_parallel_on_one_device', ['--parallel=data'],
     '--parallel=data shards each batch over several devices, but JAX sees one'),
    ('train_step_with_pipeline', ['--parallel=blocks', '--train_step=fused'],
     'the stage pipeline of --parallel=blocks has its own'),
    ('data_dir_for_digits', ['--data_dir=/tmp'], '--data_dir is not used by --dataset=digits'),
    ('stem_for_vgg', ['--arch=vgg13', '--stem=cifar'], '--arch=vgg13 has none'),
    ('head_without_auxiliary_blocks', ['--num_blocks=1', '--aux_head=mlp'],
     '--num_blocks=1 has none'),
)
# One of each kind in the fast tier: a flag absl refuses, flags that contradict each
# other, a stray argument, a preset near miss, a model that cannot be built (last: the one
# BadInputTest also runs in a process of its own).
FAST_FLAG_ERRORS = ('unknown_arch', 'split_points_against_num_blocks', 'stray_argument',
                    'preset_near_miss', 'too_many_blocks')


def assert_flag_error(test, proc, expected):
  """`proc` (a CompletedProcess) failed as a user's mistake should: exit 2, one line."""
  test.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
  test.assertNotIn('Traceback', proc.stderr)
  test.assertLen(_stderr_lines(proc), 1, proc.stderr)
  test.assertIn(expected, _stderr_lines(proc)[0])


def check_flag_errors(test, cases, env=None):
  """Runs each (flags, expected) of `cases` in one process, asserts each a flag error.

  Returns the runs (CompletedProcess).
  """
  procs = run_main_cases(
      [(*flags, '--max_steps=1', f'--workdir={test.create_tempdir().full_path}')
       for flags, _ in cases], env=env)
  for (flags, expected), proc in zip(cases, procs):
    with test.subTest(flags=flags):
      assert_flag_error(test, proc, expected)
  return procs


@pytest.mark.slow
class MoreFlagErrorsTest(parameterized.TestCase):
  """FLAG_ERRORS beyond the fast tier's, in one process (run_main_cases)."""

  def test_flag_errors_are_one_line_and_exit_2(self):
    check_flag_errors(self, [(flags, expected) for name, flags, expected in FLAG_ERRORS
                             if name not in FAST_FLAG_ERRORS])


def _image_folder(root, classes, broken=None):
  """A train/test image folder of 4 small PNGs a class (and `broken`, not an image, in train)."""
  for split in ('train', 'test'):
    for label in classes:
      os.makedirs(os.path.join(root, split, label))
      for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(
            os.path.join(root, split, label, f'{i}.png'))
  if broken:
    with open(os.path.join(root, 'train', broken), 'wb') as f:
      f.write(b'not a png')
  return root


class BadInputTest(parameterized.TestCase):

  def test_flag_errors_are_one_line_and_exit_2(self):
    fast = sorted((c for c in FLAG_ERRORS if c[0] in FAST_FLAG_ERRORS),
                  key=lambda c: FAST_FLAG_ERRORS.index(c[0]))
    procs = check_flag_errors(self, [(flags, expected) for _, flags, expected in fast])
    # The last one the same in a process of its own: what the cases before it set in the
    # shared process leaked into none of them, and exit code and stderr are the process's.
    alone = run_main(*procs[-1].args)
    self.assertEqual((procs[-1].returncode, procs[-1].stderr), (alone.returncode, alone.stderr))

  def test_bad_data_is_one_line_naming_it(self):
    one_class = _image_folder(self.create_tempdir().full_path, ['cat'])
    broken = _image_folder(self.create_tempdir().full_path, ['cat', 'dog'],
                           broken=os.path.join('dog', 'broken.png'))
    workdirs = [os.path.join(self.create_tempdir().full_path, 'run') for _ in range(3)]
    procs = run_main_cases(
        [('--dataset=imagefolder', f'--data_dir={root}', '--max_steps=1', f'--workdir={workdir}')
         for root, workdir in zip(('/nonexistent/cifar', one_class, broken), workdirs)],
        env={'BWBPF_CACHE_DIR': self.create_tempdir().full_path})
    expected = ('/nonexistent/cifar',
                f'error: {one_class}/train has one class folder (cat); a classifier needs at '
                f'least two: add a folder of images for each class.',
                'broken.png')
    for proc, line, workdir in zip(procs, expected, workdirs):
      self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
      self.assertNotIn('Traceback', proc.stderr)
      self.assertIn(line, _stderr_only_line(proc))
      self.assertFalse(os.path.exists(workdir))
    self.assertEqual(_stderr_only_line(procs[1]), expected[1])


class WorkdirTest(absltest.TestCase):
  """A user's first runs: a failed start, a rerun, a second run on the same workdir."""

  @pytest.mark.slow
  def test_one_run_per_workdir_failed_start_rerun_progress_and_max_steps(self):
    workdir = os.path.join(self.create_tempdir().full_path, 'runs', 'digits')
    # A failed start (the data is missing) leaves nothing behind, not even the workdir.
    proc = run_main('--dataset=imagefolder', f'--workdir={workdir}')
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertIn('needs --data_dir=FOLDER', _stderr_only_line(proc))
    self.assertFalse(os.path.exists(os.path.dirname(workdir)))

    # The fixed rerun in the same workdir, stdout to a file as in a cluster job.
    log_path = os.path.join(self.create_tempdir().full_path, 'log')
    with open(log_path, 'w') as log:
      first = subprocess.Popen(
          [sys.executable, '-m', 'experiments.main', '--dataset=digits', '--arch=vgg11',
           '--width=0.125', '--num_blocks=2', '--batch_size=32', '--max_steps=50',
           '--progress_seconds=0.2', f'--workdir={workdir}'],
          cwd=REPO, env={**os.environ, 'PYTHONPATH': REPO}, stdout=log,
          stderr=subprocess.PIPE, text=True)
    try:
      lock_path = os.path.join(workdir, '.lock')
      holder = f'pid {first.pid}'
      deadline = time.monotonic() + 240
      while not (os.path.exists(lock_path) and holder in open(lock_path).read()):
        self.assertIsNone(first.poll(), 'the first run ended before taking the lock')
        self.assertLess(time.monotonic(), deadline)
        time.sleep(0.05)
      # Frozen while it holds the lock: the second run meets it there, whatever the timing.
      first.send_signal(signal.SIGSTOP)
      before = sorted(os.listdir(workdir))
      second = run_main('--dataset=digits', '--arch=vgg11', '--width=0.125', '--num_blocks=2',
                        '--batch_size=32', '--max_steps=50', f'--workdir={workdir}')
      self.assertEqual(sorted(os.listdir(workdir)), before)  # It wrote nothing.
    finally:
      first.send_signal(signal.SIGCONT)
    self.assertEqual(second.returncode, 2, second.stderr[-2000:])
    self.assertRegex(_stderr_only_line(second),
                     rf'^error: workdir {re.escape(workdir)} is in use by another run \(host '
                     rf'\S+, pid {first.pid}\); wait for it to end, or use another --workdir$')
    _, stderr = first.communicate(timeout=300)
    self.assertEqual(first.returncode, 0, stderr[-3000:])

    with open(log_path) as f:
      log_lines = f.read().splitlines()
    self.assertTrue(any(re.fullmatch(r'progress: step \d+/50 \(epoch \d\.\d\d\), .*elapsed.*',
                                     line) for line in log_lines), log_lines)
    self.assertTrue(any('test accuracy' in line for line in log_lines))
    results = json.load(open(os.path.join(workdir, 'results.json')))
    self.assertEqual(results['steps'], 50)
    self.assertEqual(results['config']['augment'], 'crop')  # The digits default: no flips.
    records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
    self.assertEqual([(r['split'], r['step']) for r in records],
                     [('train', 44), ('test', 44), ('train', 50), ('test', 50)])  # No doubles.
    # --max_steps is a whole run: the schedule has decayed to (almost) nothing by its end.
    self.assertLess(records[-2]['learning_rate'], 0.01 * 0.05)
    self.assertGreater(records[0]['learning_rate'], 0.01 * 0.05)

  @pytest.mark.slow
  def test_template_workdir_of_a_seed_sweep(self):
    runs = self.create_tempdir().full_path
    template = os.path.join(runs, '{dataset}_{arch}_k{num_blocks}_s{seed}')
    for seed in (0, 1):
      proc = run_main('--width=0.125', '--num_blocks=2', '--batch_size=32', '--max_steps=1',
                      f'--seed={seed}', f'--workdir={template}')
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertEqual(sorted(os.listdir(runs)), ['digits_vgg11_k2_s0', 'digits_vgg11_k2_s1'])
    for seed in (0, 1):
      results = json.load(open(os.path.join(runs, f'digits_vgg11_k2_s{seed}', 'results.json')))
      self.assertEqual(results['config']['seed'], seed)
    proc = run_main('--max_steps=1', f'--workdir={runs}/{{sed}}')
    self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
    self.assertEqual(_stderr_only_line(proc),
                     f'error: --workdir={runs}/{{sed}} names {{sed}}, which is not a config '
                     f'field; did you mean {{seed}}? any flag of the data, model, training or '
                     f'parallel groups of --help can be named')

  @pytest.mark.slow
  def test_cifar10_without_network_fails_fast_with_one_line(self):
    workdir = os.path.join(self.create_tempdir().full_path, 'run')
    # A proxy that refuses every connection: no network, on any machine.
    offline = {'HTTPS_PROXY': 'http://127.0.0.1:9', 'HTTP_PROXY': 'http://127.0.0.1:9',
               'https_proxy': 'http://127.0.0.1:9', 'http_proxy': 'http://127.0.0.1:9',
               'NO_PROXY': '', 'no_proxy': ''}
    proc = run_main('--dataset=cifar10', f'--data_dir={self.create_tempdir().full_path}',
                    f'--workdir={workdir}', timeout=120, env=offline)
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertNotIn('Traceback', proc.stderr)
    line = _stderr_only_line(proc)
    self.assertRegex(line, r'^error: Dataset cifar10 is not prepared under .* could not be '
                           r'downloaded \(ConnectionError: www\.cs\.toronto\.edu is unreachable')
    self.assertNotIn('No module named', line)
    self.assertFalse(os.path.exists(workdir))


class ExitCodeTest(parameterized.TestCase):
  """The documented exit codes (experiments/main.py, README.md), where a user meets them."""

  def test_help_and_list_presets_exit_0(self):
    from experiments import config as config_lib  # pylint: disable=g-import-not-at-top
    *procs, listed = run_main_cases([['--help'], ['-h'], ['--helpfull'], ['--list_presets']])
    for proc in procs:
      self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
      self.assertIn('--num_blocks', proc.stdout)
      self.assertEqual(proc.stderr, '')
    self.assertEqual(listed.returncode, 0, listed.stderr[-2000:])
    self.assertEqual([line.split(':')[0] for line in listed.stdout.splitlines()],
                     list(config_lib.PRESETS))
    self.assertIn('paper_cifar10_resnet101_k8: dataset=cifar10, arch=resnet101, num_blocks=8',
                  listed.stdout)
    for name in config_lib.PRESETS:  # --helpfull names them too.
      self.assertIn(name, procs[2].stdout)
    stdout = procs[0].stdout
    headings = [line for line in stdout.splitlines() if re.fullmatch(r'[a-z]+:', line)]
    self.assertEqual(headings, ['presets:', 'data:', 'model:', 'training:', 'parallel:',
                                'output:'])
    model = stdout.split('\nmodel:\n')[1].split('\ntraining:\n')[0]
    self.assertIn('--num_blocks: K, blocks the network is cut into', model)
    self.assertIn('--arch: Architecture: vgg11', model)
    self.assertIn('package.module:function', model)

  @pytest.mark.slow
  def test_run_piped_into_head_stops_with_a_checkpoint(self):
    workdir = os.path.join(self.create_tempdir().full_path, 'run')
    command = (f'{sys.executable} -m experiments.main --width=0.125 --num_blocks=2 '
               f'--batch_size=64 --max_steps=30 --workdir={workdir} | head -1; '
               f'exit "${{PIPESTATUS[0]}}"')
    proc = subprocess.run(['bash', '-c', command], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, 'PYTHONPATH': REPO}, timeout=300)
    self.assertEqual(proc.returncode, 141, proc.stderr[-3000:])
    self.assertLen(proc.stdout.splitlines(), 1)
    self.assertRegex(_stderr_only_line(proc),
                     r'^stopped by SIGPIPE \(the output pipe closed\) at step \d+ of 30; '
                     rf'checkpoint in {re.escape(workdir)}/checkpoints/\d+; rerun the same '
                     r'command to resume$')
    self.assertTrue(os.listdir(os.path.join(workdir, 'checkpoints')))


# Run in a process of its own: experiments.main defines its flags on absl's global FLAGS,
# which other test modules' flags would collide with. For every Config field: the flag
# exists, parses a good value into the field's type, and refuses a bad one (a wrong type,
# a value outside the choices) with exit code 2 and one line naming the flag.
_GENERATED_FLAGS_CHECK = r"""
import contextlib, dataclasses, io, json, sys, typing
from experiments import config as config_lib
from experiments import main
good = {'split_points': '2,4', 'loss_weights': '1,1,0,1', 'stem': 'cifar', 'lr': '0.01',
        'max_steps': '5', 'stop_at_step': '3', 'pipeline_stages': '2', 'image_size': '16',
        'data_dir': '/tmp/data'}
report = {}
for field in dataclasses.fields(config_lib.Config):
  name, flag = field.name, main.FLAGS[field.name]
  # An unset optional number takes a small count (a new Optional[int] setting needs no entry).
  value = good.get(name, '3' if field.default is None else str(field.default).lower())
  main.FLAGS.unparse_flags()
  main._parse_flags(['main', f'--{name}={value}'])
  parsed = main.FLAGS[name].value
  choices = field.metadata['choices']
  kind = typing.get_type_hints(config_lib.Config)[name]
  bad = ('not_a_choice' if choices else {int: '1.5', float: 'abc', bool: 'maybe'}.get(
      typing.get_args(kind)[0] if typing.get_args(kind) and typing.get_origin(kind) is not tuple
      else kind, 'x,y'))
  stderr = io.StringIO()
  main.FLAGS.unparse_flags()
  code = None
  if kind not in (str, typing.Optional[str]) or choices:
    with contextlib.redirect_stderr(stderr):
      try:
        main._parse_flags(['main', f'--{name}={bad}'])
      except SystemExit as e:
        code = e.code
  report[name] = dict(parsed=repr(parsed), group=field.metadata['group'], bad_exit=code,
                      bad_stderr=stderr.getvalue(), help=flag.help)
print(json.dumps(report))
"""


class GeneratedFlagsTest(absltest.TestCase):

  def test_every_config_field_is_a_flag_that_refuses_bad_values(self):
    from experiments import config as config_lib  # pylint: disable=g-import-not-at-top
    proc = subprocess.run([sys.executable, '-c', _GENERATED_FLAGS_CHECK], cwd=REPO,
                          env={**os.environ, 'PYTHONPATH': REPO}, capture_output=True,
                          text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    report = json.loads(proc.stdout.splitlines()[-1])
    self.assertEqual(list(report), list(config_lib.FIELD_NAMES))
    self.assertEqual(report['split_points']['parsed'], '(2, 4)')
    self.assertEqual(report['loss_weights']['parsed'], '(1.0, 1.0, 0.0, 1.0)')
    self.assertEqual(report['lr']['parsed'], '0.01')
    self.assertEqual(report['nesterov']['parsed'], 'False')
    self.assertEqual(report['augment']['parsed'], "'crop_flip'")
    self.assertIn('(default: 200; 12 for digits)', ' '.join(report['epochs']['help'].split()))
    free_text = ('arch', 'data_dir')  # Strings: --arch is checked with the config.
    for name, checked in report.items():
      if name in free_text:
        continue
      self.assertEqual(checked['bad_exit'], 2, name)
      lines = checked['bad_stderr'].splitlines()
      self.assertLen(lines, 1, name)
      self.assertRegex(lines[0], rf'^error: flag --{name}=', name)


class ConfigTest(absltest.TestCase):

  def test_augmentation_defaults_per_dataset_and_old_configs(self):
    from experiments import config as config_lib  # pylint: disable=g-import-not-at-top
    self.assertEqual(config_lib.make_config({}).augment, 'crop')  # Digits: no mirror images.
    self.assertEqual(config_lib.make_config({'dataset': 'cifar10'}).augment, 'crop_flip')
    self.assertEqual(config_lib.make_config({'augment': 'none'}).augment, 'none')
    with self.assertRaisesRegex(Exception, 'augment must be one of crop_flip, crop, none'):
      config_lib.make_config({'augment': 'flip'})
    for stored, expected in ((True, 'crop_flip'), (False, 'none')):
      old = json.dumps({**config_lib.make_config({}).to_dict(), 'augment': stored})
      self.assertEqual(config_lib.config_from_json(old).augment, expected)

  def test_flags_the_run_would_ignore_are_refused(self):
    from experiments import config as config_lib  # pylint: disable=g-import-not-at-top
    for overrides, message in (
        ({'optimizer': 'adamw', 'momentum': 0.5}, '--momentum is a setting of --optimizer=sgd'),
        ({'optimizer': 'adamw', 'nesterov': False}, '--nesterov is a setting of'),
        ({'nesterov': True, 'momentum': 0.0}, '--nesterov needs momentum'),
        ({'epochs': 3, 'max_steps': 5}, '--max_steps=5 trains that many steps instead of '
                                        '--epochs=3; give one of the two'),
        ({'parallel': 'blocks', 'train_step': 'blockwise'}, 'has its own'),
        ({'data_dir': '/data'}, '--data_dir is not used by --dataset=digits'),
        ({'arch': 'vgg16', 'stem': 'imagenet'}, '--arch=vgg16 has none'),
        ({'num_blocks': 1, 'local_loss': 'supcon'}, '--local_loss sets the auxiliary blocks'),
        ({'split_points': (), 'aux_head': 'dgl'}, '--aux_head sets the auxiliary blocks')):
      with self.assertRaisesRegex(config_lib.UsageError, re.escape(message)):
        config_lib.make_config(overrides)
    # What they contradict is fine alone, and given by a preset they are not flags.
    config_lib.make_config({'optimizer': 'adamw'})
    config_lib.make_config({'max_steps': 5})
    config_lib.make_config({'arch': 'resnet18', 'stem': 'imagenet'})
    config_lib.make_config({'dataset': 'cifar10', 'data_dir': '/data'})
    self.assertEqual(config_lib.make_config({'optimizer': 'adamw'},
                                            'infopro_cifar10_resnet32_k4').nesterov, False)

  def test_each_optimizer_has_its_own_default_learning_rate(self):
    from bwbpf_jax import optimizers  # pylint: disable=g-import-not-at-top
    from experiments import config as config_lib  # pylint: disable=g-import-not-at-top
    self.assertEqual(optimizers.DEFAULT_LEARNING_RATES, {'sgd': 0.1, 'adamw': 1e-3})
    self.assertEqual(config_lib.Config().lr, None)
    lr = lambda overrides, preset=None: config_lib.make_config(overrides, preset).lr
    self.assertEqual(lr({'dataset': 'cifar10'}), 0.1)
    self.assertEqual(lr({'dataset': 'cifar10', 'optimizer': 'adamw'}), 1e-3)
    self.assertEqual(lr({}), 0.05)  # digits' SGD rate ...
    self.assertEqual(lr({'optimizer': 'adamw'}), 1e-3)  # ... is not AdamW's.
    self.assertEqual(lr({'optimizer': 'adamw', 'lr': 3e-4}), 3e-4)
    self.assertEqual(lr({}, 'infopro_cifar10_resnet32_k4'), 0.8)  # Presets set theirs.
    self.assertEqual(lr({'optimizer': 'adamw'}, 'infopro_cifar10_resnet32_k4'), 1e-3)
    self.assertEqual(lr({'lr': None}), 0.05)  # None: unset, as in Config.
    # A config stored before per-optimizer rates still resumes: the same rate is chosen.
    stored = json.loads(config_lib.make_config({'dataset': 'cifar10'}).to_json())
    self.assertEqual(config_lib.config_from_json(json.dumps(stored)).lr, 0.1)

  def test_library_arguments_become_flags_at_the_command_line(self):
    from experiments import config as config_lib  # pylint: disable=g-import-not-at-top
    as_flags = config_lib.as_flags
    self.assertEqual(as_flags('num_stages=4 needs 4 devices; use num_stages=2 (or 1)'),
                     '--pipeline_stages=4 needs 4 devices; use --pipeline_stages=2 (or 1)')
    self.assertEqual(as_flags('global_batch_size=30 and num_microbatches=4, (batch_norm=x)'),
                     '--batch_size=30 and --microbatches=4, (--pipeline_batch_norm=x)')
    self.assertEqual(as_flags('Dataset imagefolder needs data_dir=FOLDER.'),
                     'Dataset imagefolder needs --data_dir=FOLDER.')
    for unchanged in ('workdir runs/lr=0.1 is in use', 'run `tfds build --data_dir=DIR`',
                      'total_steps=0 is not a config field', '--width=-1 already a flag',
                      'xseed=3'):
      self.assertEqual(as_flags(unchanged), unchanged)

  def test_split_points_decide_the_number_of_blocks(self):
    from experiments import config as config_lib  # pylint: disable=g-import-not-at-top
    self.assertEqual(config_lib.make_config({'split_points': (2, 4)}).num_blocks, 3)
    self.assertEqual(config_lib.make_config({'split_points': (2, 4), 'num_blocks': 3})
                     .num_blocks, 3)
    with self.assertRaisesRegex(Exception, 'makes 3 blocks but --num_blocks=4'):
      config_lib.make_config({'split_points': (2, 4), 'num_blocks': 4})
    with self.assertRaisesRegex(Exception, 'makes 14 blocks but --num_blocks=4'):
      config_lib.make_config({'num_blocks': 4}, 'auglocal_cifar10_resnet32')

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
        _recipe(config, 'loss_weights'),
        (0.8, 1024, 160, True, 0.9, 1e-4, 10, 'infopro', 'supcon_recon', (6.0, 0.0, 1.0, 2.0)))
    # InfoPro's ResNet-32 K=4 ends blocks after layers (1, 2), (2, 1), (3, 0): 4 modules each.
    model = bw.build_model('resnet32', num_classes=10, split_points=config.split_points)
    self.assertEqual(bw.partition.block_unit_counts(model), (4, 4, 4, 4))
    self.assertEqual(config_lib.make_config({}, 'infopro_cifar10_resnet110_k4').split_points,
                     (13, 27, 41))
    self.assertEqual(config_lib.infopro_split_points([(0, 0), (3, 16)], 18), (1, 54))

  def test_auglocal_presets_follow_its_recipe(self):
    import bwbpf_jax as bw  # pylint: disable=g-import-not-at-top
    from experiments import config as config_lib  # pylint: disable=g-import-not-at-top
    config = config_lib.make_config({}, 'auglocal_cifar10_resnet32')
    self.assertEqual(_recipe(config, 'auglocal_depth'),
                     (0.8, 1024, 400, True, 0.9, 1e-4, 10, 'auglocal', 'xent', 2))
    # `--local_module_num 16 --aux_net_depth 2`: 13 one-layer modules with heads (the stem,
    # then 12 residual units), the last 3 units with the output layer.
    model = bw.build_model('resnet32', num_classes=10, split_points=config.split_points,
                           aux_head=config.aux_head, auglocal_depth=config.auglocal_depth)
    self.assertEqual(bw.partition.block_unit_counts(model), (1,) * 13 + (3,))
    # Pyramidal depth: 2 falling towards 1.5 (Python rounds 1.5 to 2), as AugLocal's list.
    self.assertEqual([len(b.head.units) for b in model.blocks[:-1]], [2] * 13)
    config = config_lib.make_config({}, 'auglocal_cifar10_resnet110')
    model = bw.build_model('resnet110', num_classes=10, split_points=config.split_points,
                           aux_head=config.aux_head, auglocal_depth=config.auglocal_depth)
    self.assertEqual(bw.partition.block_unit_counts(model), (1,) * 51 + (4,))
    self.assertEqual([len(b.head.units) for b in model.blocks[:-1]],
                     [max(1, round(3 * (1 - k * 0.5 / 50) + k * 0.5 / 50)) for k in range(51)])
    self.assertEqual([len(b.head.units) for b in model.blocks[:-1]][::25], [3, 2, 2])


if __name__ == '__main__':
  absltest.main()
