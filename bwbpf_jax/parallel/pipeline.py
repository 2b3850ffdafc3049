"""Block parallelism as one SPMD program: a stage pipeline over a ('data', 'stage') mesh.

The K blocks are grouped into S contiguous stages; stage s lives on mesh column
s and is replicated over the D rows of axis 'data', which split every
micro-batch (D x S devices, every process's). The train step is one `jax.jit`
of a `jax.shard_map`: at every tick each device

1. runs its own stage (`lax.switch` on `lax.axis_index('stage')`): forward,
   local loss and gradient of each of the stage's blocks on its current
   micro-batch, one block after another;
2. averages gradients and losses over 'data' (outside the switch), while the
   stages' BatchNorms take their batch statistics over 'data' as well
   (`layers.batch_stats_over`), so the update is the one for the global
   micro-batch, as under `--parallel=data`;
3. applies its blocks' own optax updates (a second switch), unless the slot is
   a bubble;
4. passes its detached output, labels and a valid flag to the next stage with
   `lax.ppermute`.

Blocks differ in parameter and activation shapes, while an SPMD program needs
one shape per array. Each stage's states (params, batch_stats, opt_state of
its blocks) are packed into one float32 vector padded to the largest stage's
length, stacked [S, L] and sharded on 'stage': a device holds only its stage's
state. Boundary activations travel flattened, padded to the largest boundary
[b, A]. `StagePlan` records the packing; `padding_overhead` reports its cost.

Because every block input is detached, block k's update on micro-batch m
depends only on its own state and block k-1's output on m, which block k-1
computed with its weights after micro-batches 0..m-1, exactly as the
synchronous block-wise step on the same micro-batch sequence. Nothing is stale.

The pipeline stays full across steps: its in-flight activations are part of
`PipelineState`, so step n's micro-batches enter while step n-1's last ones
are still in later stages, and the S-1 ticks of fill and drain are paid once
per `drain` (before evaluation and checkpoints), not per step. Bubble slots
(before the pipeline is full, and while draining) are masked: they change no
state and no optimizer step count.
"""

import dataclasses
import functools
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
_METRICS = ('loss', 'accuracy', 'skipped')


# ---------------------------------------------------------------- mesh and layout


def make_pipeline_mesh(num_stages: int,
                       devices: Optional[Sequence[Any]] = None) -> jax.sharding.Mesh:
  """A ('data', 'stage') mesh of every device (every process's): D = devices / stages rows.

  Built with `jax.make_mesh`, which orders devices for the hardware's topology
  (neighbouring stages on neighbouring chips where it can). Axes are Auto, so
  the shardings given to jit decide placement.

  Raises:
    UsageError: the device count is not a multiple of `num_stages`.
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_stages < 1 or len(devices) % num_stages:
    raise UsageError(f'a pipeline of {num_stages} stages needs a multiple of {num_stages} '
                     f'devices, found {len(devices)}; choose --pipeline_stages dividing '
                     f'{len(devices)}')
  shape = (len(devices) // num_stages, num_stages)
  auto = (jax.sharding.AxisType.Auto,) * 2
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, (DATA_AXIS, STAGE_AXIS), axis_types=auto, devices=devices)
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), (DATA_AXIS, STAGE_AXIS),
                           axis_types=auto)


def process_feed_slice(mesh: jax.sharding.Mesh) -> tuple:
  """(index, count): this process feeds slice `index` of `count` equal slices of each batch.

  A process feeds the 'data' rows its devices hold. Where every process holds
  whole rows of its own (the usual case: data rows split over hosts), the
  slices are disjoint; where all processes share the rows (one data row whose
  stages span hosts), every process feeds the whole batch.

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


@dataclasses.dataclass(frozen=True)
class _Packing:
  """Packs a pytree of arrays into one float32 vector of a given length, and back.

  Every value survives the round trip exactly: float32 leaves are copied and
  int32 leaves (optax step counts) are exact in float32 below 2**24.
  """
  treedef: Any
  shapes: tuple
  dtypes: tuple

  @classmethod
  def of(cls, tree) -> '_Packing':
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    dtypes = tuple(jnp.dtype(leaf.dtype) for leaf in leaves)
    allowed = (jnp.dtype(jnp.float32), jnp.dtype(jnp.int32))
    if any(dtype not in allowed for dtype in dtypes):
      raise UsageError(f'the stage pipeline packs float32 and int32 states, got '
                       f'{sorted(set(map(str, dtypes)))}')
    return cls(treedef, tuple(tuple(leaf.shape) for leaf in leaves), dtypes)

  @property
  def size(self) -> int:
    return sum(math.prod(shape) for shape in self.shapes)

  def pack(self, tree, length: int) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    flat = [jnp.ravel(leaf).astype(jnp.float32) for leaf in leaves]
    return jnp.pad(jnp.concatenate(flat), (0, length - self.size))

  def unpack(self, vector: jax.Array):
    leaves, offset = [], 0
    for shape, dtype in zip(self.shapes, self.dtypes):
      size = math.prod(shape)
      leaves.append(vector[offset:offset + size].reshape(shape).astype(dtype))
      offset += size
    return jax.tree_util.tree_unflatten(self.treedef, leaves)


@dataclasses.dataclass(frozen=True, eq=False)
class StagePlan:
  """Which blocks each stage runs, and how its state and boundary activations are packed.

  Attributes:
    stage_blocks: per stage, the indices of its blocks (contiguous, in order).
    state_packings: per stage, the packing of its blocks' `BlockState`s.
    grad_packings: per stage, the packing of its blocks' parameters (gradients).
    input_shapes: per stage, the shape of one example's input ([H, W, C]).
    activation_dtype: dtype of the activations passed between stages.
  """
  stage_blocks: tuple
  state_packings: tuple
  grad_packings: tuple
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
  def activation_length(self) -> int:
    """A: floats per example of the largest boundary activation (at least 1)."""
    return max([1] + [math.prod(shape) for shape in self.input_shapes[1:]])

  @property
  def blocks_per_stage(self) -> int:
    return max(len(blocks) for blocks in self.stage_blocks)

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
  costliest stage is as cheap as possible (`sizing.balanced_split_points` over
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
  if model.mode != 'bwbpf':
    raise UsageError(f'block-parallel training needs isolated blocks (mode bwbpf), '
                     f'not mode {model.mode!r}: in that mode gradients cross blocks')
  if step_lib.needs_pixels(model):
    raise UsageError('the stage pipeline passes labels between stages, not the images a '
                     'reconstruction loss needs; use --parallel=data or none with it')
  num_blocks = model.num_blocks
  num_stages = num_blocks if num_stages is None else int(num_stages)
  if not 1 <= num_stages <= num_blocks:
    raise UsageError(f'--pipeline_stages must be between 1 and the {num_blocks} blocks, '
                     f'got {num_stages}')
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
  return StagePlan(
      stage_blocks=stage_blocks,
      state_packings=tuple(_Packing.of(tuple(states[k] for k in blocks))
                           for blocks in stage_blocks),
      grad_packings=tuple(_Packing.of(tuple(states[k].params for k in blocks))
                          for blocks in stage_blocks),
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
    valid: [S] bool, whether stage s's next input is a real micro-batch.
  """
  stages: jax.Array
  activations: jax.Array
  labels: jax.Array
  valid: jax.Array


def _state_shardings(mesh) -> PipelineState:
  spec = jax.sharding.PartitionSpec
  named = lambda *axes: jax.sharding.NamedSharding(mesh, spec(*axes))
  return PipelineState(stages=named(STAGE_AXIS), activations=named(STAGE_AXIS, DATA_AXIS),
                       labels=named(STAGE_AXIS, DATA_AXIS), valid=named(STAGE_AXIS))


def _put_global(host: np.ndarray, sharding) -> jax.Array:
  """A global array from a host copy that every process holds in full."""
  if jax.process_count() == 1:
    return jax.device_put(host, sharding)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


# ---------------------------------------------------------------- the pipeline


class StagePipeline:
  """The jitted stage-pipeline functions for one model, optimizer, plan and mesh.

  `init` packs block states into an empty pipeline, `shard_batch` lays a batch
  out as M micro-batches, `step` trains on one batch, `drain` finishes the
  micro-batches still in flight and `block_states` unpacks the states (drain
  first). All of them are pure functions of their arguments; this object only
  holds what is fixed for a run.
  """

  def __init__(self, model: PartitionedModel, tx: optax.GradientTransformation,
               plan: StagePlan, mesh: jax.sharding.Mesh, *, num_microbatches: int,
               global_batch_size: int, skip_nonfinite: bool = False, donate: bool = True):
    if tuple(mesh.axis_names) != (DATA_AXIS, STAGE_AXIS):
      raise UsageError(f'the stage pipeline needs a (data, stage) mesh, got {mesh.axis_names}')
    if mesh.shape[STAGE_AXIS] != plan.num_stages:
      raise UsageError(f'the mesh has {mesh.shape[STAGE_AXIS]} stages, the plan '
                       f'{plan.num_stages}')
    divisor = num_microbatches * mesh.shape[DATA_AXIS]
    if num_microbatches < 1 or global_batch_size % divisor:
      raise UsageError(f'--batch_size={global_batch_size} cannot be split into '
                       f'--microbatches={num_microbatches} equal micro-batches over '
                       f'{mesh.shape[DATA_AXIS]} data-parallel rows; use a multiple of '
                       f'{divisor}')
    if mesh.shape[DATA_AXIS] > 1 and any(b.loss.kind == 'supcon' for b in model.blocks):
      # Each row would pair only its own share of the micro-batch: a different loss.
      raise UsageError(f'the supervised contrastive loss pairs the examples of a whole '
                       f'micro-batch, which the stage pipeline splits over '
                       f'{mesh.shape[DATA_AXIS]} data rows; use one row (as many stages as '
                       f'devices) or --parallel=data with it')
    self.model, self.tx, self.plan, self.mesh = model, tx, plan, mesh
    self.num_microbatches = num_microbatches
    # Data rows whose share of each batch this process feeds (all of them in one process).
    self.rows_fed = mesh.shape[DATA_AXIS] // process_feed_slice(mesh)[1]
    self.microbatch_size = global_batch_size // num_microbatches
    self.skip_nonfinite = skip_nonfinite
    self.shardings = _state_shardings(mesh)
    spec = jax.sharding.PartitionSpec
    self.batch_sharding = jax.sharding.NamedSharding(mesh, spec(None, DATA_AXIS))
    replicated = jax.sharding.NamedSharding(mesh, spec())
    donated = (0,) if donate else ()
    options = step_lib.jit_options(model)  # Keeps --remat's barriers on XLA:CPU.
    self.step = jax.jit(self._step, donate_argnums=donated,
                        out_shardings=(self.shardings, replicated), **options)
    self.drain = jax.jit(self._drain, donate_argnums=donated,
                         out_shardings=(self.shardings, replicated), **options)
    self.block_states = jax.jit(self._unpack, out_shardings=replicated)

  # -- placement

  def init(self, block_states: Sequence[BlockState]) -> PipelineState:
    """An empty pipeline holding `block_states` (host or device values, equal in every process)."""
    host = jax.device_get(tuple(block_states))
    plan = self.plan
    stages = np.stack([
        np.asarray(packing.pack(tuple(host[k] for k in blocks), plan.state_length))
        for packing, blocks in zip(plan.state_packings, plan.stage_blocks)])
    b = self.microbatch_size
    empty = dict(
        activations=np.zeros((plan.num_stages, b, plan.activation_length),
                             plan.activation_dtype),
        labels=np.zeros((plan.num_stages, b), np.int32),
        valid=np.zeros((plan.num_stages,), bool))
    return PipelineState(
        stages=_put_global(stages, self.shardings.stages),
        **{name: _put_global(value, getattr(self.shardings, name))
           for name, value in empty.items()})

  def shard_batch(self, batch: dict) -> dict:
    """This process's slice of a batch -> global [M, B / M, ...] arrays, split on 'data'.

    Micro-batch m takes, from each data row's share of the batch, its m-th
    part: row d feeds examples [d B/D, (d+1) B/D) of the global batch, cut into
    M parts in order. With one row (D = 1) micro-batch m is simply examples
    [m B/M, (m+1) B/M).
    """
    num_micro = self.num_microbatches

    def lay_out(x):
      x = np.asarray(x)
      # [rows_fed * M * b_row] -> [M, rows_fed * b_row]: each row's share cut into M parts.
      x = x.reshape((self.rows_fed, num_micro, -1) + x.shape[1:]).swapaxes(0, 1)
      local = x.reshape((num_micro, -1) + x.shape[3:])
      global_shape = (num_micro, self.microbatch_size) + local.shape[2:]
      return jax.make_array_from_process_local_data(self.batch_sharding, local, global_shape)
    return jax.tree_util.tree_map(lay_out, batch)

  # -- the jitted programs

  def _step(self, state: PipelineState, batch: dict):
    fed = jnp.ones((self.num_microbatches,), bool)
    return self._run(state, batch['image'], batch['label'], fed)

  def _drain(self, state: PipelineState):
    """S-1 ticks with nothing fed: every micro-batch in flight reaches the last stage."""
    ticks = self.plan.num_stages - 1
    image_shape = self.plan.input_shapes[0]
    images = jnp.zeros((ticks, self.microbatch_size) + image_shape, jnp.float32)
    labels = jnp.zeros((ticks, self.microbatch_size), jnp.int32)
    return self._run(state, images, labels, jnp.zeros((ticks,), bool))

  def _unpack(self, state: PipelineState) -> tuple:
    blocks = []
    for s, packing in enumerate(self.plan.state_packings):
      blocks.extend(packing.unpack(state.stages[s]))
    return tuple(blocks)

  def _run(self, state: PipelineState, images, labels, fed):
    """Runs one tick per leading entry of `images`; returns (state, metrics [K])."""
    spec = jax.sharding.PartitionSpec
    # Stages' outputs vary over different mesh axes (stage 0 reads the data-split images,
    # the last stage emits zeros), so the branches of a switch cannot agree on one
    # varying-axes type; the replication that out_specs state is by construction
    # (everything written to a 'stage'-only spec was averaged over 'data').
    shard_ticks = jax.shard_map(
        self._ticks_on_device, mesh=self.mesh, check_vma=False,
        in_specs=(spec(STAGE_AXIS), spec(STAGE_AXIS, DATA_AXIS), spec(STAGE_AXIS, DATA_AXIS),
                  spec(STAGE_AXIS), spec(None, DATA_AXIS), spec(None, DATA_AXIS), spec()),
        out_specs=(spec(STAGE_AXIS), spec(STAGE_AXIS, DATA_AXIS), spec(STAGE_AXIS, DATA_AXIS),
                   spec(STAGE_AXIS), spec(STAGE_AXIS), spec(STAGE_AXIS)))
    stages, activations, out_labels, valid, sums, counts = shard_ticks(
        state.stages, state.activations, state.labels, state.valid, images, labels, fed)
    # sums [S, 3, blocks_per_stage] and counts [S] -> per-block sums [K] and counts [K].
    where = [(s, j) for s, blocks in enumerate(self.plan.stage_blocks)
             for j in range(len(blocks))]
    metrics = {name: jnp.stack([sums[s, i, j] for s, j in where])
               for i, name in enumerate(_METRICS)}
    metrics['count'] = jnp.stack([counts[s] for s, _ in where])
    return PipelineState(stages, activations, out_labels, valid), metrics

  def _ticks_on_device(self, stages, activations, act_labels, act_valid, images, labels, fed):
    """Per device: its stage's [1, L] state, [1, b_d, A] input; [T, b_d, ...] batch slice."""
    plan, num_stages = self.plan, self.plan.num_stages
    stage = lax.axis_index(STAGE_AXIS)
    forwards = [functools.partial(self._stage_forward, s) for s in range(num_stages)]
    updates = [functools.partial(self._stage_update, s) for s in range(num_stages)]
    to_next = [(s, s + 1) for s in range(num_stages - 1)]

    def tick(carry, tick_input):
      state, x, x_labels, x_valid, sums, count = carry
      image, image_labels, image_fed = tick_input
      first = stage == 0
      x_labels = jnp.where(first, image_labels, x_labels)
      valid = jnp.where(first, image_fed, x_valid)
      # XLA:CPU runs its own convolutions about 20x slower inside a conditional; oneDNN's
      # (a custom call, fine in this per-device code) keep their speed there.
      with layers.batch_stats_over(DATA_AXIS), layers.per_device_code():
        grads, proposed, out, losses, accuracies = lax.switch(
            stage, forwards, state, image, x, x_labels)
      grads, losses, accuracies = lax.pmean((grads, losses, accuracies), DATA_AXIS)
      state, skipped = lax.switch(stage, updates, state, proposed, grads, losses, valid)
      tick_metrics = jnp.stack([losses, accuracies, skipped])
      sums = sums + jnp.where(valid, tick_metrics, 0.0)
      count = count + valid.astype(jnp.float32)
      out, x_labels, valid = lax.ppermute((out, x_labels, valid), STAGE_AXIS, to_next)
      return (state, out, x_labels, valid, sums, count), None

    init = (stages[0], activations[0], act_labels[0], act_valid[0],
            jnp.zeros((len(_METRICS), plan.blocks_per_stage), jnp.float32),
            jnp.zeros((), jnp.float32))
    (state, x, x_labels, x_valid, sums, count), _ = lax.scan(
        tick, init, (images, labels, fed))
    return (state[None], x[None], x_labels[None], x_valid[None], sums[None], count[None])

  def _stage_forward(self, s, state_vector, image, activation, labels):
    """Stage s's blocks on one micro-batch: gradients, new batch stats, output, losses."""
    plan = self.plan
    block_states = plan.state_packings[s].unpack(state_vector)
    if s == 0:
      x = image
    else:
      shape = plan.input_shapes[s]
      x = activation[:, :math.prod(shape)].reshape((-1,) + shape)
    grads, proposed, losses, accuracies = [], [], [], []
    for k, block_state in zip(plan.stage_blocks[s], block_states):
      grad_fn = jax.value_and_grad(step_lib.local_loss, argnums=1, has_aux=True)
      (loss, (x, outputs, stats)), block_grads = grad_fn(
          self.model.blocks[k], block_state.params, block_state.batch_stats, x, labels)
      logits = outputs['logits']
      grads.append(block_grads)
      proposed.append(block_state.replace(batch_stats=stats))
      losses.append(loss)
      accuracies.append(jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32)))
    if s == plan.num_stages - 1:
      out = jnp.zeros((x.shape[0], plan.activation_length), plan.activation_dtype)
    else:
      flat = lax.stop_gradient(x).reshape(x.shape[0], -1).astype(plan.activation_dtype)
      out = jnp.pad(flat, ((0, 0), (0, plan.activation_length - flat.shape[1])))
    pad = plan.blocks_per_stage - len(losses)
    return (plan.grad_packings[s].pack(tuple(grads), plan.grad_length),
            plan.state_packings[s].pack(tuple(proposed), plan.state_length),
            out,
            jnp.pad(jnp.stack(losses), (0, pad)),
            jnp.pad(jnp.stack(accuracies), (0, pad)))

  def _stage_update(self, s, state_vector, proposed_vector, grad_vector, losses, valid):
    """Stage s's optimizer updates; a bubble (`valid` false) or skipped update changes nothing."""
    plan = self.plan
    block_states = plan.state_packings[s].unpack(state_vector)
    proposed = plan.state_packings[s].unpack(proposed_vector)
    grads = plan.grad_packings[s].unpack(grad_vector)
    new_states, skipped = [], []
    for j, (block_state, new_stats, block_grads) in enumerate(
        zip(block_states, proposed, grads)):
      skip = jnp.zeros((), bool)
      if self.skip_nonfinite:
        skip = jnp.logical_not(step_lib.all_finite(losses[j], block_grads))
      keep_old = jnp.logical_or(jnp.logical_not(valid), skip)
      new_states.append(step_lib.apply_block_update(
          self.tx, block_state, block_grads, new_stats.batch_stats, keep_old))
      skipped.append(jnp.logical_and(valid, skip).astype(jnp.float32))
    pad = plan.blocks_per_stage - len(skipped)
    return (plan.state_packings[s].pack(tuple(new_states), plan.state_length),
            jnp.pad(jnp.stack(skipped), (0, pad)))


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
