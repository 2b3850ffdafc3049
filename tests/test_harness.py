"""The benchmarks' one timing routine, on stub workloads (no JAX, no timing asserts)."""

import io
import json
import os
import subprocess
import sys

from absl.testing import absltest

from benchmarks import harness

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeClock:
  """A clock the stub workload moves forward by hand."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


class TimeStepsTest(absltest.TestCase):

  def test_median_of_the_timed_calls_after_warm_up(self):
    clock, calls = FakeClock(), []
    durations = iter([100.0, 3.0, 1.0, 50.0, 2.0, 4.0])  # The first is the warm-up call.

    def step(carry):
      calls.append(carry)
      clock.now += next(durations)
      return carry + 1

    timing, carry = harness.time_steps(step, 0, steps=5, warmup=1, block=lambda x: x,
                                       clock=clock)
    self.assertEqual(calls, [0, 1, 2, 3, 4, 5])  # The carry threads through every call.
    self.assertEqual(carry, 6)
    self.assertEqual(timing.seconds, (3.0, 1.0, 50.0, 2.0, 4.0))
    self.assertEqual(timing.median_seconds, 3.0)
    self.assertEqual(timing.per_second(12), 4.0)
    self.assertEqual(timing.wall_seconds, 60.0)

  def test_every_call_is_waited_for_before_the_clock_stops(self):
    clock, waited = FakeClock(), []

    def wait(result):  # A stand-in for block_until_ready: the work finishes here.
      clock.now += 2.0
      waited.append(result)

    timing = harness.time_calls(lambda: 'result', repeats=3, warmup=2, block=wait, clock=clock)
    self.assertLen(waited, 5)
    self.assertEqual(timing.seconds, (2.0, 2.0, 2.0))

  def test_refuses_zero_steps(self):
    with self.assertRaisesRegex(ValueError, 'at least 1'):
      harness.time_steps(lambda c: c, 0, steps=0)

  def test_peak_rss_sees_a_workload_that_allocates(self):
    # A fresh interpreter: a stub step that touches 256 MiB must show up in the peak,
    # and the harness loads no framework. (Linux keeps ru_maxrss across fork and exec,
    # so the child's peak starts at this process's: compare with its resident memory.)
    code = ('import json, sys, numpy as np; from benchmarks import harness; '
            'before = harness.current_rss_bytes(); '
            'timing = harness.time_calls(lambda: np.ones(64 * 2**20, np.float32).sum(), '
            'repeats=2); '
            'print(json.dumps([before, timing.peak_rss_bytes, harness.current_rss_bytes(), '
            '"jax" in sys.modules, timing.load_avg_1m]))')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            check=True, cwd=_ROOT)
    before, peak, current, jax_loaded, load = json.loads(result.stdout)
    self.assertGreater(peak - before, 250 * 2**20, result.stdout)
    self.assertLess(current, peak)  # The array was freed; the peak remembers it.
    self.assertFalse(jax_loaded)
    self.assertGreaterEqual(load, 0.0)


class LoadWarningTest(absltest.TestCase):

  def test_a_load_above_one_per_core_is_a_warning_in_the_line_and_on_stderr(self):
    self.assertIsNone(harness.load_warning(2.0, cores=2))  # One per core: no warning.
    stream = io.StringIO()
    line = harness.warn_if_loaded({'images_per_sec': 10.0, 'load_avg_1m': 5.5}, cores=2,
                                  stream=stream)
    self.assertStartsWith(line['warning'], 'load average 5.50 on 2 cores during timing '
                                           '(above one per core)')
    self.assertEqual(stream.getvalue(), f'warning: {line["warning"]}\n')
    quiet = io.StringIO()
    self.assertNotIn('warning', harness.warn_if_loaded({'load_avg_1m': 0.5}, cores=2,
                                                       stream=quiet))
    self.assertEqual(quiet.getvalue(), '')


if __name__ == '__main__':
  absltest.main()
