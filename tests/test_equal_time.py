"""benchmarks/equal_time.py: the runs it starts, the budget it gives them, one real run."""

import json
import os
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
import pytest

from benchmarks import equal_time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flag(argv, name):
  values = [arg.split('=', 1)[1] for arg in argv if arg.startswith(f'--{name}=')]
  return values[-1] if values else None


class ConfigurationTest(parameterized.TestCase):

  @parameterized.parameters(
      ('bwbpf_one_core', 1, 1, 'bwbpf', 'none'),
      ('bwbpf_all_cores', 1, 4, 'bwbpf', 'none'),
      ('bp_all_cores', 1, 4, 'bp', 'none'),
      ('blocks', 4, 1, 'bwbpf', 'blocks'),
      ('data_bwbpf', 4, 1, 'bwbpf', 'data'),
      ('data_bp', 4, 1, 'bp', 'data'),
  )
  def test_processes_cores_and_flags(self, name, processes, cores_per_process, mode, parallel):
    config = equal_time.configuration(name, 4)
    self.assertEqual((config.processes, config.cores_per_process),
                     (processes, cores_per_process))
    workers = equal_time.workers(config, ['--arch=vgg11'], '/tmp/w', 1234, [3, 5, 7, 9],
                                 microbatches=8, pipeline_stages=2)
    self.assertLen(workers, processes)
    for i, worker in enumerate(workers):
      self.assertEqual(_flag(worker.argv, 'mode'), mode)
      self.assertEqual(_flag(worker.argv, 'parallel'), parallel)
      self.assertEqual(_flag(worker.argv, 'arch'), 'vgg11')
      self.assertEqual(_flag(worker.argv, 'workdir'), '/tmp/w')
      self.assertEqual(worker.env['OMP_NUM_THREADS'], str(cores_per_process))
      # Each process its own cores, taken in order from the driver's.
      self.assertEqual(list(worker.cores),
                       [3, 5, 7, 9][i * cores_per_process:(i + 1) * cores_per_process])
      if processes > 1:
        self.assertEqual(_flag(worker.argv, 'process_id'), str(i))
        self.assertEqual(_flag(worker.argv, 'num_processes'), str(processes))
        self.assertEqual(_flag(worker.argv, 'coordinator_address'), '127.0.0.1:1234')
      else:
        self.assertIsNone(_flag(worker.argv, 'coordinator_address'))
      pipeline = (('8', '2') if parallel == 'blocks' else (None, None))
      self.assertEqual((_flag(worker.argv, 'microbatches'),
                        _flag(worker.argv, 'pipeline_stages')), pipeline)

  def test_unknown_configuration(self):
    with self.assertRaisesRegex(ValueError, 'unknown configuration .sync.'):
      equal_time.configuration('sync', 2)

  def test_bad_configuration_is_one_line_and_exit_2(self):
    proc = subprocess.run(
        [sys.executable, '-m', 'benchmarks.equal_time', '--configs=sync'],
        cwd=REPO, env={**os.environ, 'PYTHONPATH': REPO}, capture_output=True, text=True,
        timeout=120)
    self.assertEqual(proc.returncode, 2)
    self.assertEqual(proc.stderr.strip().splitlines(),
                     ["error: unknown configuration 'sync'; choose from " + ', '.join(equal_time.CONFIGS)])

  def test_steps_fill_the_budget(self):
    self.assertEqual(equal_time.steps_for_budget(240, 320.0, 128), 600)
    self.assertEqual(equal_time.steps_for_budget(240, 100.0, 128), 187)  # Rounded down.
    self.assertEqual(equal_time.steps_for_budget(1, 1.0, 128), 1)  # At least one step.


@pytest.mark.slow
class CommandTest(absltest.TestCase):

  def test_one_configuration_trains_for_its_budget(self):
    root = self.create_tempdir().full_path
    env = {**os.environ, 'PYTHONPATH': REPO,
           'BWBPF_CACHE_DIR': self.create_tempdir().full_path}
    proc = subprocess.run(
        [sys.executable, '-m', 'benchmarks.equal_time', '--dataset=digits', '--arch=vgg11',
         '--width=0.125', '--batch_size=64', '--budget_seconds=4', '--calibration_steps=4',
         '--configs=bwbpf_one_core', f'--workdir={root}'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    (line,) = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith('{')]
    self.assertEqual((line['config'], line['processes'], line['cores']),
                     ('bwbpf_one_core', 1, 1))
    # The measured run got the steps its calibration said fit the budget.
    self.assertEqual(line['steps'],
                     equal_time.steps_for_budget(4, line['calibration_images_per_sec'], 64))
    with open(os.path.join(line['workdir'], 'results.json')) as f:
      results = json.load(f)
    self.assertEqual(results['config']['max_steps'], line['steps'])
    self.assertEqual(results['test_accuracy'], pytest.approx(line['test_accuracy'], abs=1e-4))
    # The training time is the measured run's own, from its steps and speed (how well
    # a few seconds train depends on the machine's speed, so no accuracy is asserted).
    self.assertAlmostEqual(line['train_seconds'],
                           line['steps'] * 64 / results['images_per_sec'], delta=0.1)


if __name__ == '__main__':
  absltest.main()
