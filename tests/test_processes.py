"""benchmarks/processes.py: workers start pinned, fail together, and say why."""

import os
import sys
import time

from absl.testing import absltest

from benchmarks import processes


def _python(code):
  return [sys.executable, '-c', code]


class RunTest(absltest.TestCase):

  def test_workers_are_pinned_and_get_their_environment(self):
    core = sorted(os.sched_getaffinity(0))[-1]
    log_dir = self.create_tempdir().full_path
    logs = processes.run([
        processes.Worker(_python('import os; print(sorted(os.sched_getaffinity(0)), '
                                 'os.environ["SETTING"])'), cores=[core], env={'SETTING': 'x'}),
        processes.Worker(_python('import os; print(len(os.sched_getaffinity(0)))')),
    ], timeout_s=60, log_dir=log_dir)
    with open(logs[0][0]) as f:
      self.assertEqual(f.read().strip(), f'[{core}] x')
    with open(logs[1][0]) as f:  # No cores given: the driver's affinity.
      self.assertEqual(int(f.read()), len(os.sched_getaffinity(0)))

  def test_one_failure_kills_the_others_and_names_the_worker(self):
    start = time.monotonic()
    with self.assertRaisesRegex(processes.WorkerFailure,
                                r'^worker 1 exited with 3: the last words$'):
      processes.run([
          processes.Worker(_python('import time; time.sleep(120)')),
          processes.Worker(_python('import sys; print("first", file=sys.stderr); '
                                   'print("the last words", file=sys.stderr); sys.exit(3)')),
      ], timeout_s=100, log_dir=self.create_tempdir().full_path)
    self.assertLess(time.monotonic() - start, 60)  # The sleeper was killed, not awaited.

  def test_deadline(self):
    with self.assertRaisesRegex(processes.WorkerFailure, r'^timed out after 1 s'):
      processes.run([processes.Worker(_python('import time; time.sleep(120)'))], timeout_s=1,
                    log_dir=self.create_tempdir().full_path)


if __name__ == '__main__':
  absltest.main()
