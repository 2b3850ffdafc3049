"""The command line on several devices and processes: --parallel=data|blocks, multi-process flags.

Each run is a fresh process with its own emulated CPU devices
(--xla_force_host_platform_device_count), so the device count can differ per run.
The library-level equalities (sharded step, stage pipeline) are in test_parallel.py
and test_stage_pipeline.py; here the runs' losses must agree with a one-device run of
the same computation.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
import numpy as np
import pytest

from bwbpf_jax.errors import UsageError
from test_main import REPO, run_main
from test_resume import _Background, _checkpoint_steps
pytestmark = pytest.mark.slow

# 1437 digits for training: 44 steps of 32 or 89 of 16 per epoch. No augmentation and
# no warm-up, so a batch of 32 cut into 2 micro-batches is the same data, at the same
# learning rates, as two batches of 16: --max_steps=N fits the cosine schedule to N
# batches, which the pipeline turns into N x 2 updates (--max_steps=2N at batch 16).
SMALL = ('--dataset=digits', '--arch=vgg11', '--width=0.125', '--num_blocks=2', '--noaugment',
         '--warmup_epochs=0', '--checkpoint_every=0')


def _devices_env(count: int) -> dict:
  return {'XLA_FLAGS': os.environ.get('XLA_FLAGS', '') +
                       f' --xla_force_host_platform_device_count={count}'}


def _results(workdir: str) -> dict:
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def _stderr_lines(proc):
  return [line for line in proc.stderr.splitlines() if line.strip()]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


class ParallelCommandLineTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # A folder of its own: the suites of other checkouts may share the test tmpdir, and a
    # fixed name there was refused (its workdir lock held) while another suite ran it.
    os.makedirs(absltest.get_default_test_tmpdir(), exist_ok=True)
    cls.reference_dir = os.path.join(
        tempfile.mkdtemp(prefix='one_device_', dir=absltest.get_default_test_tmpdir()), 'run')
    proc = run_main(*SMALL, '--batch_size=32', '--max_steps=4', '--parallel=none',
                    f'--workdir={cls.reference_dir}', '--overwrite')
    assert proc.returncode == 0, proc.stderr[-3000:]
    cls.reference = _results(cls.reference_dir)

  def assert_same_training(self, results, reference, rtol=1e-4):
    np.testing.assert_allclose(results['block_train_loss'], reference['block_train_loss'],
                               rtol=rtol)
    np.testing.assert_allclose(results['block_train_accuracy'],
                               reference['block_train_accuracy'], atol=1 / 128 + 1e-6)

  def test_data_parallel_on_4_devices_matches_one_device(self):
    workdir = self.create_tempdir().full_path
    proc = run_main(*SMALL, '--batch_size=32', '--max_steps=4', f'--workdir={workdir}',
                    env=_devices_env(4))  # --parallel=auto: data, as there are 4 devices.
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn('--parallel=data: mesh 4 data over 4 cpu devices (ids 0-3)', proc.stdout)
    results = _results(workdir)
    self.assertEqual((results['parallel'], results['num_devices'], results['num_processes']),
                     ('data', 4, 1))
    self.assert_same_training(results, self.reference)

  def test_block_parallel_matches_blockwise_steps_on_the_microbatches(self):
    workdir = self.create_tempdir().full_path
    proc = run_main(*SMALL, '--batch_size=32', '--max_steps=3', '--parallel=blocks',
                    '--microbatches=2', f'--workdir={workdir}', env=_devices_env(2))
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn('--parallel=blocks: mesh 1 data x 2 stage over 2 cpu devices (ids 0-1)',
                  proc.stdout)
    results = _results(workdir)
    self.assertEqual((results['parallel'], results['num_devices'], results['mesh']),
                     ('blocks', 2, {'data': 1, 'stage': 2}))

    sync_dir = self.create_tempdir().full_path
    proc = run_main(*SMALL, '--batch_size=16', '--max_steps=6', '--parallel=none',
                    '--train_step=blockwise', f'--workdir={sync_dir}')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    # Every micro-batch counted once in the epoch's means, whichever step finished it.
    self.assert_same_training(results, _results(sync_dir))
    np.testing.assert_allclose(results['block_test_accuracy'],
                               _results(sync_dir)['block_test_accuracy'], atol=2 / 360)

  def _run_two_processes(self, *flags, devices_per_process=1):
    """`experiments.main FLAGS` as 2 processes on loopback; returns (results, both stdouts)."""
    workdir = self.create_tempdir().full_path
    port = _free_port()
    environ = {**os.environ, 'PYTHONPATH': REPO, **_devices_env(devices_per_process)}
    procs = [subprocess.Popen(
        [sys.executable, '-m', 'experiments.main', *flags, f'--workdir={workdir}',
         f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}'],
        cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, stderr) in zip(procs, outputs):
      self.assertEqual(proc.returncode, 0, stderr[-3000:])
    return workdir, [stdout for stdout, _ in outputs]

  def test_two_processes_run_as_one_on_the_global_batch(self):
    workdir, stdouts = self._run_two_processes(*SMALL, '--batch_size=32', '--max_steps=4')
    # Process 0 logs and writes; process 1 trains its half of every batch silently.
    self.assertIn('test accuracy', stdouts[0])
    self.assertNotIn('test accuracy', stdouts[1])
    results = _results(workdir)
    self.assertEqual((results['parallel'], results['num_devices'], results['num_processes']),
                     ('data', 2, 2))
    self.assert_same_training(results, self.reference)
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, 'checkpoints'))), ['4'])

  @pytest.mark.slow
  def test_block_parallel_on_a_2x2_mesh_across_processes_and_killed_and_resumed(self):
    # One run of one process of 4 devices is the reference of both: 2 processes of 2
    # devices (one data row each, both stages in each: each process feeds its half) train
    # as it does, and a run of it killed after a checkpoint resumes to its bits.
    flags = (*SMALL, '--batch_size=32', '--max_steps=6', '--parallel=blocks',
             '--microbatches=2', '--checkpoint_every=2')
    reference = self.create_tempdir().full_path
    proc = run_main(*flags, f'--workdir={reference}', env=_devices_env(4))
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertEqual(_results(reference)['mesh'], {'data': 2, 'stage': 2})

    workdir, _ = self._run_two_processes(*flags, devices_per_process=2)
    results = _results(workdir)
    self.assertEqual((results['mesh'], results['num_devices'], results['num_processes']),
                     ({'data': 2, 'stage': 2}, 4, 2))
    self.assert_same_training(results, _results(reference), rtol=1e-5)

    workdir = self.create_tempdir().full_path
    with mock.patch.dict(os.environ, _devices_env(4)):  # _Background passes os.environ on.
      run = _Background(self.create_tempdir().full_path, *flags, f'--workdir={workdir}')
      run.wait_for(lambda: _checkpoint_steps(workdir), timeout=240)
      run.proc.send_signal(signal.SIGKILL)
      run.output()
    killed_at = _checkpoint_steps(workdir)[-1]
    proc = run_main(*flags, f'--workdir={workdir}', env=_devices_env(4))
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    resumed_at = int(re.search(r'resuming at step (\d+) of 6', proc.stdout).group(1))
    self.assertGreaterEqual(resumed_at, killed_at)
    self.assertEqual(_results(workdir)['params_digest'], _results(reference)['params_digest'])

  def test_block_parallel_images_per_second_means_one_thing_in_every_report(self):
    # Images trained per second of training time: compilation (the drain's included)
    # and evaluation excluded, the drain's ticks included; the progress line, the epoch
    # line and results.json must tell the same figure.
    workdir = self.create_tempdir().full_path
    proc = run_main(*SMALL, '--batch_size=32', '--max_steps=24', '--parallel=blocks',
                    '--microbatches=2', '--progress_seconds=0.5', f'--workdir={workdir}',
                    env=_devices_env(2))
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    progress = [float(x) for x in re.findall(r'progress: step \d+/\d+.*?, ([\d.]+) img/s',
                                             proc.stdout)]
    self.assertNotEmpty(progress, proc.stdout)
    epoch = float(re.findall(r'(\d+) img/s\n', proc.stdout)[-1])
    self.assertAlmostEqual(progress[-1] / epoch, 1.0, delta=0.2, msg=proc.stdout)
    self.assertAlmostEqual(_results(workdir)['images_per_sec'] / epoch, 1.0, delta=0.01)

  def test_block_parallel_refuses_modes_whose_gradients_cross_blocks(self):
    proc = run_main(*SMALL, '--parallel=blocks', '--mode=deep_supervision', '--max_steps=1',
                    f'--workdir={self.create_tempdir().full_path}', env=_devices_env(2))
    self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
    self.assertLen(_stderr_lines(proc), 1, proc.stderr)
    self.assertIn('needs isolated blocks (mode bwbpf)', proc.stderr)

  def test_indivisible_batches_are_one_line_errors(self):
    for flags, count, expected in (
        (('--batch_size=30',), 4, 'cannot be split evenly over 4 devices'),
        (('--batch_size=30', '--parallel=blocks', '--microbatches=4'), 2,
         'equal micro-batches'),
        # The library names num_stages; the command line, the flag (and the values that work).
        (('--parallel=blocks',), 3, '--pipeline_stages=2 needs a multiple of 2 devices (one '
         'stage each, times the data rows), found 3; use --pipeline_stages=1'),
        (('--parallel=blocks', '--num_blocks=4'), 2, '--pipeline_stages=4 needs a multiple of '
         '4 devices (one stage each, times the data rows), found 2; use --pipeline_stages=2 '
         '(or 1), or run on 4 accelerators or processes'),
        (('--num_processes=2', '--process_id=2'), 1, '--process_id must be in [0, 2)')):
      proc = run_main(*SMALL, *flags, '--max_steps=1',
                      f'--workdir={self.create_tempdir().full_path}', env=_devices_env(count))
      self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
      self.assertLen(_stderr_lines(proc), 1, proc.stderr)
      self.assertIn(expected, proc.stderr)


def readme_process_recipe() -> list:
  """The README's multi-process commands: each `taskset ... python -m experiments.main` line."""
  with open(os.path.join(REPO, 'README.md')) as f:
    text = f.read().replace('\\\n', ' ')  # Continuation lines joined.
  return [line.strip().rstrip('&').strip() for line in text.splitlines()
          if line.strip().startswith('taskset ') and '--num_processes=' in line]


class ReadmeRecipeTest(absltest.TestCase):

  def test_readme_multi_process_recipe_runs_as_written(self):
    commands = readme_process_recipe()
    self.assertLen(commands, 2)
    if len(os.sched_getaffinity(0)) < 2 or not shutil.which('taskset'):
      self.skipTest('the recipe pins its processes to cores 0 and 1 with taskset')
    # As written, but on a free port and in a temporary workdir.
    port, runs = _free_port(), self.create_tempdir().full_path
    procs = []
    for command in commands:
      self.assertIn('127.0.0.1:12345', command)
      command = command.replace('127.0.0.1:12345', f'127.0.0.1:{port}').replace(
          '--workdir=runs/', f'--workdir={runs}/').replace(' python ', f' {sys.executable} ')
      procs.append(subprocess.Popen(shlex.split(command), cwd=REPO,
                                    env={**os.environ, 'PYTHONPATH': REPO},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, stderr) in zip(procs, outputs):
      self.assertEqual(proc.returncode, 0, stderr[-3000:])
    (workdir,) = os.listdir(runs)
    results = _results(os.path.join(runs, workdir))
    self.assertEqual((results['parallel'], results['mesh'], results['num_processes'],
                      results['num_blocks'], results['steps']),
                     ('blocks', {'data': 1, 'stage': 2}, 2, 4, 20))
    self.assertIn('test accuracy', outputs[0][0])


class MultiProcessEngineChecksTest(absltest.TestCase):
  """Engine choices that several processes cannot use are refused before any training."""

  def _make_engine(self, **overrides):
    import jax  # pylint: disable=g-import-not-at-top
    from experiments import config as config_lib  # pylint: disable=g-import-not-at-top
    from experiments import engine  # pylint: disable=g-import-not-at-top
    config = config_lib.make_config(overrides)
    with mock.patch.object(jax, 'process_count', return_value=2), \
         mock.patch.object(jax, 'device_count', return_value=8):
      # The refusals come before the model, optimizer or devices are used.
      return engine.make_engine(config, None, None, (32, 32, 3))

  def test_one_device_engine_in_several_processes(self):
    # Each process would train its own model on its share of every batch.
    with self.assertRaisesRegex(UsageError, '--parallel=none trains on one device'):
      self._make_engine(parallel='none')


if __name__ == '__main__':
  absltest.main()
