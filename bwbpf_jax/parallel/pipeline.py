"""Block parallelism as one SPMD program: a stage pipeline over a ('data', 'stage') mesh.

The K blocks are grouped into S contiguous stages; stage s lives on mesh column
s and is replicated over the D rows of axis 'data', which split every
micro-batch (D x S devices, every process's). The train step is one `jax.jit`
of a `jax.shard_map`: at every tick each device

1. runs its own stage (`lax.switch` on `lax.axis_index('stage')`): for each of
   the stage's blocks, `step.block_gradients` (loss, gradient, new batch
   statistics) on its current micro-batch, one block after another;
2. averages gradients, losses and the new running batch statistics over
   'data', outside the switch;
3. applies its blocks' own optax updates (`step.apply_block_update`, a second
   switch), unless the slot is a bubble;
4. passes its detached output, labels and a valid flag to the next stage with
   `lax.ppermute`.

No collective runs inside a conditional by default. A collective inside a
`lax.switch` branch that differs from device to device is where accelerator
backends hang or miscompile (the JAX and XLA issue threads on cond with
all-reduce; a cond on `axis_index` gave a silently wrong gradient,
jax-ml/jax#40823), so BatchNorm normalises with each data row's own statistics
(`batch_norm='rows'`, what PyTorch's DistributedDataParallel does without
SyncBatchNorm); the running statistics are averaged over the rows after the
switch, so every row holds the same state. `batch_norm='global'` takes the
statistics over all rows inside the switch (the data-parallel step's
semantics) at that risk. With one data row the two are the same computation.

Blocks differ in parameter and activation shapes, while an SPMD program needs
one shape per array. Each stage's states (params, batch_stats, opt_state of
its blocks) are packed into one float32 vector padded to the largest stage's
length, stacked [S, L] and sharded on 'stage': a device holds only its stage's
state, and nothing (evaluation, checkpoints, results) ever gathers them onto
one device. Boundary activations travel flattened, padded to the largest
boundary [b, A]. Gradients are reduced over 'data' at the largest stage's
length too: one program, one shape (`StagePlan.padding_overhead`; with one data
row the reduction is absent).

Inputs reach stage 0 only. A batch's M micro-batches are laid out over the
stage axis ([S * c, b, ...] with c = ceil(M / S), sharded on 'stage' and
'data'): each device holds c of them, so a process copies to its devices only
their share. At the start of a step each later stage sends its micro-batches to
stage 0 in one message (`lax.ppermute`, outside the loop over ticks), and one
loop runs every tick: XLA compiles the tick, which holds every stage's blocks,
once, where a loop per owner of micro-batches compiled it up to S times (the
step compiles in 0.55-0.86x the time, evaluation in 0.5-0.7x, on XLA:CPU:
docs/results.md). The price: for a step's length stage 0 holds its row's M
micro-batches of images, not c, which is small beside a stage's activations.

Because every block input is detached, block k's update on micro-batch m
depends only on its own state and block k-1's output on m, which block k-1
computed with its weights after micro-batches 0..m-1, exactly as the
synchronous block-wise step on the same micro-batch sequence. Nothing is stale.

The pipeline stays full across steps: its in-flight activations are part of
`PipelineState`, so step n's micro-batches enter while step n-1's last ones
are still in later stages, and the S-1 ticks of fill and drain are paid once
per `drain` (before evaluation and checkpoints), not per step. Bubble slots
(before the pipeline is full, and while draining) are masked: they change no
state and no optimizer step count. A micro-batch whose labels are
`EMPTY_LABEL` is such a bubble: `drain` steps on batches of them, so it runs
the step's own program and no second one is compiled. Evaluation (`evaluate`)
is pipelined the same way, each stage running its blocks' heads in inference
mode.

Per-block metrics are summed per stage on its devices and gathered once per
call (a few floats per block), outside the switch.
"""

import contextlib
import dataclasses
import functools
import hashlib
import math
from typing import Any, Optional, Sequence

import flax
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from bwbpf_jax import state as state_lib
from bwbpf_jax import step as step_lib
from bwbpf_jax.errors import UsageError
from bwbpf_jax.models import layers
from bwbpf_jax.parallel.data_parallel import DATA_AXIS
from bwbpf_jax.parallel.sizing import balanced_split_points
from bwbpf_jax.partition import PartitionedModel
from bwbpf_jax.state import BlockState

STAGE_AXIS = 'stage'
# How BatchNorm takes its batch statistics when a micro-batch is split over data rows.
BATCH_NORM_STATISTICS = ('rows', 'global')
_METRICS = ('loss', 'accuracy', 'skipped')
# The label of an example that is not there: a micro-batch of them is a bubble (`drain`).
EMPTY_LABEL = -1
_EVAL_METRICS = ('correct', 'loss')
_spec = jax.sharding.PartitionSpec


# ---------------------------------------------------------------- mesh and layout


def make_pipeline_mesh(num_stages: int, devices: Optional[Sequence[Any]] = None, *,
                       max_stages: Optional[int] = None) -> jax.sharding.Mesh:
  """A ('data', 'stage') mesh of every device (every process's): D = devices / stages rows.

  Built with `jax.make_mesh`, which orders devices for the hardware's topology
  (neighbouring stages on neighbouring chips where it can). Axes are Auto, so
  the shardings given to jit decide placement. `max_stages` (the model's K)
  only bounds the stage counts a refusal suggests.

  Raises:
    UsageError: fewer devices than stages, or a count that is not a multiple of
      them; it names the `num_stages` that work on these devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_stages < 1 or len(devices) % num_stages:
    raise UsageError(_stage_count_refusal(num_stages, len(devices), max_stages))
  shape = (len(devices) // num_stages, num_stages)
  auto = (jax.sharding.AxisType.Auto,) * 2
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, (DATA_AXIS, STAGE_AXIS), axis_types=auto, devices=devices)
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), (DATA_AXIS, STAGE_AXIS),
                           axis_types=auto)


def workable_stage_counts(num_devices: int, max_stages: Optional[int] = None) -> tuple:
  """Stage counts a mesh of `num_devices` takes (divisors, at most `max_stages`), most first."""
  limit = num_devices if max_stages is None else min(num_devices, max_stages)
  return tuple(s for s in range(limit, 0, -1) if num_devices % s == 0)


def _stage_count_refusal(num_stages: int, num_devices: int, max_stages: Optional[int]) -> str:
  workable = workable_stage_counts(num_devices, max_stages)
  others = f' (or {", ".join(map(str, workable[1:]))})' if len(workable) > 1 else ''
  message = (f'num_stages={num_stages} needs a multiple of {num_stages} devices (one stage '
             f'each, times the data rows), found {num_devices}; use '
             f'num_stages={workable[0]}{others}')
  if num_devices < num_stages:
    message += (f', or run on {num_stages} accelerators or processes (on CPU, '
                f'XLA_FLAGS=--xla_force_host_platform_device_count={num_stages} emulates '
                f'them, for correctness, not speed)')
  return message


def process_feed_slice(mesh: jax.sharding.Mesh) -> tuple:
  """(index, count): this process feeds slice `index` of `count` equal slices of each batch.

  A process feeds the 'data' rows its devices hold. Where every process holds
  whole rows of its own (the usual case: data rows split over hosts), the
  slices are disjoint; where all processes share the rows (one data row whose
  stages span hosts), every process feeds the whole batch (and places only
  the micro-batches its devices hold).

  Raises:
    UsageError: the processes' rows neither partition the mesh evenly nor coincide.
  """
  rows = sorted({d for (d, _), device in np.ndenumerate(mesh.devices)
                 if device.process_index == jax.process_index()})
  num_rows = mesh.devices.shape[0]
  if rows == list(range(rows[0], rows[0] + len(rows))) and rows[0] % len(rows) == 0:
    return rows[0] // len(rows), num_rows // len(rows)
  raise UsageError(f'process {jax.process_index()} holds data rows {rows} of {num_rows}: '
                   f'the mesh must give each process whole, contiguous rows')


def _to_float32_exactly(leaf):
  """A leaf as float32 values that `_from_float32` turns back into the same bits.

  uint32 leaves (PRNG key data) are bit-cast; narrower floats (bfloat16,
  float16) and integers are converted, which float32 holds exactly, int32
  counters (optax's step counts) below 2**24 (as packed since the pipeline's
  first checkpoints, which stay readable).
  """
  leaf = jnp.asarray(leaf)
  if leaf.dtype == jnp.uint32:
    return jax.lax.bitcast_convert_type(leaf, jnp.float32)
  return leaf.astype(jnp.float32)


def _from_float32(values, dtype):
  if dtype == jnp.dtype(jnp.uint32):
    if isinstance(values, np.ndarray):
      return values.astype(np.float32).view(dtype)
    return jax.lax.bitcast_convert_type(values, dtype)
  return values.astype(dtype)


@dataclasses.dataclass(frozen=True)
class _Packing:
  """Packs a pytree of arrays into one float32 vector of a given length, and back.

  Every value survives the round trip exactly, whatever the network keeps:
  float32 leaves are copied, uint32 bit-cast, int32 (optax step counts, exact
  below 2**24) and narrower floats and integers (bfloat16 or float16
  parameters, int8 counters) widened. Only 64-bit leaves, which float32 cannot
  hold, are refused. `unpack` works on jax and numpy arrays alike (the host
  unpacks checkpoints' shards).
  """
  treedef: Any
  shapes: tuple
  dtypes: tuple

  @classmethod
  def of(cls, tree) -> '_Packing':
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    dtypes = tuple(jnp.dtype(leaf.dtype) for leaf in leaves)
    wide = sorted({str(dtype) for dtype in dtypes if dtype.itemsize > 4})
    if wide:
      raise UsageError(f'the stage pipeline packs states into float32; it cannot hold '
                       f'{", ".join(wide)} leaves exactly')
    return cls(treedef, tuple(tuple(leaf.shape) for leaf in leaves), dtypes)

  @property
  def size(self) -> int:
    return sum(math.prod(shape) for shape in self.shapes)

  def pack(self, tree, length: int) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    flat = [jnp.ravel(_to_float32_exactly(leaf)) for leaf in leaves]
    flat = jnp.concatenate(flat) if flat else jnp.zeros((0,), jnp.float32)
    return jnp.pad(flat, (0, length - self.size))

  def unpack(self, vector):
    leaves, offset = [], 0
    for shape, dtype in zip(self.shapes, self.dtypes):
      size = math.prod(shape)
      leaves.append(_from_float32(vector[offset:offset + size].reshape(shape), dtype))
      offset += size
    return jax.tree_util.tree_unflatten(self.treedef, leaves)


@dataclasses.dataclass(frozen=True, eq=False)
class StagePlan:
  """Which blocks each stage runs, and how its state and boundary activations are packed.

  Attributes:
    stage_blocks: per stage, the indices of its blocks (contiguous, in order; block
      k is called block k + 1 wherever a person reads it).
    state_packings: per stage, the packing of its blocks' `BlockState`s.
    grad_packings: per stage, the packing of its blocks' parameters (gradients).
    stats_packings: per stage, the packing of its blocks' batch statistics (what a
      forward pass changes besides the gradient).
    input_shapes: per stage, the shape of one example's input ([H, W, C]).
    activation_dtype: dtype of the activations passed between stages.
  """
  stage_blocks: tuple
  state_packings: tuple
  grad_packings: tuple
  stats_packings: tuple
  input_shapes: tuple
  activation_dtype: Any

  @property
  def num_stages(self) -> int:
    return len(self.stage_blocks)

  @property
  def state_length(self) -> int:
    """L: floats per device for its stage's state (the largest stage's)."""
    return max(p.size for p in self.state_packings)

  @property
  def grad_length(self) -> int:
    return max(p.size for p in self.grad_packings)

  @property
  def stats_length(self) -> int:
    return max(p.size for p in self.stats_packings)

  @property
  def activation_length(self) -> int:
    """A: floats per example of the largest boundary activation (at least 1)."""
    return max([1] + [math.prod(shape) for shape in self.input_shapes[1:]])

  @property
  def blocks_per_stage(self) -> int:
    return max(len(blocks) for blocks in self.stage_blocks)

  @property
  def block_slots(self) -> tuple:
    """(stage, position in the stage) of every block, in block order."""
    return tuple((s, j) for s, blocks in enumerate(self.stage_blocks)
                 for j in range(len(blocks)))

  def padding_overhead(self) -> float:
    """State memory of all devices of one data row over that of the unpadded states, minus 1."""
    return self.num_stages * self.state_length / sum(p.size for p in self.state_packings) - 1


def block_costs(model: PartitionedModel, tx: optax.GradientTransformation,
                input_shape) -> tuple:
  """FLOPs of each block's training step on one example, from XLA's cost analysis.

  Used to balance stages; lowering needs no compilation. Where the backend
  gives no count, every block costs the same.
  """
  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  labels = jax.ShapeDtypeStruct((1,), jnp.int32)
  states = state_lib.abstract_block_states(model, tx, input_shape)
  costs = []
  for block, state in zip(model.blocks, states):
    fn = functools.partial(step_lib.block_train_step, block, tx)
    with layers.xla_convolutions():
      lowered = jax.jit(fn).lower(state, x, labels)
    analysis = lowered.cost_analysis() or {}
    if isinstance(analysis, (list, tuple)):
      analysis = analysis[0] if analysis else {}
    costs.append(float(analysis.get('flops', 1.0)))
    x = jax.eval_shape(fn, state, x, labels)[1]
  return tuple(costs)


def make_stage_plan(model: PartitionedModel, tx: optax.GradientTransformation, input_shape,
                    num_stages: Optional[int] = None,
                    costs: Optional[Sequence[float]] = None) -> StagePlan:
  """Groups the K blocks into `num_stages` stages (default K) and lays out their packing.

  With fewer stages than blocks, contiguous blocks are grouped so that the
  costliest stage is as cheap as possible (`balanced_split_points` over
  `costs`, by default `block_costs`).

  Args:
    model: a bwbpf model (in other modes gradients cross blocks).
    tx: the optimizer; its state is part of each stage's packed state.
    input_shape: one example's shape [H, W, C].
    num_stages: S, between 1 and K.
    costs: K per-block costs to balance, overriding `block_costs`.

  Raises:
    UsageError: the mode is not bwbpf, or S is not between 1 and K.
  """
  step_lib.require_isolated(model, 'block-parallel training')
  if step_lib.needs_pixels(model):
    raise UsageError('the stage pipeline passes labels between stages, not the images a '
                     'reconstruction loss needs; train it data-parallel or on one device')
  num_blocks = model.num_blocks
  num_stages = num_blocks if num_stages is None else int(num_stages)
  if not 1 <= num_stages <= num_blocks:
    raise UsageError(f'num_stages={num_stages} is not between 1 and the model\'s '
                     f'{num_blocks} blocks')
  if num_stages == num_blocks:
    starts = tuple(range(1, num_blocks))
  else:
    costs = block_costs(model, tx, input_shape) if costs is None else costs
    starts = balanced_split_points(costs, num_stages)
  bounds = (0,) + tuple(starts) + (num_blocks,)
  stage_blocks = tuple(tuple(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:]))

  states = state_lib.abstract_block_states(model, tx, input_shape)
  block_inputs, x = [], jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  for block, state in zip(model.blocks, states):
    block_inputs.append(x)
    x = jax.eval_shape(
        lambda s, v, b=block: b.apply({'params': s.params, 'batch_stats': s.batch_stats}, v,
                                      train=False)[0], state, x)
  packing = lambda part: tuple(_Packing.of(tuple(part(states[k]) for k in blocks))
                               for blocks in stage_blocks)
  return StagePlan(
      stage_blocks=stage_blocks,
      state_packings=packing(lambda state: state),
      grad_packings=packing(lambda state: state.params),
      stats_packings=packing(lambda state: state.batch_stats),
      input_shapes=tuple(tuple(block_inputs[blocks[0]].shape[1:]) for blocks in stage_blocks),
      activation_dtype=(block_inputs[1].dtype if num_blocks > 1 else jnp.float32))


# ---------------------------------------------------------------- state


@flax.struct.dataclass
class PipelineState:
  """Everything the pipeline carries from step to step; a pytree of global arrays.

  Attributes:
    stages: [S, L] float32, stage s's packed block states (sharded on 'stage').
    activations: [S, b, A], the input stage s takes at its next tick (its
      predecessor's output), b the micro-batch size (sharded on 'stage' and 'data').
    labels: [S, b] int32, the labels travelling with `activations`.
    valid: [S, b] bool, whether stage s's next input is a real micro-batch (the same
      for every example: it travels with them, in the same message).
  """
  stages: jax.Array
  activations: jax.Array
  labels: jax.Array
  valid: jax.Array


def _state_shardings(mesh) -> PipelineState:
  named = lambda *axes: jax.sharding.NamedSharding(mesh, _spec(*axes))
  return PipelineState(stages=named(STAGE_AXIS), activations=named(STAGE_AXIS, DATA_AXIS),
                       labels=named(STAGE_AXIS, DATA_AXIS), valid=named(STAGE_AXIS, DATA_AXIS))


def _put_global(host: np.ndarray, sharding) -> jax.Array:
  """A global array from a host copy of which each process reads the parts it places."""
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _varying(tree, axes: tuple):
  """Marks every leaf as varying over `axes` (shard_map's replication types).

  Branches of a `lax.switch` must agree on which mesh axes their results vary
  over; a constant (a stage that emits no activation) varies over none.
  """
  def cast(x):
    missing = tuple(a for a in axes if a not in jax.typeof(x).mat.varying)
    return lax.pcast(x, missing, to='varying') if missing else x
  return jax.tree_util.tree_map(cast, tree)


def _stage_only(tree):
  return _varying(tree, (STAGE_AXIS,))


def _permute_as_one(tree, perm):
  """`lax.ppermute` of a pytree of arrays ([n, ...] with one n; scalars too) as one message.

  Each collective is a synchronisation between devices, whose latency (a
  wake-up, a network round trip) does not shrink with its size; so the leaves
  travel as the columns of one float32 [b, n] array when they are float32, or
  integers and flags that float32 holds exactly (labels below 2**24). Other
  dtypes (bfloat16 activations, whose bytes would double) are sent leaf by leaf.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  if any(leaf.dtype not in (jnp.float32, jnp.int32, jnp.bool_) for leaf in leaves):
    return lax.ppermute(tree, STAGE_AXIS, perm)
  rows = max(leaf.shape[0] for leaf in leaves if leaf.ndim)
  columns = [jnp.broadcast_to(leaf, (rows,)) if leaf.ndim == 0 else leaf for leaf in leaves]
  columns = [c.reshape(rows, -1).astype(jnp.float32) for c in columns]
  message = lax.ppermute(jnp.concatenate(columns, axis=1), STAGE_AXIS, perm)
  received, offset = [], 0
  for leaf, column in zip(leaves, columns):
    part = message[:, offset:offset + column.shape[1]]
    offset += column.shape[1]
    part = part[0, 0] if leaf.ndim == 0 else part.reshape(leaf.shape)
    received.append(part.astype(leaf.dtype) if leaf.dtype != jnp.bool_ else part > 0.5)
  return jax.tree_util.tree_unflatten(treedef, received)


def _gather_over_stages(tree):
  """Every stage's value of each leaf, stacked [S, ...] and the same on every device.

  A sum of one-hot rows (an all-reduce of a few floats per block), which
  shard_map's replication check knows to be replicated, unlike `lax.all_gather`.
  """
  stage = lax.axis_index(STAGE_AXIS)
  num_stages = lax.axis_size(STAGE_AXIS)

  def gather(x):
    rows = jnp.zeros((num_stages,) + x.shape, x.dtype).at[stage].set(x)
    return lax.psum(rows, STAGE_AXIS)
  return jax.tree_util.tree_map(gather, tree)


# ---------------------------------------------------------------- the pipeline


class StagePipeline:
  """The jitted stage-pipeline functions for one model, optimizer, plan and mesh.

  `init` packs block states into an empty pipeline, `shard_batch` lays a batch
  out as M micro-batches over the stages, `step` trains on one batch, `drain`
  finishes the micro-batches still in flight, `evaluate` runs every head on a
  batch (drain first), `host_block_states` unpacks the states this process
  holds. All jitted functions are pure functions of their arguments; this
  object only holds what is fixed for a run.
  """

  def __init__(self, model: PartitionedModel, tx: optax.GradientTransformation,
               plan: StagePlan, mesh: jax.sharding.Mesh, *, num_microbatches: int,
               global_batch_size: int, skip_nonfinite: bool = False, donate: bool = True,
               batch_norm: str = 'rows'):
    if tuple(mesh.axis_names) != (DATA_AXIS, STAGE_AXIS):
      raise UsageError(f'the stage pipeline needs a (data, stage) mesh, got {mesh.axis_names}')
    if mesh.shape[STAGE_AXIS] != plan.num_stages:
      raise UsageError(f'the mesh has {mesh.shape[STAGE_AXIS]} stages, the plan '
                       f'{plan.num_stages}')
    if batch_norm not in BATCH_NORM_STATISTICS:
      raise UsageError(f'batch_norm={batch_norm} is not one of '
                       f'{", ".join(BATCH_NORM_STATISTICS)}')
    divisor = num_microbatches * mesh.shape[DATA_AXIS]
    if num_microbatches < 1 or global_batch_size % divisor:
      raise UsageError(f'global_batch_size={global_batch_size} cannot be split into '
                       f'num_microbatches={num_microbatches} equal micro-batches over '
                       f'{mesh.shape[DATA_AXIS]} data-parallel rows; use a multiple of '
                       f'{divisor}')
    if mesh.shape[DATA_AXIS] > 1 and any(b.loss.kind == 'supcon' for b in model.blocks):
      # Each row would pair only its own share of the micro-batch: a different loss.
      raise UsageError(f'the supervised contrastive loss pairs the examples of a whole '
                       f'micro-batch, which the stage pipeline splits over '
                       f'{mesh.shape[DATA_AXIS]} data rows; use one row (as many stages as '
                       f'devices) or train it data-parallel')
    self.model, self.tx, self.plan, self.mesh = model, tx, plan, mesh
    self.num_microbatches = num_microbatches
    self.batch_norm = batch_norm
    self.num_rows = mesh.shape[DATA_AXIS]
    # Micro-batches each stage's devices hold of a batch: c = ceil(M / S).
    self.feed_slots = -(-num_microbatches // plan.num_stages)
    self.feed_index, feed_count = process_feed_slice(mesh)
    # Data rows whose share of each batch this process feeds (all of them in one process).
    self.rows_fed = self.num_rows // feed_count
    self.microbatch_size = global_batch_size // num_microbatches
    self.skip_nonfinite = skip_nonfinite
    self.shardings = _state_shardings(mesh)
    self.batch_sharding = jax.sharding.NamedSharding(mesh, _spec(STAGE_AXIS, DATA_AXIS))
    replicated = jax.sharding.NamedSharding(mesh, _spec())
    donated = (0,) if donate else ()
    options = step_lib.jit_options(model)  # Keeps --remat's barriers on XLA:CPU.
    self.step = jax.jit(self._step, donate_argnums=donated,
                        out_shardings=(self.shardings, replicated), **options)
    self.evaluate = jax.jit(self._evaluate, out_shardings=replicated)
    self._gather_rows = jax.jit(lambda rows: rows, out_shardings=replicated)

  # -- placement

  def init(self, block_states: Sequence[BlockState]) -> PipelineState:
    """An empty pipeline holding `block_states` (host or device values, equal in every process)."""
    host = jax.device_get(tuple(block_states))
    plan = self.plan
    stages = np.stack([
        np.asarray(packing.pack(tuple(host[k] for k in blocks), plan.state_length))
        for packing, blocks in zip(plan.state_packings, plan.stage_blocks)])
    return self.with_stages(_put_global(stages, self.shardings.stages))

  def with_stages(self, stages: jax.Array) -> PipelineState:
    """An empty pipeline (nothing in flight) around packed stage states [S, L]."""
    plan, b = self.plan, self.microbatch_size
    empty = dict(
        activations=np.zeros((plan.num_stages, b, plan.activation_length),
                             plan.activation_dtype),
        labels=np.zeros((plan.num_stages, b), np.int32),
        valid=np.zeros((plan.num_stages, b), bool))
    return PipelineState(
        stages=stages,
        **{name: _put_global(value, getattr(self.shardings, name))
           for name, value in empty.items()})

  def shard_batch(self, batch: dict) -> dict:
    """This process's slice of a batch -> global [S * c, B / M, ...] arrays on 'stage', 'data'.

    Micro-batch m takes, from each data row's share of the batch, its m-th
    part: row d feeds examples [d B/D, (d+1) B/D) of the global batch, cut into
    M parts in order. With one row (D = 1) micro-batch m is simply examples
    [m B/M, (m+1) B/M). Micro-batch m is held by stage m // c (c = ceil(M/S);
    slots past M are zeros and never read), so each device receives c
    micro-batches of its row, and a process copies to its devices only the
    micro-batches they hold.
    """
    num_micro, slots = self.num_microbatches, self.plan.num_stages * self.feed_slots

    def lay_out(x):
      x = np.asarray(x)
      # [rows_fed * M * b_row] -> [M, rows_fed * b_row]: each row's share cut into M parts.
      x = x.reshape((self.rows_fed, num_micro, -1) + x.shape[1:]).swapaxes(0, 1)
      local = x.reshape((num_micro, -1) + x.shape[3:])
      global_shape = (slots, self.microbatch_size) + local.shape[2:]
      first_example = self.feed_index * local.shape[1]

      def piece(index):
        micro = range(*index[0].indices(slots))
        start, stop, _ = index[1].indices(self.microbatch_size)
        rows = slice(start - first_example, stop - first_example)
        part = np.zeros((len(micro), stop - start) + local.shape[2:], local.dtype)
        real = [i for i, m in enumerate(micro) if m < num_micro]
        if real:
          part[real[0]:real[-1] + 1] = local[micro[real[0]]:micro[real[-1]] + 1, rows]
        return part[(slice(None), slice(None)) + tuple(index[2:])]
      return jax.make_array_from_callback(global_shape, self.batch_sharding, piece)
    return jax.tree_util.tree_map(lay_out, batch)

  # -- the jitted programs

  def drain(self, state: PipelineState):
    """Finishes the micro-batches in flight: (state, the metrics [K] of those it finished).

    Steps on batches of nothing (labels `EMPTY_LABEL`) until every micro-batch
    in flight has passed the last stage: ceil((S-1)/M) steps of M bubble ticks
    where S-1 ticks would do. Once per evaluation or checkpoint, that costs
    less than compiling a program of its own, which takes as long as the step's
    (on XLA:CPU 12.6 s beside the step's 14.0 s, the ViT at K=4 in 2 stages).
    """
    slots = self.plan.num_stages * self.feed_slots
    # The shapes, dtypes and layout of `shard_batch`'s training batches: the step's program.
    host = {'image': np.zeros((slots, self.microbatch_size) + self.plan.input_shapes[0],
                              np.float32),
            'label': np.full((slots, self.microbatch_size), EMPTY_LABEL, np.int32)}
    empty = {name: _put_global(value, self.batch_sharding) for name, value in host.items()}
    total = None
    for _ in range(max(1, -(-(self.plan.num_stages - 1) // self.num_microbatches))):
      state, metrics = self.step(state, empty)
      total = metrics if total is None else jax.tree_util.tree_map(jnp.add, total, metrics)
    return state, total

  def _step(self, state: PipelineState, batch: dict):
    """M ticks, each feeding one micro-batch of `batch`; returns (state, metrics [K]).

    Labels are class indices; a micro-batch of `EMPTY_LABEL` labels (what `drain`
    feeds) is a bubble: it changes no state and counts in no metric.
    """
    feed = {'image': batch['image'], 'label': batch['label']}
    feed_spec = self._per_example_spec
    state_specs = (_spec(STAGE_AXIS), feed_spec, feed_spec, feed_spec)
    run = jax.shard_map(
        self._train_on_device, mesh=self.mesh,
        in_specs=(*state_specs, {'image': feed_spec, 'label': feed_spec}),
        out_specs=(*state_specs, _spec(), _spec()))
    stages, activations, labels, valid, sums, counts = run(
        state.stages, state.activations, state.labels, state.valid, feed)
    # sums [S, 3, blocks_per_stage] and counts [S], the same on every device: pick each block's.
    slots = self.plan.block_slots
    metrics = {name: jnp.stack([sums[s, i, j] for s, j in slots])
               for i, name in enumerate(_METRICS)}
    metrics['count'] = jnp.stack([counts[s] for s, _ in slots])
    return PipelineState(stages, activations, labels, valid), metrics

  def _evaluate(self, state: PipelineState, batch: dict) -> dict:
    """Every head on one batch, pipelined: {'correct': [K], 'loss': [K], 'count'} sums.

    Like `step.eval_step` (inference mode, sums over the examples whose 'mask'
    is 1), with M + S - 1 ticks: each stage runs its blocks on the micro-batch
    it holds and passes the features on. The pipeline's training carry is not
    touched (evaluate drained states).
    """
    feed = {name: batch[name] for name in ('image', 'label', 'mask')}
    feed_spec = self._per_example_spec
    run = jax.shard_map(
        self._evaluate_on_device, mesh=self.mesh,
        in_specs=(_spec(STAGE_AXIS), {name: feed_spec for name in feed}),
        out_specs=(_spec(), _spec()))
    sums, counts = run(state.stages, feed)
    slots = self.plan.block_slots
    return {**{name: jnp.stack([sums[s, i, j] for s, j in slots])
               for i, name in enumerate(_EVAL_METRICS)},
            'count': counts[0]}

  # -- per device

  def _ticks(self, tick, carry, feed, num_idle: int = 0):
    """Runs `tick(carry, item)` over the fed micro-batches, then `num_idle` empty ones.

    `feed` holds this device's c micro-batch slots ([c, b_d, ...] leaves). First,
    each later stage j sends the slots it holds (micro-batches j*c, ...) to stage
    0, the only reader, one `ppermute` each, outside any conditional or loop;
    then one loop runs every tick, so XLA compiles the tick, which holds every
    stage's blocks, once rather than once per owner of micro-batches. An empty
    micro-batch (labels `EMPTY_LABEL`) is a bubble.
    """
    c = self.feed_slots
    parts = []
    for owner in range(self.plan.num_stages):
      count = min(c, self.num_microbatches - owner * c)
      if count <= 0:
        break
      part = jax.tree_util.tree_map(lambda x, count=count: x[:count], feed)
      parts.append(_permute_as_one(part, [(owner, 0)]) if owner else part)
    if num_idle:
      empty = self._per_example_varying(self._empty_item(tuple(feed)))
      parts.append(jax.tree_util.tree_map(
          lambda x: jnp.broadcast_to(x, (num_idle,) + x.shape), empty))
    items = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *parts)
    carry, _ = lax.scan(lambda carry, item: (tick(carry, item), None), carry, items)
    return carry

  def _empty_item(self, names) -> dict:
    """One device's share of an empty micro-batch: zeros, labels `EMPTY_LABEL`."""
    b = self.microbatch_size // self.num_rows
    empty = {'image': jnp.zeros((b,) + self.plan.input_shapes[0], jnp.float32),
             'label': jnp.full((b,), EMPTY_LABEL, jnp.int32),
             'mask': jnp.zeros((b,), jnp.float32)}
    return {name: empty[name] for name in names}

  @property
  def _per_example_spec(self):
    """How per-example arrays are split: on 'stage' and, with several rows, on 'data'.

    With one data row the program's values do not vary over 'data' at all, so
    nothing needs averaging over it (no collective among one device).
    """
    return _spec(STAGE_AXIS, DATA_AXIS) if self.num_rows > 1 else _spec(STAGE_AXIS)

  def _per_example_varying(self, tree):
    """Marks leaves as varying the way per-example values do (see `_per_example_spec`)."""
    return _varying(tree, (STAGE_AXIS, DATA_AXIS) if self.num_rows > 1 else (STAGE_AXIS,))

  def _handoff(self, values):
    """Each stage's outputs to the next stage (the last one's go nowhere), in one message."""
    to_next = [(s, s + 1) for s in range(self.plan.num_stages - 1)]
    return _permute_as_one(values, to_next)

  def _mean_over_rows(self, tree):
    """The mean over the data rows; with one row, nothing (not even a collective to itself)."""
    return lax.pmean(tree, DATA_AXIS) if self.num_rows > 1 else tree

  def _train_on_device(self, stages, activations, act_labels, act_valid, feed):
    """Per device: its stage's [1, L] state, [1, b_d, A] input; feed slots [c, b_d, ...]."""
    plan, num_stages = self.plan, self.plan.num_stages
    stage = lax.axis_index(STAGE_AXIS)
    forwards = [functools.partial(self._stage_forward, s) for s in range(num_stages)]
    updates = [functools.partial(self._stage_update, s) for s in range(num_stages)]
    # Per-row batch statistics need no collective inside the switch; global ones do.
    statistics = lambda: (layers.batch_stats_over(DATA_AXIS) if self.batch_norm == 'global'
                          else contextlib.nullcontext())

    def tick(carry, item):
      state, x, x_labels, x_valid, sums, count = carry
      first = stage == 0
      # An empty micro-batch trains as label 0 (its result is masked), as a bubble.
      labels = jnp.where(first, jnp.maximum(item['label'], 0), x_labels)
      valid_rows = jnp.where(first, item['label'] != EMPTY_LABEL, x_valid)
      # XLA:CPU runs its own convolutions about 20x slower inside a conditional; oneDNN's
      # (a custom call, fine in this per-device code) keep their speed there.
      with layers.per_device_code(), statistics():
        grads, stats, out, losses, accuracies = lax.switch(
            stage, forwards, state, item['image'], x, labels)
      # Rows' running statistics differ under 'rows' (and are equal under 'global'): their
      # mean keeps every row's state the same, as the out_specs declare.
      # The slot's validity, the same on every row, rides along to be known as such.
      grads, stats, losses, accuracies, valid = self._mean_over_rows(
          (grads, stats, losses, accuracies, valid_rows[0].astype(jnp.float32)))
      valid = valid > 0.5
      state, skipped = lax.switch(stage, updates, state, stats, grads, losses, valid)
      sums = sums + jnp.where(valid, jnp.stack([losses, accuracies, skipped]), 0.0)
      count = count + valid.astype(jnp.float32)
      out, labels, valid_rows = self._handoff((out, labels, valid_rows))
      return state, out, labels, valid_rows, sums, count

    init = (stages[0], activations[0], act_labels[0], act_valid[0],
            _stage_only(jnp.zeros((len(_METRICS), plan.blocks_per_stage), jnp.float32)),
            _stage_only(jnp.zeros((), jnp.float32)))
    state, x, x_labels, x_valid, sums, count = self._ticks(tick, init, feed)
    # A few floats per block, gathered once per call, outside any conditional.
    sums, counts = _gather_over_stages((sums, count))
    return state[None], x[None], x_labels[None], x_valid[None], sums, counts

  def _stage_forward(self, s, state_vector, image, activation, labels):
    """Stage s's blocks on one micro-batch: gradients, new batch stats, output, losses."""
    plan = self.plan
    # Each data row differentiates its own copy of the state: varying over 'data' before
    # the gradient is taken, so AD sums nothing over rows inside this branch (the
    # rows' gradients are averaged after the switch).
    block_states = self._per_example_varying(plan.state_packings[s].unpack(state_vector))
    x = self._stage_input(s, image, activation)
    grads, stats, losses, accuracies = [], [], [], []
    for k, block_state in zip(plan.stage_blocks[s], block_states):
      loss, block_grads, block_stats, x, outputs = step_lib.block_gradients(
          self.model.blocks[k], block_state, x, labels)
      grads.append(block_grads)
      stats.append(block_stats)
      losses.append(loss)
      accuracies.append(step_lib.accuracy(outputs['logits'], labels))
    pad = plan.blocks_per_stage - len(losses)
    return self._per_example_varying((plan.grad_packings[s].pack(tuple(grads), plan.grad_length),
                            plan.stats_packings[s].pack(tuple(stats), plan.stats_length),
                            self._output(s, x),
                            jnp.pad(jnp.stack(losses), (0, pad)),
                            jnp.pad(jnp.stack(accuracies), (0, pad))))

  def _stage_input(self, s, image, activation):
    """Stage 0 reads the images; a later stage unflattens its predecessor's output."""
    if s == 0:
      return image
    shape = self.plan.input_shapes[s]
    return activation[:, :math.prod(shape)].reshape((-1,) + shape)

  def _output(self, s, x):
    """What stage s sends on: its detached features, flattened and padded to [b, A]."""
    plan = self.plan
    if s == plan.num_stages - 1:
      return jnp.zeros((x.shape[0], plan.activation_length), plan.activation_dtype)
    flat = lax.stop_gradient(x).reshape(x.shape[0], -1).astype(plan.activation_dtype)
    return jnp.pad(flat, ((0, 0), (0, plan.activation_length - flat.shape[1])))

  def _stage_update(self, s, state_vector, stats_vector, grad_vector, losses, valid):
    """Stage s's optimizer updates; a bubble (`valid` false) or skipped update changes nothing."""
    plan = self.plan
    block_states = plan.state_packings[s].unpack(state_vector)
    stats = plan.stats_packings[s].unpack(stats_vector)
    grads = plan.grad_packings[s].unpack(grad_vector)
    new_states, skipped = [], []
    for j, (block_state, block_stats, block_grads) in enumerate(
        zip(block_states, stats, grads)):
      skip = jnp.zeros((), bool)
      if self.skip_nonfinite:
        skip = jnp.logical_not(step_lib.all_finite(losses[j], block_grads))
      keep_old = jnp.logical_or(jnp.logical_not(valid), skip)
      new_states.append(step_lib.apply_block_update(
          self.tx, block_state, block_grads, block_stats, keep_old))
      skipped.append(jnp.logical_and(valid, skip).astype(jnp.float32))
    pad = plan.blocks_per_stage - len(skipped)
    return _stage_only((plan.state_packings[s].pack(tuple(new_states), plan.state_length),
                        jnp.pad(jnp.stack(skipped), (0, pad))))

  def _evaluate_on_device(self, stages, feed):
    plan, num_stages = self.plan, self.plan.num_stages
    stage = lax.axis_index(STAGE_AXIS)
    branches = [functools.partial(self._stage_evaluate, s) for s in range(num_stages)]
    state = stages[0]

    def tick(carry, item):
      x, x_labels, x_mask, x_valid, sums, count = carry
      first = stage == 0
      labels = jnp.where(first, jnp.maximum(item['label'], 0), x_labels)
      mask = jnp.where(first, item['mask'], x_mask)
      valid = jnp.where(first, item['label'][0] != EMPTY_LABEL, x_valid)
      with layers.per_device_code():
        out, block_sums = lax.switch(stage, branches, state, item['image'], x, labels, mask)
      sums = sums + jnp.where(valid, block_sums, 0.0)
      count = count + jnp.where(valid, jnp.sum(mask), 0.0)
      out, labels, mask, valid = self._handoff((out, labels, mask, valid))
      return out, labels, mask, valid, sums, count

    b = self.microbatch_size // self.num_rows
    init = self._per_example_varying((
        jnp.zeros((b, plan.activation_length), plan.activation_dtype),
        jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.float32), jnp.zeros((), bool),
        jnp.zeros((len(_EVAL_METRICS), plan.blocks_per_stage), jnp.float32),
        jnp.zeros((), jnp.float32)))
    *_, sums, count = self._ticks(tick, init, feed, num_idle=num_stages - 1)
    # Sums over the data rows' examples, then every stage's, outside any conditional.
    if self.num_rows > 1:
      sums, count = lax.psum((sums, count), DATA_AXIS)
    return _gather_over_stages((sums, count))

  def _stage_evaluate(self, s, state_vector, image, activation, labels, mask):
    plan = self.plan
    block_states = self._per_example_varying(plan.state_packings[s].unpack(state_vector))
    x = self._stage_input(s, image, activation)
    targets = {'label': labels, 'mask': mask}
    sums = []
    for k, block_state in zip(plan.stage_blocks[s], block_states):
      x, correct, loss = step_lib.block_eval_sums(self.model.blocks[k], block_state, x, targets)
      sums.append(jnp.stack([correct, loss]))
    pad = plan.blocks_per_stage - len(sums)
    sums = jnp.pad(jnp.stack(sums, axis=1), ((0, 0), (0, pad)))
    return self._per_example_varying((self._output(s, x), sums))

  # -- the host's view: what this process holds, nothing gathered

  def own_stages(self, stages: jax.Array) -> dict:
    """{stage: host copy of its packed state [L]} for the stages this process's devices hold."""
    own = {}
    for shard in stages.addressable_shards:
      s = shard.index[0].start or 0
      if s not in own:
        own[s] = np.asarray(shard.data)[0]
    return own

  def host_block_states(self, stages: jax.Array) -> tuple:
    """The K block states on the host, unpacked from this process's own shards (no gather).

    Raises:
      UsageError: some stage lives only on another process's devices.
    """
    own = self.own_stages(stages)
    missing = [s for s in range(self.plan.num_stages) if s not in own]
    if missing:
      raise UsageError(f'stages {missing} are held by other processes: use block_summaries, '
                       f'or checkpoints, which need no gather')
    blocks = []
    for s, packing in enumerate(self.plan.state_packings):
      blocks.extend(packing.unpack(own[s]))
    return tuple(blocks)

  def exchange(self, rows_of_own_stages: dict) -> np.ndarray:
    """[S, ...] on every process from each process's {stage: small host array}.

    For a few bytes per stage (digests, flags): the owners' rows are placed on
    their stage's devices and gathered with one tiny all-gather.
    """
    first = next(iter(rows_of_own_stages.values()))
    shape = (self.plan.num_stages,) + first.shape
    sharded = jax.sharding.NamedSharding(self.mesh, _spec(STAGE_AXIS))
    placed = jax.make_array_from_callback(
        shape, sharded, lambda index: np.stack(
            [rows_of_own_stages[s] for s in range(*index[0].indices(shape[0]))]))
    return np.asarray(self._gather_rows(placed).addressable_data(0))

  def block_summaries(self, stages: jax.Array, summarize) -> list:
    """[summarize(block state) for each of the K blocks], each computed by its stage's owner.

    `summarize` maps one host `BlockState` to a small uint8 vector of a fixed
    size (a digest, a flag), which `exchange` gathers; no state leaves its devices.
    """
    rows = {}
    for s, vector in self.own_stages(stages).items():
      summaries = [np.asarray(summarize(block), np.uint8)
                   for block in self.plan.state_packings[s].unpack(vector)]
      padding = [np.zeros_like(summaries[0])] * (self.plan.blocks_per_stage - len(summaries))
      rows[s] = np.stack(summaries + padding)
    gathered = self.exchange(rows)
    return [gathered[s, j] for s, j in self.plan.block_slots]

  def stage_digest(self, stages: jax.Array) -> str:
    """SHA-256 over every stage's packed state, each hashed by its owner (checkpoint records)."""
    own = {s: np.frombuffer(hashlib.sha256(np.ascontiguousarray(v).tobytes()).digest(),
                            np.uint8) for s, v in self.own_stages(stages).items()}
    return hashlib.sha256(self.exchange(own).tobytes()).hexdigest()

  def abstract_state(self) -> PipelineState:
    """Shapes, dtypes and shardings of a `PipelineState` (to compile ahead of time)."""
    plan, b = self.plan, self.microbatch_size
    shapes = PipelineState(
        stages=((plan.num_stages, plan.state_length), jnp.float32),
        activations=((plan.num_stages, b, plan.activation_length), plan.activation_dtype),
        labels=((plan.num_stages, b), jnp.int32), valid=((plan.num_stages, b), jnp.bool_))
    return jax.tree_util.tree_map(
        lambda shape_dtype, sharding: jax.ShapeDtypeStruct(*shape_dtype, sharding=sharding),
        shapes, self.shardings, is_leaf=lambda x: isinstance(x, tuple))


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


def step_metrics(*calls: dict, num_microbatches: int) -> dict:
  """One training step's metrics [K] from the raw sums of pipeline calls (a step, a drain).

  Each call returns, per block, sums over the micro-batches it finished
  ('loss', 'accuracy', 'skipped') and their 'count'. Loss and accuracy are
  divided by M rather than by the count: a block finishes exactly M
  micro-batches per step between two drains, so the mean of these values over
  the steps of a segment (step, ..., last step + drain) is the mean over every
  micro-batch, even though a micro-batch may finish a step later than it
  entered. 'skipped' stays a count of skipped updates, as other engines report.
  """
  totals = {name: sum(call[name] for call in calls) for name in _METRICS}
  return {'loss': totals['loss'] / num_microbatches,
          'accuracy': totals['accuracy'] / num_microbatches,
          'skipped': totals['skipped']}


def state_bytes_per_device(pipeline_state: PipelineState) -> int:
  """Bytes of packed block state one device holds (its shard of `stages`)."""
  shard = pipeline_state.stages.addressable_shards[0].data
  return int(shard.size * shard.dtype.itemsize)
