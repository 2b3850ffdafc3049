"""Training and evaluation steps, written once for all three modes.

The modes differ only inside the model (where `stop_gradient` sits, see
`partition.MODES`); here every block's head loss is summed and differentiated
once. In `bwbpf` mode the gradient of that sum with respect to block k's
parameters *is* block k's local gradient, because the stop_gradient at each
block input cuts every path from a later loss into block k. In `bp` mode the
auxiliary heads see detached features, so the backbone's gradient is the output
loss's alone.

bwbpf-only variants run one block at a time: the block-wise step (one jitted
`block_train_step` per block: each block's activations are freed before the
next block's are made) and the block-parallel pipelines in `parallel/` (the
SPMD stage pipeline differentiates `local_loss` per block inside its stages).
They compute the same update as the fused step.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from bwbpf_jax.errors import UsageError
from bwbpf_jax.partition import PartitionedModel
from bwbpf_jax.state import BlockState

Batch = dict  # {'image': float [B, H, W, C], 'label': int [B], optional 'mask': float [B]}


def local_loss(block, params, batch_stats, x, labels):
  """Cross-entropy of one block's head on input `x`; returns (loss, (features, logits, stats))."""
  (features, logits), updated = block.apply(
      {'params': params, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats'])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, (features, logits, updated['batch_stats'])


def network_loss(model: PartitionedModel, params, batch_stats, images, labels):
  """Sum over blocks of the heads' losses; the mode's stop_gradients decide who learns what.

  Returns:
    (total loss, (per-block losses [K], per-block logits, per-block new batch stats)).
  """
  x, losses, all_logits, new_stats = images, [], [], []
  for block, block_params, block_stats in zip(model.blocks, params, batch_stats):
    loss, (x, logits, stats) = local_loss(block, block_params, block_stats, x, labels)
    losses.append(loss)
    all_logits.append(logits)
    new_stats.append(stats)
  losses = jnp.stack(losses)
  return jnp.sum(losses), (losses, all_logits, tuple(new_stats))


def all_finite(loss, grads) -> jax.Array:
  """Whether a loss and every gradient leaf are finite (a traced bool)."""
  leaves = [jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]
  return jnp.logical_and(jnp.isfinite(loss), jnp.all(jnp.stack(leaves)))


def apply_block_update(tx: optax.GradientTransformation, state: BlockState, grads,
                       batch_stats, keep_old=None) -> BlockState:
  """One optimizer step for one block. If `keep_old` (a traced bool) is true, nothing changes."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = BlockState(params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state)
  if keep_old is None:
    return new_state
  return jax.tree_util.tree_map(lambda old, new: jnp.where(keep_old, old, new), state, new_state)


def _accuracy(logits, labels):
  return jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))


def train_step(model: PartitionedModel, tx: optax.GradientTransformation, block_states,
               batch: Batch, skip_nonfinite: bool = False):
  """Updates every block from one batch; pure, jit it with `make_train_step`.

  Args:
    model: the partitioned network (its mode is baked into its blocks).
    tx: the optimizer; block k's state is `block_states[k].opt_state`.
    block_states: tuple of K `BlockState`.
    batch: {'image': [B, H, W, C], 'label': [B]}.
    skip_nonfinite: leave a block unchanged when its loss or gradient is not finite.

  Returns:
    (new block states, metrics) with metrics 'loss', 'accuracy', 'skipped', each [K].
  """
  params = tuple(s.params for s in block_states)
  batch_stats = tuple(s.batch_stats for s in block_states)
  grad_fn = jax.grad(network_loss, argnums=1, has_aux=True)
  grads, (losses, logits, new_stats) = grad_fn(model, params, batch_stats,
                                               batch['image'], batch['label'])
  new_states, skipped = [], []
  for k, state in enumerate(block_states):
    keep_old = jnp.logical_not(all_finite(losses[k], grads[k])) if skip_nonfinite else None
    new_states.append(apply_block_update(tx, state, grads[k], new_stats[k], keep_old))
    skipped.append(jnp.zeros((), jnp.float32) if keep_old is None
                   else keep_old.astype(jnp.float32))
  metrics = {'loss': losses,
             'accuracy': jnp.stack([_accuracy(l, batch['label']) for l in logits]),
             'skipped': jnp.stack(skipped)}
  return tuple(new_states), metrics


def block_train_step(block, tx: optax.GradientTransformation, state: BlockState, x, labels,
                     skip_nonfinite: bool = False):
  """Updates one isolated block from its own input `x` [B, H, W, C].

  Returns (new state, detached output features for the next block, metrics of scalars).
  """
  grad_fn = jax.value_and_grad(local_loss, argnums=1, has_aux=True)
  (loss, (features, logits, stats)), grads = grad_fn(block, state.params, state.batch_stats,
                                                     x, labels)
  keep_old = jnp.logical_not(all_finite(loss, grads)) if skip_nonfinite else None
  new_state = apply_block_update(tx, state, grads, stats, keep_old)
  metrics = {'loss': loss, 'accuracy': _accuracy(logits, labels),
             'skipped': (jnp.zeros((), jnp.float32) if keep_old is None
                         else keep_old.astype(jnp.float32))}
  return new_state, jax.lax.stop_gradient(features), metrics


def eval_step(model: PartitionedModel, block_states, batch: Batch):
  """Every head's predictions on a batch, in inference mode (running batch statistics).

  Returns sums, so batches add up: 'correct' [K] and 'loss' [K] summed over the
  examples whose 'mask' is 1, and 'count' (a scalar) of those examples.
  """
  mask = batch.get('mask', jnp.ones(batch['label'].shape, jnp.float32))
  x, correct, loss = batch['image'], [], []
  for block, state in zip(model.blocks, block_states):
    x, logits = block.apply({'params': state.params, 'batch_stats': state.batch_stats},
                            x, train=False)
    hits = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    correct.append(jnp.sum(hits * mask))
    loss.append(jnp.sum(xent * mask))
  return {'correct': jnp.stack(correct), 'loss': jnp.stack(loss), 'count': jnp.sum(mask)}


def jit_options(model: PartitionedModel) -> dict:
  """Keyword arguments for `jax.jit` of a train step of `model`.

  With `model.remat` on CPU, XLA keeps the optimization barriers that
  `jax.checkpoint` puts around each unit's recomputation. XLA:CPU otherwise
  drops them before its last common-subexpression pass, which then merges the
  recomputation back into the forward pass: no memory saved (ResNet-18 width
  0.25, batch 64, K=1: 107 MiB of XLA temporaries with or without remat; 36 MiB
  with the barriers kept). Programs without barriers are unaffected by the option.
  """
  if model.remat and jax.default_backend() == 'cpu':
    return {'compiler_options': {'xla_disable_hlo_passes': 'cse_barrier_expander'}}
  return {}


def make_train_step(model: PartitionedModel, tx: optax.GradientTransformation, *,
                    skip_nonfinite: bool = False, donate: bool = True):
  """`train_step` jitted for this model: (block_states, batch) -> (block_states, metrics).

  The old block states are donated, so parameters and optimizer state are updated
  in place in device memory.
  """
  fn = functools.partial(train_step, model, tx, skip_nonfinite=skip_nonfinite)
  return jax.jit(fn, donate_argnums=(0,) if donate else (), **jit_options(model))


def make_eval_step(model: PartitionedModel):
  """`eval_step` jitted for this model: (block_states, batch) -> sums of metrics."""
  return jax.jit(functools.partial(eval_step, model))


def make_blockwise_train_step(model: PartitionedModel, tx: optax.GradientTransformation, *,
                              skip_nonfinite: bool = False, donate: bool = True):
  """A bwbpf step as K jitted calls, one block at a time.

  Same update as `make_train_step` in bwbpf mode, but only one block's
  activations are alive at a time, which lowers peak memory roughly K-fold for
  the activations (each call's inputs are donated). Dispatch is asynchronous, so
  the host does not wait between blocks.
  """
  if model.mode != 'bwbpf':
    raise UsageError(f'the block-wise step needs isolated blocks (mode bwbpf), '
                     f'not mode {model.mode!r}: in that mode gradients cross blocks')
  return chain_block_steps([
      jax.jit(functools.partial(block_train_step, block, tx, skip_nonfinite=skip_nonfinite),
              donate_argnums=(0,) if donate else (), **jit_options(model))
      for block in model.blocks])


def chain_block_steps(block_steps):
  """(block_states, batch) -> (block_states, metrics [K]) from K jitted `block_train_step`s.

  Each call gets the previous block's detached output; how the calls are jitted
  (one device, or sharded over a mesh) is the caller's choice.
  """

  def step(block_states, batch: Batch):
    x, labels, new_states, metrics = batch['image'], batch['label'], [], []
    for block_step, state in zip(block_steps, block_states):
      state, x, block_metrics = block_step(state, x, labels)
      new_states.append(state)
      metrics.append(block_metrics)
    return tuple(new_states), {name: jnp.stack([m[name] for m in metrics])
                               for name in metrics[0]}
  return step
