"""Training and evaluation steps, written once for all three modes.

The modes differ only inside the model (where `stop_gradient` sits, see
`partition.MODES`); here every block's head loss is summed and differentiated
once. In `bwbpf` mode the gradient of that sum with respect to block k's
parameters *is* block k's local gradient, because the stop_gradient at each
block input cuts every path from a later loss into block k. In `bp` mode the
auxiliary heads see detached features, so the backbone's gradient is the output
loss's alone.

bwbpf-only variants run one block at a time, all on the same two functions:
`block_gradients` (one block's loss, gradient and new batch statistics) and
`apply_block_update` (its optimizer step). The block-wise step jits
`block_train_step` once per block, so each block's activations are freed before
the next block's are made; it computes the fused step's update. The stage
pipeline (`parallel.pipeline`) runs the same two functions inside its stages on
micro-batches: it computes the block-wise step fed those micro-batches in turn.
Parallel variants are these functions jitted with shardings (`state_sharding`,
`batch_sharding` below), not copies of them.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from bwbpf_jax.errors import UsageError
from bwbpf_jax.partition import PartitionedModel
from bwbpf_jax.state import BlockState

# {'image': float [B, H, W, C], 'label': int [B], optional 'mask': float [B], optional
#  'pixels': uint8 [B, H, W, C], the same images before normalisation (reconstruction target)}.
Batch = dict


def require_isolated(model: PartitionedModel, what: str):
  """Raises UsageError unless `model`'s blocks are isolated (mode bwbpf).

  Anything that trains blocks apart from each other (one jitted call per block,
  stages on different devices) computes the right update only when no gradient
  crosses a block boundary.
  """
  if model.mode != 'bwbpf':
    raise UsageError(f'{what} needs isolated blocks (mode bwbpf), not mode {model.mode!r}: '
                     f'in that mode gradients cross blocks')


def needs_pixels(model: PartitionedModel) -> bool:
  """Whether some block reconstructs the image, so batches must carry 'pixels'."""
  return any(getattr(block.head, 'decoder', None) is not None for block in model.blocks)


def loss_targets(batch: Batch) -> dict:
  """What the local losses read from a batch: 'label', and 'pixels' / 'mask' where present."""
  return {name: batch[name] for name in ('label', 'pixels', 'mask') if name in batch}


def reconstruction_target(pixels):
  """The unnormalised image in [0, 1], float32 [B, H, W, C], that InfoPro's decoder reconstructs."""
  return pixels.astype(jnp.float32) / 255.0


def supervised_contrastive_loss(embedding, labels, temperature: float = 0.07, mask=None):
  """Per-anchor supervised contrastive loss (Khosla et al., 2020), one view, as InfoPro uses it.

  With z = embedding / ||embedding|| and s_ij = z_i . z_j / temperature, anchor i's loss is
  -mean over positives p (j != i, same label) of [s_ip - log sum_{j != i} exp(s_ij)],
  0 for an anchor without positives. Examples with mask 0 are neither anchors' partners
  nor counted (their own loss is 0).

  Args:
    embedding: float [B, D].
    labels: int [B].
    temperature: the softmax temperature (InfoPro: 0.07, equal to its base temperature,
      so the loss is not rescaled).
    mask: optional float [B] of 1 (real) and 0 (padding).

  Returns:
    float32 [B].
  """
  z = embedding.astype(jnp.float32)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  similarity = z @ z.T / temperature
  valid = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  partners = valid[:, None] * valid[None, :] * (1.0 - jnp.eye(labels.shape[0]))
  positives = partners * (labels[:, None] == labels[None, :])
  similarity = similarity - jax.lax.stop_gradient(jnp.max(similarity, axis=1, keepdims=True))
  log_denominator = jnp.log(jnp.sum(partners * jnp.exp(similarity), axis=1, keepdims=True)
                            + jnp.finfo(jnp.float32).tiny)
  log_prob = similarity - log_denominator
  num_positives = jnp.sum(positives, axis=1)
  mean_log_prob = jnp.sum(positives * log_prob, axis=1) / jnp.maximum(num_positives, 1.0)
  return -mean_log_prob * valid


def example_losses(block, outputs: dict, targets: dict):
  """Each example's local loss [B] for `block`, from its head's outputs; the one place losses live.

  task_weight * cross-entropy of 'logits' (for 'supcon': task_weight * the contrastive
  loss of 'embedding' + the linear probe's cross-entropy, unweighted, as its input is
  detached and it trains only the probe) + reconstruction_weight * binary cross-entropy
  of 'reconstruction' against the unnormalised image, averaged over its pixels.
  """
  spec, labels = block.loss, targets['label']
  xent = optax.softmax_cross_entropy_with_integer_labels(outputs['logits'], labels)
  if spec.kind == 'supcon':
    loss = spec.task_weight * supervised_contrastive_loss(
        outputs['embedding'], labels, spec.temperature, targets.get('mask')) + xent
  else:
    loss = spec.task_weight * xent
  if 'reconstruction' in outputs:
    bce = optax.sigmoid_binary_cross_entropy(outputs['reconstruction'],
                                             reconstruction_target(targets['pixels']))
    loss = loss + spec.reconstruction_weight * jnp.mean(bce, axis=(1, 2, 3))
  return loss


def _as_targets(targets) -> dict:
  return targets if isinstance(targets, dict) else {'label': targets}


def _apply_block(block, variables, x, targets, train: bool):
  if 'pixels' not in targets and getattr(block.head, 'decoder', None) is not None:
    raise UsageError('this model reconstructs its input: batches need the unnormalised '
                     "images under 'pixels' (data pipelines add them with with_pixels=True)")
  image_shape = tuple(targets['pixels'].shape[1:]) if 'pixels' in targets else None
  if train:
    return block.apply(variables, x, train=True, image_shape=image_shape,
                       mutable=['batch_stats'])
  return block.apply(variables, x, train=False, image_shape=image_shape)


def local_loss(block, params, batch_stats, x, targets):
  """One block's local loss on input `x`, mean over the batch.

  Args:
    block: a `partition.Block`; its `loss` says which loss.
    params, batch_stats: the block's variables.
    x: the block's input [B, H, W, C].
    targets: int labels [B], or a dict {'label', optional 'pixels', optional 'mask'}.

  Returns:
    (loss, (features, head outputs, new batch stats)).
  """
  targets = _as_targets(targets)
  (features, outputs), updated = _apply_block(
      block, {'params': params, 'batch_stats': batch_stats}, x, targets, train=True)
  loss = jnp.mean(example_losses(block, outputs, targets))
  return loss, (features, outputs, updated['batch_stats'])


def network_loss(model: PartitionedModel, params, batch_stats, images, targets):
  """Sum over blocks of the heads' losses; the mode's stop_gradients decide who learns what.

  Returns:
    (total loss, (per-block losses [K], per-block head outputs, per-block new batch stats)).
  """
  x, losses, all_outputs, new_stats = images, [], [], []
  for block, block_params, block_stats in zip(model.blocks, params, batch_stats):
    loss, (x, outputs, stats) = local_loss(block, block_params, block_stats, x, targets)
    losses.append(loss)
    all_outputs.append(outputs)
    new_stats.append(stats)
  losses = jnp.stack(losses)
  return jnp.sum(losses), (losses, all_outputs, tuple(new_stats))


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


def correct_predictions(logits, labels):
  """float32 [B]: 1 where the head's top class is the label; the one definition of accuracy."""
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


def accuracy(logits, labels):
  return jnp.mean(correct_predictions(logits, labels))


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
  grads, (losses, outputs, new_stats) = grad_fn(model, params, batch_stats,
                                                batch['image'], loss_targets(batch))
  new_states, skipped = [], []
  for k, state in enumerate(block_states):
    keep_old = jnp.logical_not(all_finite(losses[k], grads[k])) if skip_nonfinite else None
    new_states.append(apply_block_update(tx, state, grads[k], new_stats[k], keep_old))
    skipped.append(jnp.zeros((), jnp.float32) if keep_old is None
                   else keep_old.astype(jnp.float32))
  metrics = {'loss': losses,
             'accuracy': jnp.stack([accuracy(o['logits'], batch['label']) for o in outputs]),
             'skipped': jnp.stack(skipped)}
  return tuple(new_states), metrics


def block_gradients(block, state: BlockState, x, targets):
  """One block's local loss, its gradient and new batch statistics, on the block's input `x`.

  The per-block half of every bwbpf step (block-wise, data-parallel, stage
  pipeline); `apply_block_update` is the other half.

  Returns:
    (loss, grads (like state.params), new batch_stats, output features [B, ...]
    (not detached), head outputs dict).
  """
  grad_fn = jax.value_and_grad(local_loss, argnums=1, has_aux=True)
  (loss, (features, outputs, stats)), grads = grad_fn(block, state.params, state.batch_stats,
                                                      x, _as_targets(targets))
  return loss, grads, stats, features, outputs


def block_train_step(block, tx: optax.GradientTransformation, state: BlockState, x, targets,
                     skip_nonfinite: bool = False):
  """Updates one isolated block from its own input `x` [B, H, W, C].

  `targets` are int labels [B] or `loss_targets(batch)`.
  Returns (new state, detached output features for the next block, metrics of scalars).
  """
  targets = _as_targets(targets)
  loss, grads, stats, features, outputs = block_gradients(block, state, x, targets)
  keep_old = jnp.logical_not(all_finite(loss, grads)) if skip_nonfinite else None
  new_state = apply_block_update(tx, state, grads, stats, keep_old)
  metrics = {'loss': loss, 'accuracy': accuracy(outputs['logits'], targets['label']),
             'skipped': (jnp.zeros((), jnp.float32) if keep_old is None
                         else keep_old.astype(jnp.float32))}
  return new_state, jax.lax.stop_gradient(features), metrics


def block_eval_sums(block, state: BlockState, x, targets: dict):
  """One block in inference mode: (output features, correct count, loss sum) over `mask`.

  `targets` holds 'label' and 'mask' (float [B]: 1 real, 0 padding), and
  'pixels' where the block reconstructs the image. Sums, so that batches,
  micro-batches and devices add up.
  """
  features, outputs = _apply_block(
      block, {'params': state.params, 'batch_stats': state.batch_stats}, x, targets,
      train=False)
  mask = targets['mask']
  correct = jnp.sum(correct_predictions(outputs['logits'], targets['label']) * mask)
  loss = jnp.sum(example_losses(block, outputs, targets) * mask)
  return features, correct, loss


def eval_step(model: PartitionedModel, block_states, batch: Batch):
  """Every head's predictions on a batch, in inference mode (running batch statistics).

  Returns sums, so batches add up: 'correct' [K] and 'loss' [K] (each block's
  local loss, `example_losses`, as in training) summed over the examples whose
  'mask' is 1, and 'count' (a scalar) of those examples.
  """
  mask = batch.get('mask', jnp.ones(batch['label'].shape, jnp.float32))
  targets = {**loss_targets(batch), 'mask': mask}
  x, correct, loss = batch['image'], [], []
  for block, state in zip(model.blocks, block_states):
    x, block_correct, block_loss = block_eval_sums(block, state, x, targets)
    correct.append(block_correct)
    loss.append(block_loss)
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


def _shardings(state_sharding, batch_sharding, *, ins: tuple, outs) -> dict:
  """jit's in/out_shardings from roles ('state' or 'batch' per argument and result).

  `outs` is a tuple of roles for a tuple result, or one role for the whole
  result. Without shardings, jit places everything (one device).
  """
  if state_sharding is None and batch_sharding is None:
    return {}
  role = {'state': state_sharding, 'batch': batch_sharding}
  return {'in_shardings': tuple(role[r] for r in ins),
          'out_shardings': role[outs] if isinstance(outs, str) else tuple(role[r] for r in outs)}


def make_train_step(model: PartitionedModel, tx: optax.GradientTransformation, *,
                    skip_nonfinite: bool = False, donate: bool = True,
                    state_sharding=None, batch_sharding=None):
  """`train_step` jitted for this model: (block_states, batch) -> (block_states, metrics).

  The old block states are donated, so parameters and optimizer state are updated
  in place in device memory. With shardings (e.g. states replicated and the
  batch split over a mesh, `parallel.data_parallel`), the compiler partitions
  this same step: the loss is the mean over the global batch, so gradients are
  averaged over devices and BatchNorm takes global batch statistics.
  """
  fn = functools.partial(train_step, model, tx, skip_nonfinite=skip_nonfinite)
  return jax.jit(fn, donate_argnums=(0,) if donate else (), **jit_options(model),
                 **_shardings(state_sharding, batch_sharding, ins=('state', 'batch'),
                              outs=('state', 'state')))


def make_eval_step(model: PartitionedModel, *, state_sharding=None, batch_sharding=None):
  """`eval_step` jitted for this model: (block_states, batch) -> sums of metrics."""
  return jax.jit(functools.partial(eval_step, model),
                 **_shardings(state_sharding, batch_sharding, ins=('state', 'batch'),
                              outs='state'))


def make_blockwise_train_step(model: PartitionedModel, tx: optax.GradientTransformation, *,
                              skip_nonfinite: bool = False, donate: bool = True,
                              state_sharding=None, batch_sharding=None):
  """A bwbpf step as K jitted calls of `block_train_step`, one block at a time.

  Same update as `make_train_step` in bwbpf mode, but only one block's
  activations are alive at a time, which lowers peak memory roughly K-fold for
  the activations (each call's block state is donated). Dispatch is asynchronous, so
  the host does not wait between blocks. Shardings as in `make_train_step`: a
  block's input, labels and output features go with the batch.
  """
  require_isolated(model, 'the block-wise step')
  sharded = _shardings(state_sharding, batch_sharding, ins=('state', 'batch', 'batch'),
                       outs=('state', 'batch', 'state'))
  return chain_block_steps([
      jax.jit(functools.partial(block_train_step, block, tx, skip_nonfinite=skip_nonfinite),
              donate_argnums=(0,) if donate else (), **jit_options(model), **sharded)
      for block in model.blocks])


def chain_block_steps(block_steps):
  """(block_states, batch) -> (block_states, metrics [K]) from K jitted `block_train_step`s.

  Each call gets the previous block's detached output; how the calls are jitted
  (one device, or sharded over a mesh) is the caller's choice.
  """

  def step(block_states, batch: Batch):
    x, targets, new_states, metrics = batch['image'], loss_targets(batch), [], []
    for block_step, state in zip(block_steps, block_states):
      state, x, block_metrics = block_step(state, x, targets)
      new_states.append(state)
      metrics.append(block_metrics)
    return tuple(new_states), {name: jnp.stack([m[name] for m in metrics])
                               for name in metrics[0]}
  return step
