"""Training across devices: data parallel, block parallel (a pipeline), and multi-host.

Data parallel: the batch is sharded over a 1-D mesh axis 'data' and block states
are replicated; the step is `step.train_step` itself, jitted with shardings. The
compiler partitions it, so nothing in the step changes.

Block parallel (bwbpf only): block k lives on device k mod D and runs its own
jitted `step.block_train_step`; activations move to the next block's device with
`jax.device_put`. Because every block input is detached, no gradient ever flows
back across a device boundary, so this pipeline is exact, not an approximation
with stale weights: it computes what the block-wise step computes when fed the
same micro-batches one after another.

Multi-host: `initialize_distributed` starts `jax.distributed`; afterwards a mesh
spans every process's devices and each process feeds only its slice of every
global batch (`data.train_batches(..., process_index, process_count)`).

`per_block_step_times`, `projected_pipeline_speedup` and `balanced_split_points`
size the pipeline: the slowest block bounds its throughput.
"""

import functools
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bwbpf_jax import step as step_lib
from bwbpf_jax.errors import UsageError
from bwbpf_jax.partition import PartitionedModel

DATA_AXIS = 'data'


# ---------------------------------------------------------------- data parallel


def make_mesh(num_devices: Optional[int] = None) -> jax.sharding.Mesh:
  """A 1-D mesh with axis 'data' over the first `num_devices` of `jax.devices()` (all by default).

  The axis is of type Auto (`jax.make_mesh` defaults to Explicit): the compiler
  partitions the unchanged single-device step from the shardings given to jit,
  so calls need no `jax.set_mesh` context. In a multi-process run
  `jax.devices()` lists every process's devices and the default mesh is global;
  a smaller one must still give every process a device.
  """
  available = len(jax.devices())
  num_devices = available if num_devices is None else int(num_devices)
  if not 1 <= num_devices <= available:
    raise UsageError(f'cannot build a mesh of {num_devices} devices: '
                     f'{available} available')
  return jax.make_mesh((num_devices,), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:num_devices])


def data_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading (batch) axis split over 'data', other axes whole on every device."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """A full copy on every device of the mesh."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _check_divisible(global_batch_size: int, mesh: jax.sharding.Mesh):
  if global_batch_size % mesh.size:
    raise UsageError(f'the global batch of {global_batch_size} examples cannot be split '
                     f'evenly over {mesh.size} devices; choose a batch size that is a '
                     f'multiple of {mesh.size}')


def shard_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Places a host batch on the mesh, split along axis 0.

  Every process passes its own local slice ([B / process_count, ...] per leaf,
  as `data.train_batches` yields it); the result is one global array of
  [B, ...] per leaf. With one process the local slice is the whole batch.
  Which rows of the global array a process's slice becomes depends on where its
  devices sit in the mesh; the step's losses are means and BatchNorm statistics
  are global, so the order of examples within the global batch does not matter.

  Raises:
    UsageError: the global batch size is not a multiple of the mesh size.
  """
  sharding = data_sharding(mesh)
  local_sizes = {np.shape(x)[0] for x in jax.tree_util.tree_leaves(batch)}
  if len(local_sizes) != 1:
    raise UsageError(f'batch leaves disagree on the batch size: {sorted(local_sizes)}')
  _check_divisible(local_sizes.pop() * jax.process_count(), mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def replicate(tree, mesh: jax.sharding.Mesh):
  """A full copy of every leaf of `tree` on every device of the mesh.

  With several processes every process must pass the same values (the same
  seed gives the same initial block states); they are copied from host memory,
  which is fine for the one-time placement of states.
  """
  sharding = replicated_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree_util.tree_map(put, tree)


def _checked_batch_size(jitted, mesh):
  """Wraps a jitted (states, batch) function with a UsageError for indivisible batches."""

  @functools.wraps(jitted)
  def fn(block_states, batch):
    sizes = {np.shape(x)[0] for x in jax.tree_util.tree_leaves(batch)}
    for size in sizes:
      _check_divisible(size, mesh)
    return jitted(block_states, batch)
  fn.jitted = jitted
  return fn


def make_data_parallel_train_step(model: PartitionedModel, tx: optax.GradientTransformation,
                                  mesh: jax.sharding.Mesh, *, skip_nonfinite: bool = False,
                                  donate: bool = True) -> Callable:
  """`step.train_step` jitted over `mesh`: (replicated states, sharded batch) -> replicated.

  Nothing in the step is specific to devices. Under jit's global semantics the
  loss is the mean over the whole global batch, so the compiler's partitioned
  gradient is the average of the devices' gradients (one all-reduce per step),
  and BatchNorm's batch statistics are taken over the global batch, not per
  device. The result therefore equals the single-device step on the same global
  batch, up to the order of floating-point sums; every mode works.

  Block states should come from `replicate` and batches from `shard_batch`
  (host numpy batches are accepted too); the old states are donated.

  Returns:
    step(block_states, batch) -> (block_states, metrics), as `make_train_step`.
    `step.jitted` is the underlying jitted function (for `.lower`).
  """
  fn = functools.partial(step_lib.train_step, model, tx, skip_nonfinite=skip_nonfinite)
  replicated = replicated_sharding(mesh)
  jitted = jax.jit(fn, in_shardings=(replicated, data_sharding(mesh)),
                   out_shardings=(replicated, replicated),
                   donate_argnums=(0,) if donate else ())
  return _checked_batch_size(jitted, mesh)


def make_data_parallel_blockwise_train_step(model: PartitionedModel,
                                            tx: optax.GradientTransformation,
                                            mesh: jax.sharding.Mesh, *,
                                            skip_nonfinite: bool = False,
                                            donate: bool = True) -> Callable:
  """The block-wise bwbpf step (`step.make_blockwise_train_step`) sharded over `mesh`.

  Each block's `step.block_train_step` is jitted with its state replicated and
  its input, labels and output features split along the batch, so, as on one
  device, only one block's activations are alive at a time, now on every
  device. The same global-batch semantics as `make_data_parallel_train_step`
  hold (mean loss over the global batch, global BatchNorm statistics).

  Raises:
    UsageError: the model is not in bwbpf mode.
  """
  if model.mode != 'bwbpf':
    raise UsageError(f'the block-wise step needs isolated blocks (mode bwbpf), '
                     f'not mode {model.mode!r}: in that mode gradients cross blocks')
  replicated, split = replicated_sharding(mesh), data_sharding(mesh)
  block_steps = [
      jax.jit(functools.partial(step_lib.block_train_step, block, tx,
                                skip_nonfinite=skip_nonfinite),
              in_shardings=(replicated, split, split),
              out_shardings=(replicated, split, replicated),
              donate_argnums=(0,) if donate else ())
      for block in model.blocks]
  return _checked_batch_size(step_lib.chain_block_steps(block_steps), mesh)


def make_data_parallel_eval_step(model: PartitionedModel, mesh: jax.sharding.Mesh) -> Callable:
  """`step.eval_step` jitted over `mesh`: sums over the global batch, replicated.

  Its 'correct', 'loss' and 'count' are sums over all devices' examples (the
  padding 'mask' is sharded with the batch), so batches and processes add up.
  """
  replicated = replicated_sharding(mesh)
  jitted = jax.jit(functools.partial(step_lib.eval_step, model),
                   in_shardings=(replicated, data_sharding(mesh)), out_shardings=replicated)
  return _checked_batch_size(jitted, mesh)


# ---------------------------------------------------------------- block parallel


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


def split_microbatches(batch: dict, num_microbatches: int) -> list:
  """[B, ...] leaves -> `num_microbatches` dicts of [B / M, ...] leaves, in order."""
  sizes = {np.shape(x)[0] for x in jax.tree_util.tree_leaves(batch)}
  if len(sizes) != 1:
    raise UsageError(f'batch leaves disagree on the batch size: {sorted(sizes)}')
  size = sizes.pop()
  if num_microbatches < 1 or size % num_microbatches:
    raise UsageError(f'a batch of {size} examples cannot be split into {num_microbatches} '
                     f'equal micro-batches; choose a batch size that is a multiple of '
                     f'the number of micro-batches')
  micro = size // num_microbatches
  return [jax.tree_util.tree_map(lambda x, m=m: x[m * micro:(m + 1) * micro], batch)
          for m in range(num_microbatches)]


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
  if model.mode != 'bwbpf':
    raise UsageError(f'block-parallel training needs isolated blocks (mode bwbpf), '
                     f'not mode {model.mode!r}: in that mode gradients cross blocks')
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


# ---------------------------------------------------------------- multi-host


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, **kwargs) -> tuple:
  """Joins this process to a multi-process JAX run; call before any other JAX work.

  With explicit arguments they are passed to `jax.distributed.initialize`
  (missing ones are detected from the cluster, as JAX does). With none, JAX
  detects a TPU pod, SLURM, Open MPI or Kubernetes job (or reads
  JAX_COORDINATOR_ADDRESS); where it finds none this is one process and nothing
  happens. `num_processes=1` is a no-op too, as is a second call.
  CPU processes exchange data with gloo, JAX's default CPU collectives.

  Args:
    coordinator_address: 'host:port' of process 0's coordinator service.
    num_processes: processes in the run.
    process_id: this process's index in [0, num_processes).
    **kwargs: passed on (e.g. local_device_ids, initialization_timeout).

  Returns:
    (process_index, process_count) of this process.
  """
  if jax.distributed.is_initialized() or num_processes == 1:
    return process_info()
  if (coordinator_address, num_processes, process_id) == (None, None, None):
    try:
      jax.distributed.initialize(**kwargs)
    except ValueError as error:
      # JAX's words for "no cluster detected and no coordinator given": one process.
      if 'coordinator_address' not in str(error):
        raise
  else:
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
  return process_info()


def process_info() -> tuple:
  """(process_index, process_count): which slice of each global batch this process feeds."""
  return jax.process_index(), jax.process_count()


# ---------------------------------------------------------------- sizing the pipeline


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


def balanced_split_points(unit_costs: Sequence[float], num_blocks: int) -> tuple:
  """Split points cutting units into `num_blocks` contiguous blocks with the smallest largest cost.

  The pipeline runs at the pace of its costliest block, so the cut minimises
  max_k sum(unit_costs in block k) (a dynamic programme over prefixes, O(K n^2)).
  Among the optimal cuts the one with the earliest split points is returned, so
  ties go the same way every time. Costs are the units' own (include the stem's
  in unit 0's and the classifier's in the last unit's if they matter).

  Args:
    unit_costs: n non-negative costs, e.g. seconds or FLOPs per unit.
    num_blocks: K, between 1 and n.

  Returns:
    K-1 increasing unit indices where blocks 1..K-1 start (as `build_model`'s
    `split_points`).
  """
  costs = [float(c) for c in unit_costs]
  num_units = len(costs)
  if not 1 <= num_blocks <= num_units:
    raise UsageError(f'cannot cut {num_units} units into {num_blocks} blocks')
  if any(not np.isfinite(c) or c < 0 for c in costs):
    raise UsageError(f'unit costs must be finite and non-negative, got {costs}')
  prefix = np.concatenate([[0.0], np.cumsum(costs)]).tolist()
  cost = lambda start, stop: prefix[stop] - prefix[start]
  # largest[k][i]: smallest possible largest block when units i..n-1 form k blocks.
  largest = [[float('inf')] * (num_units + 1) for _ in range(num_blocks + 1)]
  largest[0][num_units] = 0.0
  for k in range(1, num_blocks + 1):
    for i in range(num_units - k, -1, -1):
      largest[k][i] = min(max(cost(i, j), largest[k - 1][j])
                          for j in range(i + 1, num_units - k + 2))
  best = largest[num_blocks][0]
  points, start = [], 0
  for k in range(num_blocks, 1, -1):
    start = next(j for j in range(start + 1, num_units - k + 2)
                 if cost(start, j) <= best and largest[k - 1][j] <= best)
    points.append(start)
  return tuple(points)
