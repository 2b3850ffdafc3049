"""Checkpoints from the command line: kill and resume exactly, corrupt checkpoints, NaNs, signals.

Every test runs `python -m experiments.main` in real subprocesses on digits with
a small model; the uninterrupted run they compare with is made once.
"""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
import pytest

import test_main
import test_writers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every test here runs the command line, some several times.
pytestmark = pytest.mark.slow

# 22 steps per epoch at this batch size. The runs stop at step 40 of the digits default's
# 12-epoch schedule (264 steps). 16x16 digits (the default is 32x32): the 36 steps after
# the first four take 2.3 s instead of 4.9 s (a warm compilation cache, the suite's flags).
SMALL = ('--dataset=digits', '--image_size=16', '--arch=vgg11', '--width=0.125',
         '--num_blocks=2', '--batch_size=64', '--stop_at_step=40')


# The environment of a real run: without the suite's XLA flags (tests/conftest.py), so
# XLA compiles with the optimisation real runs get.
REAL_RUN_ENV = {name: value for name, value in os.environ.items() if name != 'XLA_FLAGS'}


def run_main(*flags, timeout=300, env=None):
  """Runs `python -m experiments.main FLAGS` in a fresh process; returns the CompletedProcess."""
  return subprocess.run([sys.executable, '-m', 'experiments.main', *flags], cwd=REPO,
                        env={**(env or os.environ), 'PYTHONPATH': REPO}, capture_output=True,
                        text=True, timeout=timeout)


def _stderr_lines(proc_or_text):
  text = proc_or_text if isinstance(proc_or_text, str) else proc_or_text.stderr
  return [l for l in text.splitlines() if l.strip()]


def _results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def _metrics(workdir):
  """metrics.jsonl's records without the clock readings, which no two runs share."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return [{key: value for key, value in record.items()
           if key not in ('images_per_sec', 'elapsed_s')} for record in records]


def _checkpoint_steps(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


class _Background:
  """`python -m experiments.main FLAGS` running in the background, output in files."""

  def __init__(self, tempdir, *flags, env=None):
    self._stdout = open(os.path.join(tempdir, 'stdout'), 'w+')
    self._stderr = open(os.path.join(tempdir, 'stderr'), 'w+')
    self.proc = subprocess.Popen(
        [sys.executable, '-m', 'experiments.main', *flags], cwd=REPO,
        env={**(env or os.environ), 'PYTHONPATH': REPO}, stdout=self._stdout,
        stderr=self._stderr)

  def wait_for(self, condition, timeout=300):
    """Polls `condition()` until true; fails if the process ends or time runs out first.

    The timeout only catches a run that hangs: the suite runs tests two at a time
    (pytest -n), so a run may take twice its time on an idle machine.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if condition():
        return
      if self.proc.poll() is not None:
        raise AssertionError(f'the run ended (rc {self.proc.returncode}) before the moment '
                             f'to stop it: {self.output()[1][-2000:]}')
      time.sleep(0.02)
    self.proc.kill()
    raise AssertionError(f'timed out: {self.output()[1][-2000:]}')

  def stdout_so_far(self) -> str:
    with open(self._stdout.name) as f:
      return f.read()

  def output(self):
    self.proc.wait(timeout=300)
    self._stdout.seek(0)
    self._stderr.seek(0)
    return self._stdout.read(), self._stderr.read()


class ResumeTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # The uninterrupted run every resumed run must match bit for bit.
    # A folder of its own: test runs of other checkouts may be using the same test tmpdir.
    os.makedirs(absltest.get_default_test_tmpdir(), exist_ok=True)
    cls.reference = os.path.join(
        tempfile.mkdtemp(prefix='resume_reference_', dir=absltest.get_default_test_tmpdir()),
        'run')
    proc = run_main(*SMALL, '--checkpoint_every=4', f'--workdir={cls.reference}')
    assert proc.returncode == 0, proc.stderr[-3000:]
    cls.reference_results = _results(cls.reference)
    cls.reference_metrics = _metrics(cls.reference)

  def _copy_of_reference(self):
    workdir = os.path.join(self.create_tempdir().full_path, 'run')
    shutil.copytree(self.reference, workdir)
    return workdir

  def test_reference_run_checkpoints_and_digest(self):
    self.assertEqual(_checkpoint_steps(self.reference), [32, 36, 40])  # The newest three.
    self.assertRegex(self.reference_results['params_digest'], '^[0-9a-f]{64}$')
    self.assertEqual(self.reference_results['steps'], 40)
    self.assertEqual(self.reference_results['skipped_updates'], [0, 0])
    # --stop_at_step keeps the long schedule: the rate is still near its peak of 0.05.
    self.assertGreater(self.reference_metrics[-2]['learning_rate'], 0.045)
    with open(os.path.join(self.reference, 'config.json')) as f:
      self.assertEqual(json.load(f)['arch'], 'vgg11')

  def test_sigkill_after_a_checkpoint_then_rerun_is_bitwise_exact(self):
    self._kill_and_resume(self.reference_results, self.reference_metrics)

  @pytest.mark.slow
  def test_sigkill_and_rerun_is_bitwise_exact_with_the_xla_flags_of_real_runs(self):
    # The suite compiles with little optimisation; real runs do not, and fused,
    # reordered float arithmetic must still resume to the same bits.
    reference = os.path.join(self.create_tempdir().full_path, 'reference')
    proc = run_main(*SMALL, '--checkpoint_every=4', f'--workdir={reference}', env=REAL_RUN_ENV)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self._kill_and_resume(_results(reference), _metrics(reference), env=REAL_RUN_ENV)

  def _kill_and_resume(self, reference_results, reference_metrics, env=None):
    """SIGKILLs a run after its first checkpoint, reruns it, compares with the reference."""
    workdir = os.path.join(self.create_tempdir().full_path, 'run')
    flags = (*SMALL, '--checkpoint_every=4', f'--workdir={workdir}')
    run = _Background(self.create_tempdir().full_path, *flags, env=env)
    run.wait_for(lambda: _checkpoint_steps(workdir))
    run.proc.send_signal(signal.SIGKILL)
    run.output()
    self.assertEqual(run.proc.returncode, -signal.SIGKILL)
    self.assertFalse(os.path.exists(os.path.join(workdir, 'results.json')))
    killed_at = _checkpoint_steps(workdir)[-1]
    self.assertLess(killed_at, 40)

    proc = run_main(*flags, env=env)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    resumed_at = int(re.search(r'resuming at step (\d+) of 40', proc.stdout).group(1))
    self.assertGreaterEqual(resumed_at, killed_at)  # Nothing before the last checkpoint lost.
    results = _results(workdir)
    self.assertEqual(results['resumed_from_step'], resumed_at)
    self.assertEqual(results['params_digest'], reference_results['params_digest'])
    self.assertEqual(results['block_test_accuracy'], reference_results['block_test_accuracy'])
    # Records after the checkpoint were dropped and written again: no duplicates.
    self.assertEqual(_metrics(workdir), reference_metrics)

  def test_finished_run_rerun_says_so_and_exits_0(self):
    workdir = self._copy_of_reference()
    proc = run_main(*SMALL, '--checkpoint_every=4', f'--workdir={workdir}')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn(f'{workdir} holds a finished run (checkpoint at step 40', proc.stdout)
    self.assertEqual(_results(workdir), self.reference_results)  # Untouched.

  def test_truncated_checkpoint_is_one_line_and_previous_resumes(self):
    workdir = self._copy_of_reference()
    latest = os.path.join(workdir, 'checkpoints', '40')
    data_files = [p for p in glob.glob(os.path.join(latest, 'state', '**', 'd', '*'),
                                       recursive=True) if os.path.isfile(p)]
    largest = max(data_files, key=os.path.getsize)
    with open(largest, 'r+b') as f:
      f.truncate(os.path.getsize(largest) // 2)
    proc = run_main(*SMALL, '--stop_at_step=44', f'--workdir={workdir}')
    self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
    self.assertLen(_stderr_lines(proc), 1, proc.stderr)
    line = _stderr_lines(proc)[0]
    self.assertIn(f'checkpoint {latest} is unreadable or corrupt', line)
    self.assertIn('--resume_from=previous to resume from step 36', line)

    proc = run_main(*SMALL, '--resume_from=previous', f'--workdir={workdir}')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn('resuming at step 36 of 40', proc.stdout)
    self.assertEqual(_results(workdir)['params_digest'],
                     self.reference_results['params_digest'])
    self.assertEqual(_checkpoint_steps(workdir), [32, 36, 40])  # 40 written anew.

  def test_nonfinite_loss_stops_naming_block_and_step_then_skip_nonfinite_counts(self):
    # A learning rate of 1e30 really diverges: the first update is finite but huge, and
    # the next loss is NaN.
    workdir = os.path.join(self.create_tempdir().full_path, 'run')
    flags = ('--dataset=digits', '--arch=vgg11', '--width=0.125', '--num_blocks=2',
             '--batch_size=64', '--max_steps=6', '--lr=1e30', '--warmup_epochs=0',
             '--checkpoint_every=1', f'--workdir={workdir}')
    proc = run_main(*flags)
    self.assertEqual(proc.returncode, 3, proc.stderr[-3000:])
    self.assertLen(_stderr_lines(proc), 1, proc.stderr)
    match = re.search(r'non-finite loss at step (\d+) in blocks? 1 \(loss (nan|inf)\)',
                      proc.stderr)
    self.assertIsNotNone(match, proc.stderr)
    bad_step = int(match.group(1))
    self.assertIn(f'Last good checkpoint: step {bad_step - 1} in {workdir}/checkpoints',
                  proc.stderr)
    self.assertEqual(_checkpoint_steps(workdir)[-1], bad_step - 1)
    # Nothing half-written beside them either.
    self.assertCountEqual(os.listdir(os.path.join(workdir, 'checkpoints')),
                          [str(s) for s in _checkpoint_steps(workdir)])
    self.assertFalse(os.path.exists(os.path.join(workdir, 'results.json')))

    # The last good checkpoint is intact: resuming from it with skipping on finishes,
    # and every later update of the diverged blocks is skipped and counted.
    proc = run_main(*flags, '--skip_nonfinite')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn(f'resuming at step {bad_step - 1} of 6', proc.stdout)
    results = _results(workdir)
    expected_skips = 6 - bad_step + 1
    self.assertEqual(results['skipped_updates'], [expected_skips, expected_skips])
    self.assertIn('skipped updates', proc.stdout)
    train = [r for r in _metrics(workdir) if r['split'] == 'train'][-1]
    # 'skipped' counts the updates skipped in the record's span (here all 6 steps).
    self.assertEqual(train['skipped'], [expected_skips] * 2)

  def test_sigterm_saves_then_exits_and_resumes_exactly(self):
    self._signal_saves_then_resumes(signal.SIGTERM, 143)

  def test_sigint_saves_then_exits(self):
    self._signal_saves_then_resumes(signal.SIGINT, 130, resume=False)

  def _signal_saves_then_resumes(self, signum, exit_code, resume=True):
    workdir = os.path.join(self.create_tempdir().full_path, 'run')
    flags = (*SMALL, '--checkpoint_every=0', f'--workdir={workdir}')  # No periodic ones.
    run = _Background(self.create_tempdir().full_path, *flags)
    # The first epoch's record means the loop is running (step 22 of 40).
    run.wait_for(lambda: os.path.exists(os.path.join(workdir, 'metrics.jsonl')))
    run.proc.send_signal(signum)
    stdout, stderr = run.output()
    self.assertEqual(run.proc.returncode, exit_code, stderr[-3000:])
    match = re.fullmatch(rf'stopped by {signum.name} at step (\d+) of 40; checkpoint in '
                         rf'(\S+); rerun the same command to resume', _stderr_lines(stderr)[-1])
    self.assertIsNotNone(match, stderr[-3000:])
    stopped_at = int(match.group(1))
    self.assertEqual(match.group(2), os.path.join(workdir, 'checkpoints', str(stopped_at)))
    self.assertEqual(_checkpoint_steps(workdir), [stopped_at])
    self.assertNotIn('Traceback', stderr)
    del stdout
    if not resume:
      return
    proc = run_main(*flags)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn(f'resuming at step {stopped_at} of 40', proc.stdout)
    self.assertEqual(_results(workdir)['params_digest'],
                     self.reference_results['params_digest'])
    self.assertEqual(_metrics(workdir), self.reference_metrics)

  def test_a_signal_while_starting_is_one_line(self):
    # Ctrl-C during the imports, the data loading, the model build or the compilations
    # before the loop: one line, exit 130, and either nothing written or, once the run has
    # begun writing its workdir, a checkpoint at the step it names.
    for delay_s in (1.0, 3.0):
      workdir = os.path.join(self.create_tempdir().full_path, 'run')
      run = _Background(self.create_tempdir().full_path, *SMALL, f'--workdir={workdir}')
      time.sleep(delay_s)
      run.proc.send_signal(signal.SIGINT)
      _, stderr = run.output()
      self.assertEqual(run.proc.returncode, 130, stderr[-3000:])
      self.assertNotIn('Traceback', stderr)
      self.assertLen(_stderr_lines(stderr), 1, stderr[-3000:])
      line = _stderr_lines(stderr)[0]
      if line.endswith('nothing was written'):
        self.assertRegex(line, r'^stopped by SIGINT (while starting|before the run began)')
        self.assertFalse(os.path.exists(workdir))
      else:
        stopped_at = int(re.match(r'stopped by SIGINT at step (\d+) of 40; ', line).group(1))
        self.assertEqual(_checkpoint_steps(workdir), [stopped_at])

  def test_a_signal_while_the_first_step_compiles_saves_that_step(self):
    workdir = os.path.join(self.create_tempdir().full_path, 'run')
    run = _Background(self.create_tempdir().full_path, *SMALL, f'--workdir={workdir}')
    # The header's last line; the first step compiles next.
    run.wait_for(lambda: 'starting at step 0 of 40' in run.stdout_so_far())
    run.proc.send_signal(signal.SIGINT)
    _, stderr = run.output()
    self.assertEqual(run.proc.returncode, 130, stderr[-3000:])
    self.assertNotIn('Traceback', stderr)
    self.assertLen(_stderr_lines(stderr), 1, stderr[-3000:])
    match = re.fullmatch(r'stopped by SIGINT at step (\d+) of 40; checkpoint in \S+; rerun the '
                         r'same command to resume', _stderr_lines(stderr)[0])
    self.assertIsNotNone(match, stderr)
    self.assertEqual(_checkpoint_steps(workdir), [int(match.group(1))])

  def test_stdout_and_stderr_into_a_pipe_that_closes_stop_with_a_checkpoint(self):
    # `2>&1 | head`: the stop line itself cannot be printed, and the run still ends as with
    # stdout alone: exit 141, a checkpoint at the stop step, the records up to it.
    workdir = os.path.join(self.create_tempdir().full_path, 'run')
    flags = (*SMALL, '--checkpoint_every=0', '--log_every=1', f'--workdir={workdir}')
    command = (f'{sys.executable} -m experiments.main {" ".join(flags)} 2>&1 | head -n 12; '
               f'exit "${{PIPESTATUS[0]}}"')
    proc = subprocess.run(['bash', '-c', command], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, 'PYTHONPATH': REPO}, timeout=300)
    self.assertEqual(proc.returncode, 141, proc.stdout[-3000:])
    self.assertLen(proc.stdout.splitlines(), 12)
    (stopped_at,) = _checkpoint_steps(workdir)
    self.assertGreater(stopped_at, 0)  # Step lines went through the pipe before it closed.
    train_steps = [r['step'] for r in _metrics(workdir) if r['split'] == 'train']
    self.assertEqual(train_steps, list(range(1, stopped_at + 1)))
    proc = run_main(*flags)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn(f'resuming at step {stopped_at} of 40', proc.stdout)
    self.assertEqual(_results(workdir)['params_digest'],
                     self.reference_results['params_digest'])

  def test_log_every_records_train_metrics_every_n_steps(self):
    workdir = os.path.join(self.create_tempdir().full_path, 'run')
    proc = run_main(*SMALL[:-1], '--max_steps=6', '--log_every=2', f'--workdir={workdir}')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    records = _metrics(workdir)
    self.assertEqual([(r['split'], r['step']) for r in records],
                     [('train', 2), ('train', 4), ('train', 6), ('test', 6)])
    for step in (2, 4, 6):
      self.assertRegex(proc.stdout, rf'epoch +{step / 22:.2f}  step +{step}  train loss \[')
    # TensorBoard gets the same records.
    self.assertEqual(sorted(test_writers.tensorboard_scalars(workdir)['train/loss/block1']),
                     [2, 4, 6])

  def test_another_runs_config_is_refused_unless_overwrite(self):
    workdir = self._copy_of_reference()
    proc = run_main(*SMALL, '--lr=0.2', '--seed=3', f'--workdir={workdir}')
    self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
    self.assertEqual(_stderr_lines(proc), [
        f'error: workdir {workdir} holds a run with a different config (lr 0.05 != 0.2; '
        f'seed 0 != 3); use another --workdir or --overwrite'])
    self.assertEqual(_results(workdir), self.reference_results)

    with open(os.path.join(workdir, 'notes.txt'), 'w') as f:
      f.write('not the run\'s')
    proc = run_main(*SMALL[:-1], '--max_steps=2', '--lr=0.2', '--overwrite',
                    f'--workdir={workdir}')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn(f'--overwrite: removed checkpoints, config.json, metrics.jsonl, results.json, '
                  f'block_curves.png, tensorboard from {workdir}', proc.stdout)
    self.assertIn('starting at step 0 of 2', proc.stdout)
    self.assertEqual(_results(workdir)['config']['lr'], 0.2)
    self.assertEqual(_checkpoint_steps(workdir), [2])
    self.assertTrue(os.path.exists(os.path.join(workdir, 'notes.txt')))

  def test_stop_at_step_and_eval_every_may_change_to_extend_a_run(self):
    workdir = self._copy_of_reference()
    proc = run_main(*SMALL[:-1], '--stop_at_step=44', '--eval_every=2', f'--workdir={workdir}')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn('resuming at step 40 of 44', proc.stdout)
    self.assertEqual(_results(workdir)['steps'], 44)
    with open(os.path.join(workdir, 'config.json')) as f:
      self.assertEqual(json.load(f)['stop_at_step'], 44)

  def test_bad_resume_from(self):
    workdir = self._copy_of_reference()
    cases = (('7', 'no checkpoint of step 7 in '), ('best', 'must be latest'))
    procs = test_main.run_main_cases([(*SMALL, f'--resume_from={value}', f'--workdir={workdir}')
                                      for value, _ in cases])
    for (_, expected), proc in zip(cases, procs):
      self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
      self.assertIn(expected, _stderr_lines(proc)[-1])


if __name__ == '__main__':
  absltest.main()
