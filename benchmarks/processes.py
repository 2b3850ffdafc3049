"""Runs a benchmark's worker processes together and fails them together.

Shared by the benchmarks that measure real parallel workers (processes joined
by `jax.distributed`): a process waiting in a collective for a peer that died
waits for ever, so when one worker fails (or the deadline passes) every other
one is killed at once, and when the driver itself dies the kernel kills its
workers (Linux `PR_SET_PDEATHSIG`).
"""

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional, Sequence


class WorkerFailure(Exception):
  """A worker exited with an error or ran past the deadline; the message is its last words."""


@dataclasses.dataclass(frozen=True)
class Worker:
  """One process to start.

  argv: the command. cores: CPU cores to pin it to before it starts (None:
  inherit the driver's affinity; a worker may then pin itself). env: variables
  added to the driver's environment.
  """
  argv: Sequence[str]
  cores: Optional[Sequence[int]] = None
  env: Optional[dict] = None


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago (for jax.distributed's coordinator)."""
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    return probe.getsockname()[1]


def last_line(path: str) -> str:
  """The last non-empty line of a log file: what a failed worker said last."""
  with open(path, errors='replace') as f:
    lines = [line.strip() for line in f if line.strip()]
  return lines[-1] if lines else 'no output'


# Runs first in each worker, then replaces itself with the worker's command: pins the
# process to its cores (before JAX starts: XLA and oneDNN size their thread pools from
# the affinity) and asks the kernel to kill it when the driver dies (Linux
# PR_SET_PDEATHSIG, kept across exec). A launcher rather than subprocess's preexec_fn:
# Python code between fork and exec can deadlock a driver that has threads (JAX's).
_LAUNCHER = """
import ctypes, os, signal, sys
cores = [int(core) for core in sys.argv[1].split(',') if core]
if cores:
  os.sched_setaffinity(0, cores)
try:
  ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGKILL)
except (OSError, AttributeError):
  pass
os.execvp(sys.argv[2], sys.argv[2:])
"""


def _launch_argv(worker: Worker) -> list:
  cores = ','.join(str(core) for core in worker.cores) if worker.cores is not None else ''
  return [sys.executable, '-c', _LAUNCHER, cores, *worker.argv]


def _stop(proc):
  """Kills a worker and whatever it started (its own process group), then reaps it."""
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  proc.wait()


def run(workers: Sequence[Worker], timeout_s: float, log_dir: str, *,
        cwd: Optional[str] = None) -> list:
  """Starts every worker, waits for all; returns each one's (stdout, stderr) log paths.

  Logs go to `log_dir/<i>.out` and `<i>.err`.

  Raises:
    WorkerFailure: naming the first worker that failed (or the deadline) and
      its last stderr line; the other workers are killed first.
  """
  procs, logs = [], []
  try:
    for i, worker in enumerate(workers):
      out, err = os.path.join(log_dir, f'{i}.out'), os.path.join(log_dir, f'{i}.err')
      logs.append((out, err))
      env = {**os.environ, **worker.env} if worker.env else None
      with open(out, 'w') as stdout, open(err, 'w') as stderr:
        procs.append(subprocess.Popen(_launch_argv(worker), stdout=stdout, stderr=stderr,
                                      cwd=cwd, env=env, start_new_session=True))
    deadline = time.monotonic() + timeout_s
    while any(proc.poll() is None for proc in procs):
      failed = [i for i, proc in enumerate(procs) if proc.poll() not in (None, 0)]
      if failed:
        i = failed[0]
        raise WorkerFailure(f'worker {i} exited with {procs[i].returncode}: '
                            f'{last_line(logs[i][1])}')
      if time.monotonic() > deadline:
        raise WorkerFailure(f'timed out after {timeout_s} s; worker 0 last said: '
                            f'{last_line(logs[0][1])}')
      time.sleep(0.2)
    for i, proc in enumerate(procs):
      if proc.returncode:
        raise WorkerFailure(f'worker {i} exited with {proc.returncode}: {last_line(logs[i][1])}')
    return logs
  finally:
    for proc in procs:
      _stop(proc)
