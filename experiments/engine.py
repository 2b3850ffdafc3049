"""Engines: where block states and batches live, and which jitted steps run on them.

The loop in train.py is the same for every engine; only placement differs.

- 'none': one device; the fused step, or for bwbpf the block-wise one (less memory).
- 'data': the same step (block-wise for bwbpf, else fused) jitted over a mesh
  of all devices (every process's), states replicated, each global batch split
  along the mesh; each process feeds its own slice of the batch. Equal to
  'none' on the global batch up to the order of floating-point sums.
- 'blocks': the SPMD stage pipeline (`parallel.StagePipeline`, bwbpf only)
  over a ('data', 'stage') mesh of every device of every process:
  `config.pipeline_stages` stages (default K), data = devices / stages, each
  batch cut into `config.microbatches` micro-batches. Every micro-batch is an
  optimizer step, so the schedule is built for `optimizer_steps_per_batch`
  times the number of batches. The pipeline stays full from step to step;
  the loop `drain`s it where a segment ends (before evaluation, checkpoints
  and the end), so states are then well defined. Evaluation runs pipelined on
  the same devices, checkpoints hold the stages' shards as they lie, and
  digests and finiteness checks are computed by each stage's owner: no device
  or process ever holds every stage's state.
"""

import dataclasses
import functools
from typing import Callable, Optional

import jax
import numpy as np

import bwbpf_jax as bw
from bwbpf_jax import checkpoint
from bwbpf_jax import parallel
from . import config as config_lib
from .config import Config

PARALLEL_MODES = tuple(mode for mode in config_lib.PARALLEL if mode != 'auto')


@dataclasses.dataclass(frozen=True)
class Engine:
  """How states and batches are placed and which jitted steps run on them.

  `eval_states` brings the states to where `eval_step` runs; the loop calls it
  once per evaluation, not per batch. `drain(states, last_metrics)` finishes
  work still in flight at the end of a segment of steps and returns the states
  and the last step's metrics with that work's folded in. `feed_slice` is
  (index, count): which slice of every global batch this process feeds.

  The states are whatever `put_states` returns (a tuple of `BlockState`s for
  'none' and 'data', a `parallel.PipelineState` for 'blocks'); the loop never
  looks inside them, and no engine keeps state of its own between calls. What
  the loop needs of the states beyond training, without assuming where they
  live: `save_checkpoint(manager, step, states, meta) -> path`,
  `restore_checkpoint(manager, step, block_target) -> (placed states, meta)`
  (`block_target`: the K abstract block states), `block_digests(states)` (each
  block's `checkpoint.block_params_digest`) and `finite_blocks(states)` (whether
  each block's parameters are finite).
  """
  name: str
  num_devices: int
  put_states: Callable
  put_batch: Callable
  train_step: Callable
  eval_step: Callable
  save_checkpoint: Callable
  restore_checkpoint: Callable
  block_digests: Callable
  finite_blocks: Callable
  eval_states: Callable = lambda states: states
  put_eval_batch: Optional[Callable] = None  # Default: put_batch.
  drain: Callable = lambda states, last_metrics: (states, last_metrics)
  feed_slice: tuple = (0, 1)
  mesh_shape: Optional[dict] = None  # Axis name -> size, for results.json.
  batch_norm: Optional[str] = None  # The stage pipeline's BatchNorm statistics.


def _finite_params(block_state) -> bool:
  return all(bool(np.all(np.isfinite(leaf)))
             for leaf in jax.tree_util.tree_leaves(block_state.params))


def _host_state_io(put_states) -> dict:
  """Checkpoints, digests and checks of states every process can fetch whole (replicated)."""

  def restore(manager, step, block_target):
    states, meta = checkpoint.restore(manager, step, block_target)
    return put_states(states), meta
  return dict(
      save_checkpoint=lambda manager, step, states, meta: checkpoint.save(
          manager, step, states, meta),
      restore_checkpoint=restore,
      block_digests=lambda states: [checkpoint.block_params_digest(s)
                                    for s in jax.device_get(states)],
      finite_blocks=lambda states: [_finite_params(s) for s in jax.device_get(states)])


def resolve_parallel(config: Config) -> str:
  """config.parallel with 'auto' decided: 'data' when JAX sees several devices, else 'none'."""
  if config.parallel != 'auto':
    return config.parallel
  return 'data' if jax.device_count() > 1 else 'none'


def optimizer_steps_per_batch(config: Config) -> int:
  """Optimizer updates per global batch: one, or one per micro-batch when pipelining blocks."""
  return config.microbatches if resolve_parallel(config) == 'blocks' else 1


def make_engine(config: Config, model, tx, image_shape) -> Engine:
  """The engine `config.parallel` names; `tx` must count `optimizer_steps_per_batch` steps."""
  kind = resolve_parallel(config)
  skip = config.skip_nonfinite
  if kind == 'data':
    return _data_engine(config, model, tx)
  if kind == 'blocks':
    return _blocks_engine(config, model, tx, image_shape)
  if jax.process_count() > 1:
    raise bw.UsageError(f'--parallel=none trains on one device, so each of the '
                        f'{jax.process_count()} processes would train a model of its own; '
                        f'use --parallel=data or blocks')
  train_step = (bw.make_blockwise_train_step(model, tx, skip_nonfinite=skip)
                if _use_blockwise(config, model)
                else bw.make_train_step(model, tx, skip_nonfinite=skip))
  return Engine(name='none', num_devices=1, put_states=jax.device_put,
                put_batch=jax.device_put, train_step=train_step,
                eval_step=bw.make_eval_step(model), **_host_state_io(jax.device_put))


def _use_blockwise(config: Config, model) -> bool:
  """One jitted call per block (less memory) for bwbpf, unless the fused step is asked for."""
  return config.train_step == 'blockwise' or (
      config.train_step == 'auto' and config.mode == 'bwbpf' and model.num_blocks > 1)


def _data_engine(config: Config, model, tx) -> Engine:
  mesh = parallel.make_mesh()
  if mesh.size == 1:  # Only asked for: 'auto' picks 'data' on several devices alone.
    raise bw.UsageError('--parallel=data shards each batch over several devices, but JAX sees '
                        'one; drop --parallel (auto trains on the one device) or run on '
                        'several devices or processes')
  if config.batch_size % mesh.size:
    raise bw.UsageError(f'--batch_size={config.batch_size} cannot be split evenly over '
                        f'{mesh.size} devices (--parallel=data); use a multiple of {mesh.size}')
  make_step = (parallel.make_data_parallel_blockwise_train_step
               if _use_blockwise(config, model) else parallel.make_data_parallel_train_step)
  put_states = lambda states: parallel.replicate(states, mesh)
  return Engine(
      name='data', num_devices=mesh.size, put_states=put_states, **_host_state_io(put_states),
      put_batch=lambda batch: parallel.shard_batch(batch, mesh),
      train_step=make_step(model, tx, mesh, skip_nonfinite=config.skip_nonfinite),
      eval_step=parallel.make_data_parallel_eval_step(model, mesh),
      feed_slice=parallel.process_info(), mesh_shape=dict(mesh.shape))


def _blocks_engine(config: Config, model, tx, image_shape) -> Engine:
  # Raises UsageError for modes whose gradients cross blocks and for stage counts
  # the blocks or the devices cannot take.
  plan = parallel.make_stage_plan(model, tx, image_shape, config.pipeline_stages)
  mesh = parallel.make_pipeline_mesh(plan.num_stages, max_stages=model.num_blocks)
  pipeline = parallel.StagePipeline(model, tx, plan, mesh,
                                    num_microbatches=config.microbatches,
                                    global_batch_size=config.batch_size,
                                    skip_nonfinite=config.skip_nonfinite,
                                    batch_norm=config.pipeline_batch_norm)
  per_step = functools.partial(parallel.step_metrics, num_microbatches=config.microbatches)

  def train_step(states, batch):
    states, sums = pipeline.step(states, batch)
    return states, per_step(sums)

  def drain(states, last_metrics):
    if plan.num_stages == 1 or last_metrics is None:
      return states, last_metrics
    states, tail = pipeline.drain(states)  # The step's own program, compiled by the first step.
    # step_metrics is linear in the sums: the last step's plus what the drain finished.
    return states, {name: last_metrics[name] + value for name, value in per_step(tail).items()}

  def restore(manager, step, block_target):
    del block_target  # The checkpoint holds packed stages.
    target = {'stages': pipeline.abstract_state().stages}
    saved, meta = checkpoint.restore(manager, step, target,
                                     digest_fn=lambda tree: pipeline.stage_digest(tree['stages']))
    return pipeline.with_stages(saved['stages']), meta

  def finite(states):
    flags = pipeline.block_summaries(states.stages,
                                     lambda block: np.array([_finite_params(block)]))
    return [bool(flag[0]) for flag in flags]

  return Engine(
      name='blocks', num_devices=mesh.size, put_states=pipeline.init,
      put_batch=pipeline.shard_batch, train_step=train_step,
      eval_step=pipeline.evaluate, put_eval_batch=pipeline.shard_batch, drain=drain,
      save_checkpoint=lambda manager, step, states, meta: checkpoint.save(
          manager, step, {'stages': states.stages}, meta,
          digest=pipeline.stage_digest(states.stages)),
      restore_checkpoint=restore,
      block_digests=lambda states: pipeline.block_summaries(states.stages,
                                                            checkpoint.block_params_digest),
      finite_blocks=finite,
      feed_slice=parallel.process_feed_slice(mesh), mesh_shape=dict(mesh.shape),
      batch_norm=config.pipeline_batch_norm)
