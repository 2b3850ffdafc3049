"""Sizing a block pipeline: per-block times and the projected speed-up.

The slowest stage bounds a pipeline's throughput, so blocks (or units) are
grouped to make the largest group's cost as small as possible; that search is
`bwbpf_jax.splits.balanced_split_points`, re-exported here and as
`parallel.balanced_split_points` for the pipeline and the benchmarks.
"""

import functools
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import jax
import optax

from bwbpf_jax import step as step_lib
from bwbpf_jax.errors import UsageError
from bwbpf_jax.partition import PartitionedModel
# Re-exported: parallel.pipeline and the benchmarks import the split search from here.
from bwbpf_jax.splits import balanced_split_points  # pylint: disable=unused-import


def per_block_step_times(model: PartitionedModel, tx: optax.GradientTransformation,
                         block_states: Sequence[Any], batch: dict, repeats: int = 5, *,
                         clock: Callable[[], float] = time.perf_counter) -> tuple:
  """Median seconds of each block's `step.block_train_step` on one device, after compiling.

  A utility at the edge of the library: it reads a clock and blocks on results.
  Each block is timed alone on block k-1's output for `batch` (the states are
  not changed: nothing is donated and the updates are discarded). Measure with
  the micro-batch the pipeline will use, since per-example cost varies with
  batch size. Feed the result to `projected_pipeline_speedup`, or time a model
  cut at every unit to get per-unit costs for `balanced_split_points` (its
  timings include one auxiliary head per unit).

  Args:
    model, tx: the partitioned network and its optimizer.
    block_states: K states, all on the device to measure on.
    batch: {'image': [B, H, W, C], 'label': [B]}.
    repeats: timed calls per block; the median is returned.
    clock: seconds as a float.

  Returns:
    K floats, seconds per block step.
  """
  if repeats < 1:
    raise UsageError(f'repeats must be at least 1, got {repeats}')
  x, targets, times = batch['image'], step_lib.loss_targets(batch), []
  for block, state in zip(model.blocks, block_states):
    block_step = jax.jit(functools.partial(step_lib.block_train_step, block, tx))
    _, next_x, _ = jax.block_until_ready(block_step(state, x, targets))  # Compiles.
    samples = []
    for _ in range(repeats):
      start = clock()
      jax.block_until_ready(block_step(state, x, targets))
      samples.append(clock() - start)
    times.append(statistics.median(samples))
    x = next_x
  return tuple(times)


def projected_pipeline_speedup(block_times: Sequence[float],
                               num_microbatches: Optional[int] = None) -> float:
  """Speed-up of K pipelined devices over one device running the K blocks in turn.

  One device needs sum_k t_k per micro-batch; in the pipeline's steady state
  each device does one block, so a micro-batch completes every max_k t_k:
  speed-up sum(t) / max(t), which is K only for perfectly balanced blocks. With
  `num_microbatches` M the pipeline's fill and drain are counted too:
  M * sum(t) / (sum(t) + (M - 1) * max(t)). Transfers between devices are
  ignored.
  """
  times = [float(t) for t in block_times]
  if not times or min(times) < 0 or max(times) <= 0:
    raise UsageError(f'block times must be non-negative and not all zero, got {times}')
  total, slowest = sum(times), max(times)
  if num_microbatches is None:
    return total / slowest
  if num_microbatches < 1:
    raise UsageError(f'num_microbatches must be at least 1, got {num_microbatches}')
  return num_microbatches * total / (total + (num_microbatches - 1) * slowest)
