"""Engines: where block states and batches live, and which jitted steps run on them.

The loop in train.py is the same for every engine; only placement differs.

- 'none': one device; the fused step, or for bwbpf the block-wise one (less memory).
- 'data': the same step (block-wise for bwbpf, else fused) jitted over a mesh
  of all devices (every process's), states replicated, each global batch split
  along the mesh; each process feeds its own slice of the batch. Equal to
  'none' on the global batch up to the order of floating-point sums.
- 'blocks': block k's state on local device k mod D, a pipeline over
  `config.microbatches` micro-batches (bwbpf only, one process). Every
  micro-batch is an optimizer step, so the schedule is built for
  `optimizer_steps_per_batch` times the number of batches.
"""

import dataclasses
from typing import Callable

import jax

import bwbpf_jax as bw
from bwbpf_jax import parallel
from experiments.config import Config

PARALLEL_MODES = ('none', 'data', 'blocks')


@dataclasses.dataclass(frozen=True)
class Engine:
  """How states and batches are placed and which jitted steps run on them.

  `eval_states` brings the states to where `eval_step` runs; the loop calls it
  once per evaluation, not per batch.
  """
  name: str
  num_devices: int
  put_states: Callable
  put_batch: Callable
  train_step: Callable
  eval_step: Callable
  eval_states: Callable = lambda states: states


def resolve_parallel(config: Config) -> str:
  """config.parallel with 'auto' decided: 'data' when JAX sees several devices, else 'none'."""
  if config.parallel != 'auto':
    return config.parallel
  return 'data' if jax.device_count() > 1 else 'none'


def optimizer_steps_per_batch(config: Config) -> int:
  """Optimizer updates per global batch: one, or one per micro-batch when pipelining blocks."""
  return config.microbatches if resolve_parallel(config) == 'blocks' else 1


def make_engine(config: Config, model, tx) -> Engine:
  """The engine `config.parallel` names; `tx` must count `optimizer_steps_per_batch` steps."""
  kind = resolve_parallel(config)
  skip = config.skip_nonfinite
  if kind == 'data':
    return _data_engine(config, model, tx)
  if kind == 'blocks':
    return _blocks_engine(config, model, tx)
  train_step = (bw.make_blockwise_train_step(model, tx, skip_nonfinite=skip)
                if _use_blockwise(config, model)
                else bw.make_train_step(model, tx, skip_nonfinite=skip))
  return Engine(name='none', num_devices=1, put_states=jax.device_put,
                put_batch=jax.device_put, train_step=train_step,
                eval_step=bw.make_eval_step(model))


def _use_blockwise(config: Config, model) -> bool:
  """One jitted call per block (less memory) for bwbpf, unless the fused step is asked for."""
  return config.train_step == 'blockwise' or (
      config.train_step == 'auto' and config.mode == 'bwbpf' and model.num_blocks > 1)


def _data_engine(config: Config, model, tx) -> Engine:
  mesh = parallel.make_mesh()
  if config.batch_size % mesh.size:
    raise bw.UsageError(f'--batch_size={config.batch_size} cannot be split evenly over '
                        f'{mesh.size} devices (--parallel=data); use a multiple of {mesh.size}')
  make_step = (parallel.make_data_parallel_blockwise_train_step
               if _use_blockwise(config, model) else parallel.make_data_parallel_train_step)
  return Engine(
      name='data', num_devices=mesh.size,
      put_states=lambda states: parallel.replicate(states, mesh),
      put_batch=lambda batch: parallel.shard_batch(batch, mesh),
      train_step=make_step(model, tx, mesh, skip_nonfinite=config.skip_nonfinite),
      eval_step=parallel.make_data_parallel_eval_step(model, mesh))


def _blocks_engine(config: Config, model, tx) -> Engine:
  if jax.process_count() > 1:
    raise bw.UsageError('--parallel=blocks runs in one process (its devices hold the blocks); '
                        'across processes use --parallel=data')
  if config.batch_size % config.microbatches:
    raise bw.UsageError(f'--batch_size={config.batch_size} cannot be split into '
                        f'--microbatches={config.microbatches} equal micro-batches')
  # Raises UsageError for modes whose gradients cross blocks.
  train_step = parallel.make_block_parallel_train_step(
      model, tx, num_microbatches=config.microbatches, skip_nonfinite=config.skip_nonfinite)
  block_devices = parallel.placement(model)
  eval_device = block_devices[0]
  return Engine(
      name='blocks', num_devices=len(set(block_devices)),
      put_states=lambda states: parallel.place_block_states(states, block_devices),
      # Host batches: the step cuts them into micro-batches and copies each to its block.
      put_batch=lambda batch: batch,
      train_step=train_step,
      eval_step=bw.make_eval_step(model),
      eval_states=lambda states: parallel.gather_block_states(states, eval_device))
