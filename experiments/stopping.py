"""How a run ends early: SIGINT, SIGTERM or a closed output pipe, at any moment.

A run has two phases, and a stop request means something different in each:

- **Starting** (imports, flags, data loading, the model build, the engine's
  compilation): nothing is written to the workdir yet, so a signal stops the
  run at once. The command line turns it into `Interrupted` (or, before
  `main()` runs, exits on the spot) and the workdir lock removes what it created.
- **Running** (from the first file written to the workdir until the end,
  `StopSignals.deferred()`): the first signal only sets `signum`; the loop
  finishes its step (and any compilation in progress), saves a checkpoint and
  raises `Interrupted`. A second signal acts as the one before the run began
  (on the command line: stop at once, one line).

A closed output pipe (`python -m experiments.main | head -1`) is the same
request to stop: Python ignores SIGPIPE, so the next print raises
BrokenPipeError instead; `StopSignals.guard_output` catches it there, sends
later output nowhere and sets `signum` to SIGPIPE.

This module imports nothing heavy: the command line installs its handlers before
it imports JAX.
"""

import contextlib
import os
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The StopSignals deferring signals now: a run that has begun writing its workdir.
_deferring = set()


def run_started() -> bool:
  """Whether a run in this process has begun writing its workdir (signals are deferred)."""
  return bool(_deferring)


class Interrupted(Exception):
  """SIGINT, SIGTERM or a closed output pipe stopped the run (`signum`: which)."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


# A stop a signal handler raised may not have reached the run: Python drops an
# exception raised while a garbage-collection callback or a __del__ runs ("Exception
# ignored in ...": JAX's _xla_gc_callback, often, while it starts), and the run would
# go on as if no signal had come.
_raised_stop = None  # The last stop `raise_stop` raised and the run has not yet received.


def raise_stop(error: 'Interrupted'):
  """Raises `error` from a signal handler, and keeps it in case Python drops it."""
  global _raised_stop
  _raised_stop = error
  raise error


def stop_delivered():
  """The stop `raise_stop` raised reached the run: nothing is left to raise again."""
  global _raised_stop
  _raised_stop = None


def raise_dropped_stop():
  """Raises again a stop whose exception Python dropped; nothing when there is none."""
  global _raised_stop
  if _raised_stop is not None:
    error, _raised_stop = _raised_stop, None
    raise error


def quiet_dropped_stops(hook):
  """`hook` (a `sys.unraisablehook`) that prints nothing for a stop Python dropped.

  Python reports the dropped exception through `sys.unraisablehook` ("Exception
  ignored in ..." and a traceback); the stop is not lost (`raise_dropped_stop`),
  so there is nothing to tell. Every other unraisable error goes to `hook`.
  """
  def quiet_hook(unraisable):
    if not isinstance(unraisable.exc_value, Interrupted):
      hook(unraisable)
  return quiet_hook


def handle_stop_signals(handler):
  """Installs `handler` for SIGINT and SIGTERM, except where they are ignored (nohup, `cmd &`)."""
  for signum in STOP_SIGNALS:
    if signal.getsignal(signum) != signal.SIG_IGN:
      signal.signal(signum, handler)


def signal_name(signum: int) -> str:
  """'SIGINT', 'SIGTERM', or 'SIGPIPE (the output pipe closed)'."""
  name = signal.Signals(signum).name
  return name + ' (the output pipe closed)' if signum == signal.SIGPIPE else name


def silence(stream):
  """Points `stream`'s file descriptor at /dev/null: a closed pipe then takes output quietly.

  Later writes, and Python's flush at exit, go nowhere instead of raising
  BrokenPipeError (which at exit turns the exit code into 120).
  """
  try:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)
  except (OSError, ValueError):
    pass


def say(line: str, stream=None):
  """Prints `line` on stderr (or `stream`); a closed pipe there drops it instead of raising."""
  stream = stream or sys.stderr
  try:
    print(line, file=stream, flush=True)
  except (BrokenPipeError, ValueError):
    silence(stream)


class StopSignals:
  """Turns SIGINT, SIGTERM and a closed stdout pipe into a flag (`signum`) checked between steps.

  Outside the main thread, where Python cannot install handlers, signals keep
  their usual meaning.
  """

  def __init__(self):
    self.signum = None
    self.output_closed = False
    self._previous = {}

  def guard_output(self, log):
    """`log`, except that a write to a closed stdout pipe asks the loop to stop."""
    def guarded_log(*args, **kwargs):
      if self.output_closed:
        return
      try:
        log(*args, **kwargs)
        sys.stdout.flush()
      except BrokenPipeError:
        self.output_closed = True
        silence(sys.stdout)
        if self.signum is None:
          self.signum = signal.SIGPIPE
    return guarded_log

  def defer(self):
    """From now until `restore()`, the first SIGINT or SIGTERM only sets `signum`.

    A stop raised before (while the run started) that Python dropped is raised
    here, before the run writes anything.
    """
    raise_dropped_stop()
    if threading.current_thread() is not threading.main_thread() or self in _deferring:
      return
    for signum in STOP_SIGNALS:
      if signal.getsignal(signum) != signal.SIG_IGN:  # An ignored signal stays ignored (nohup).
        previous = signal.signal(signum, self._handle)
        self._previous[signum] = signal.SIG_DFL if previous is None else previous
    _deferring.add(self)

  def restore(self):
    """Puts back the handlers `defer()` replaced."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
    _deferring.discard(self)

  @contextlib.contextmanager
  def deferred(self):
    """`defer()` while inside."""
    self.defer()
    try:
      yield self
    finally:
      self.restore()

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.signum is None:
      self.signum = signum
    # A second signal acts at once, as it did before the run began.
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
