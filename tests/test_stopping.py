"""experiments.stopping in process: a stop whose exception Python drops is not lost."""

import gc
import signal
import sys

from absl.testing import absltest
import pytest

from experiments import stopping


class _FailsWhenCollected:
  """Raises `error` from `__del__`, as any finaliser's error."""

  def __init__(self, error):
    self.error = error

  def __del__(self):
    raise self.error


class _RaisesWhenCollected:
  """Raises `error` through `stopping.raise_stop` from `__del__`, where Python drops it."""

  def __init__(self, error):
    self.error = error

  def __del__(self):
    stopping.raise_stop(self.error)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
class DroppedStopTest(absltest.TestCase):

  def tearDown(self):
    stopping.stop_delivered()
    super().tearDown()

  def test_a_dropped_stop_is_raised_when_the_run_would_begin_writing(self):
    error = stopping.Interrupted('stopped by SIGINT before the run began writing its workdir',
                                 signal.SIGINT)
    _RaisesWhenCollected(error)  # Python prints "Exception ignored in ..." and goes on.
    gc.collect()
    stop_signals = stopping.StopSignals()
    with self.assertRaises(stopping.Interrupted) as raised:
      stop_signals.defer()
    self.assertIs(raised.exception, error)
    self.assertFalse(stopping.run_started())  # Nothing deferred: the run stops before writing.
    stop_signals.defer()  # Raised once only: a later run in this process starts as usual.
    self.assertTrue(stopping.run_started())
    stop_signals.restore()

  def test_a_delivered_stop_is_not_raised_again(self):
    try:
      stopping.raise_stop(stopping.Interrupted('stopped', signal.SIGTERM))
    except stopping.Interrupted:
      stopping.stop_delivered()
    stop_signals = stopping.StopSignals()
    stop_signals.defer()
    self.assertTrue(stopping.run_started())
    stop_signals.restore()


  def test_no_traceback_for_a_dropped_stop_only(self):
    printed = []
    saved = sys.unraisablehook
    sys.unraisablehook = stopping.quiet_dropped_stops(
        lambda unraisable: printed.append(unraisable.exc_value))
    try:
      _RaisesWhenCollected(stopping.Interrupted('stopped by SIGINT', signal.SIGINT))
      _FailsWhenCollected(ValueError('a real bug'))
      gc.collect()
    finally:
      sys.unraisablehook = saved
    self.assertEqual([type(error) for error in printed], [ValueError])


if __name__ == '__main__':
  absltest.main()
