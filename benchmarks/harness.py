"""The one timing routine every benchmark calls: warm-up, wait, medians, CPU time, memory.

    timing, states = harness.time_steps(lambda s: step(s, batch)[0], states, steps=5)
    images_per_sec = timing.per_second(batch_size)

`time_steps` runs `warmup` untimed calls (the first one compiles a jitted
function; later ones let allocators and oneDNN primitive caches settle), then
`steps` timed calls, each waited for (`jax.block_until_ready` by default, or
the caller's `block`, e.g. `torch.cuda.synchronize`) before the clock stops:
JAX dispatches asynchronously, so an unwaited call times only the dispatch.
The median is the figure to quote: a shared CPU gives long outliers.
`load_avg_1m` says how shared the machine was (`warn_if_loaded` flags a line
timed at more than one per core), and `peak_rss_bytes` is the
process's peak resident memory so far (runtime, compiled code and data
included), which is why each measurement belongs in its own process.

Nothing here imports JAX or PyTorch: a PyTorch worker stays free of JAX's
runtime, and JAX is used for waiting only where the caller already loaded it.
"""

import dataclasses
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable, Optional


@dataclasses.dataclass(frozen=True)
class Timing:
  """What a run of timed calls measured."""
  seconds: tuple  # Wall seconds of each timed call, in order.
  cpu_seconds: float  # Process CPU time (user + system) over the timed calls.
  wall_seconds: float  # Wall time over the timed calls, waits included.
  load_avg_1m: float  # The machine's 1-minute load average at the end.
  peak_rss_bytes: int  # The process's peak resident memory at the end.

  @property
  def median_seconds(self) -> float:
    return statistics.median(self.seconds)

  @property
  def cpu_seconds_per_call(self) -> float:
    return self.cpu_seconds / len(self.seconds)

  @property
  def cpu_per_wall(self) -> float:
    """Cores kept busy on average (CPU seconds per wall second)."""
    return self.cpu_seconds / self.wall_seconds if self.wall_seconds else 0.0

  def per_second(self, items: float) -> float:
    """Throughput of `items` per call at the median call time (images/s for a batch)."""
    return items / self.median_seconds


def cpu_seconds() -> float:
  """This process's CPU time so far, user + system."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def peak_rss_bytes() -> int:
  """This process's peak resident memory so far (Linux reports kibibytes).

  Linux carries the peak across fork and exec: a worker's figure is at least its
  parent's at the fork, so measure in a worker spawned by a small process.
  """
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
  """This process's resident memory now (Linux /proc; -1 where it cannot be read)."""
  try:
    with open('/proc/self/statm') as statm:
      return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
  except (OSError, ValueError, IndexError):
    return -1


def _block_until_ready(outputs: Any) -> Any:
  """Waits for JAX arrays in `outputs`, if the caller uses JAX; anything else is ready."""
  if 'jax' in sys.modules:
    return sys.modules['jax'].block_until_ready(outputs)
  return outputs


def time_steps(step: Callable[[Any], Any], carry: Any, *, steps: int, warmup: int = 1,
               block: Optional[Callable[[Any], Any]] = None,
               clock: Callable[[], float] = time.perf_counter):
  """Times `steps` calls of `carry = step(carry)` after `warmup` untimed ones.

  Args:
    step: one call of the workload; it returns the next carry (e.g. the new states).
    carry: the first call's argument.
    steps: timed calls (at least 1).
    warmup: untimed calls first; the first compiles a jitted step.
    block: waits until a call's result exists (default: `jax.block_until_ready`).
    clock: seconds, monotonic (a fake one in tests).

  Returns:
    (Timing, the last carry).
  """
  if steps < 1:
    raise ValueError(f'steps must be at least 1, got {steps}')
  block = block or _block_until_ready
  for _ in range(warmup):
    carry = step(carry)
    block(carry)
  seconds = []
  cpu_start, wall_start = cpu_seconds(), clock()
  for _ in range(steps):
    start = clock()
    carry = step(carry)
    block(carry)
    seconds.append(clock() - start)
  timing = Timing(seconds=tuple(seconds), cpu_seconds=cpu_seconds() - cpu_start,
                  wall_seconds=clock() - wall_start, load_avg_1m=os.getloadavg()[0],
                  peak_rss_bytes=peak_rss_bytes())
  return timing, carry


def time_calls(fn: Callable[[], Any], *, repeats: int, warmup: int = 1,
               block: Optional[Callable[[Any], Any]] = None,
               clock: Callable[[], float] = time.perf_counter) -> Timing:
  """`time_steps` for a workload without carried state: `fn()` called `repeats` times."""
  timing, _ = time_steps(lambda _: fn(), None, steps=repeats, warmup=warmup, block=block,
                         clock=clock)
  return timing


def load_warning(load_avg_1m: float, cores: Optional[int] = None) -> Optional[str]:
  """A warning when the load average exceeded one per core (of `cores`, default all the
  machine's), so other work took cores from the timing; None otherwise."""
  cores = cores or os.cpu_count() or 1
  if load_avg_1m <= cores:
    return None
  return (f'load average {load_avg_1m:.2f} on {cores} cores during timing (above one per '
          f'core): other work shared the machine, so these times are slower than its own')


def warn_if_loaded(line: dict, cores: Optional[int] = None, stream=None) -> dict:
  """Adds `warning` to a benchmark's output `line` and says it on stderr when
  `line['load_avg_1m']` was above one per core; returns the line."""
  warning = load_warning(line['load_avg_1m'], cores)
  if warning is not None:
    line['warning'] = warning
    print(f'warning: {warning}', file=stream or sys.stderr, flush=True)
  return line


def process_fields() -> dict:
  """The fields every benchmark line ends with: machine load and this process's peak memory."""
  return {'load_avg_1m': os.getloadavg()[0], 'peak_rss_bytes': peak_rss_bytes()}
