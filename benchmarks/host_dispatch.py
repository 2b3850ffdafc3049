"""The earlier block pipeline, dispatched from the host in one process: block k on device k mod D.

The host loops over pipeline ticks and dispatches each block's jitted
`step.block_train_step` on its block's device, copying activations between
devices with `jax.device_put`. It was the library's first block-parallel
engine; the SPMD stage pipeline (`bwbpf_jax.parallel.pipeline`) replaced it:
that one spans processes and hosts, keeps the pipeline full between steps and
holds each stage on its own devices. It lives here only as the benchmark's
point of comparison (`python -m benchmarks.parallel_bench --configs=host_dispatch`):
on 2 CPU cores (ResNet-18 x0.25, batch 128, K=2, M=4) it ran 260-272 images/s,
against 333-345 for the stage pipeline on two pinned processes at the cut
where its stages balance (docs/results.md); its own speed there comes from
XLA:CPU running each kernel on both cores (its fake devices share one thread
pool), not from blocks running apart.
"""

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bwbpf_jax import step as step_lib
from bwbpf_jax.parallel import split_microbatches
from bwbpf_jax.errors import UsageError
from bwbpf_jax.partition import PartitionedModel


def placement(model: PartitionedModel, devices: Optional[Sequence[Any]] = None) -> tuple:
  """The device of each block: block k on devices[k mod D] (default: this process's devices).

  With K <= D every block has a device to itself; with K > D blocks share
  devices round-robin.
  """
  devices = tuple(jax.local_devices() if devices is None else devices)
  if not devices:
    raise UsageError('block placement needs at least one device')
  return tuple(devices[k % len(devices)] for k in range(model.num_blocks))


def place_block_states(block_states: Sequence[Any], block_devices: Sequence[Any]) -> tuple:
  """Commits block k's state to block_devices[k] (see `placement`)."""
  if len(block_states) != len(block_devices):
    raise UsageError(f'{len(block_states)} block states for {len(block_devices)} devices')
  return tuple(jax.device_put(state, device)
               for state, device in zip(block_states, block_devices))


def gather_block_states(block_states: Sequence[Any], device: Optional[Any] = None) -> tuple:
  """All block states on one device (default: the first local one), e.g. to evaluate or save."""
  device = jax.local_devices()[0] if device is None else device
  return tuple(jax.device_put(state, device) for state in block_states)


def make_block_parallel_train_step(model: PartitionedModel, tx: optax.GradientTransformation,
                                   devices: Optional[Sequence[Any]] = None, *,
                                   num_microbatches: int = 4, skip_nonfinite: bool = False,
                                   donate: bool = True) -> Callable:
  """A bwbpf step pipelined over devices: one block per device, M micro-batches in flight.

  The global batch [B, ...] is cut into M micro-batches of B / M examples, and
  each micro-batch is one optimizer step for every block, in order 0..M-1. At
  pipeline tick t, block k processes micro-batch t - k: while block k updates
  on micro-batch m, block k-1 already updates on m + 1. The host only
  dispatches; each block's jitted `step.block_train_step` runs on the device
  holding its (committed) state, activations are copied to the next block's
  device with `jax.device_put`, and asynchronous dispatch lets the devices run
  at the same time. A step is M + K - 1 ticks, each as long as the slowest
  block's step on a micro-batch.

  Every micro-batch is an optimizer step, so optimizer schedules advance M
  steps per global batch: build them for M times the number of batches.

  No gradient crosses a block boundary, so block k's update on micro-batch m
  depends only on its own state and block k-1's forward output on m, which
  block k-1 computed with its weights after micro-batches 0..m-1: exactly the
  synchronous block-wise (or fused) step applied to micro-batches 0..M-1 in
  turn. Nothing is stale.

  Returns:
    step(block_states, batch) -> (block_states, metrics). States are returned
    on their blocks' devices (states on other devices are moved there first).
    Metrics 'loss', 'accuracy', 'skipped' are [K] means over the M micro-batches
    (so 'skipped' is the fraction of micro-batches a block skipped), on the
    first block's device.

  Raises:
    UsageError: the model is not in bwbpf mode (gradients would cross devices).
  """
  step_lib.require_isolated(model, 'block-parallel training')
  block_devices = placement(model, devices)
  block_steps = [
      jax.jit(functools.partial(step_lib.block_train_step, block, tx,
                                skip_nonfinite=skip_nonfinite),
              donate_argnums=(0,) if donate else ())
      for block in model.blocks]
  num_blocks = model.num_blocks

  def step(block_states, batch):
    microbatches = split_microbatches(batch, num_microbatches)
    states = list(place_block_states(block_states, block_devices))
    # previous[k]: block k's output of the previous tick (micro-batch tick-1-k), for block k+1.
    previous = [None] * num_blocks
    metrics = [[] for _ in range(num_blocks)]
    for tick in range(num_microbatches + num_blocks - 1):
      current = [None] * num_blocks
      for k in range(num_blocks):
        m = tick - k
        if not 0 <= m < num_microbatches:
          continue
        x = microbatches[m]['image'] if k == 0 else previous[k - 1]
        x = jax.device_put(x, block_devices[k])
        targets = jax.device_put(step_lib.loss_targets(microbatches[m]), block_devices[k])
        states[k], current[k], block_metrics = block_steps[k](states[k], x, targets)
        metrics[k].append(block_metrics)
      previous = current
    means = [jax.tree_util.tree_map(lambda *values: jnp.mean(jnp.stack(values)), *block)
             for block in metrics]
    means = jax.device_put(means, block_devices[0])
    return tuple(states), {name: jnp.stack([m[name] for m in means]) for name in means[0]}
  return step


