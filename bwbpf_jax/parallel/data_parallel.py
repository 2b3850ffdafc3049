"""Data parallelism: one step, its batch split over a 1-D mesh axis 'data'.

Block states are replicated and the step is `step.train_step` (or the
block-wise step) itself, jitted with shardings: the compiler partitions it, so
nothing in the step changes. Each process feeds only its slice of every global
batch (`data.train_batches(..., process_index, process_count)`).
"""

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
import optax

from bwbpf_jax import step as step_lib
from bwbpf_jax.errors import UsageError
from bwbpf_jax.partition import PartitionedModel

DATA_AXIS = 'data'



def make_mesh(num_devices: Optional[int] = None,
              devices: Optional[Sequence[Any]] = None) -> jax.sharding.Mesh:
  """A 1-D mesh with axis 'data' over the first `num_devices` of `devices` (all by default).

  `devices` defaults to `jax.devices()`; pass another mesh's flattened devices
  to get a mesh with the same device order (jit needs one order per program).

  The axis is of type Auto (`jax.make_mesh` defaults to Explicit): the compiler
  partitions the unchanged single-device step from the shardings given to jit,
  so calls need no `jax.set_mesh` context. In a multi-process run
  `jax.devices()` lists every process's devices and the default mesh is global;
  a smaller one must still give every process a device.
  """
  devices = list(jax.devices() if devices is None else devices)
  available = len(devices)
  num_devices = available if num_devices is None else int(num_devices)
  if not 1 <= num_devices <= available:
    raise UsageError(f'cannot build a mesh of {num_devices} devices: '
                     f'{available} available')
  return jax.make_mesh((num_devices,), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:num_devices])


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
  """`step.make_train_step` with states replicated and the batch split over `mesh`.

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
  jitted = step_lib.make_train_step(model, tx, skip_nonfinite=skip_nonfinite, donate=donate,
                                    state_sharding=replicated_sharding(mesh),
                                    batch_sharding=data_sharding(mesh))
  return _checked_batch_size(jitted, mesh)


def make_data_parallel_blockwise_train_step(model: PartitionedModel,
                                            tx: optax.GradientTransformation,
                                            mesh: jax.sharding.Mesh, *,
                                            skip_nonfinite: bool = False,
                                            donate: bool = True) -> Callable:
  """`step.make_blockwise_train_step` with states replicated and the batch split over `mesh`.

  As on one device, only one block's activations are alive at a time, now on
  every device; the same global-batch semantics as `make_data_parallel_train_step`
  hold (mean loss over the global batch, global BatchNorm statistics).

  Raises:
    UsageError: the model is not in bwbpf mode.
  """
  step = step_lib.make_blockwise_train_step(
      model, tx, skip_nonfinite=skip_nonfinite, donate=donate,
      state_sharding=replicated_sharding(mesh), batch_sharding=data_sharding(mesh))
  return _checked_batch_size(step, mesh)


def make_data_parallel_eval_step(model: PartitionedModel, mesh: jax.sharding.Mesh) -> Callable:
  """`step.eval_step` jitted over `mesh`: sums over the global batch, replicated.

  Its 'correct', 'loss' and 'count' are sums over all devices' examples (the
  padding 'mask' is sharded with the batch), so batches and processes add up.
  """
  jitted = step_lib.make_eval_step(model, state_sharding=replicated_sharding(mesh),
                                   batch_sharding=data_sharding(mesh))
  return _checked_batch_size(jitted, mesh)
