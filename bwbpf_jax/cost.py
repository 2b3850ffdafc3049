"""What blocks and heads cost: FLOPs of every head against the backbone's, and the
activation memory each unit keeps for its backward pass.

Local-learning methods differ in how much compute their auxiliary networks add
(a pooled linear head is nearly free, AugLocal's copies of later units are
not), so comparisons should state it. Counts are XLA's cost analysis of the
lowered (pre-optimisation) inference forward, traced with XLA's own
convolutions so that every convolution is counted; the training step costs
about 3x the forward for backbone and heads alike, so the fractions hold for
training too.
"""

import functools
from typing import Union

import jax
import jax.numpy as jnp
import optax

from bwbpf_jax import models
from bwbpf_jax.models import layers
from bwbpf_jax.network import Network, layer_failure
from bwbpf_jax.errors import UsageError
from bwbpf_jax.partition import PartitionedModel
from bwbpf_jax.splits import balanced_split_points
from bwbpf_jax.state import abstract_block_states


def _lowered(fn, *args):
  with layers.xla_convolutions():
    return jax.jit(fn).lower(*args)


def _flops(lowered) -> float:
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0)) if cost else 0.0


def _block_features(block, variables, x):
  return block.apply(variables, x, train=False, method='features')


def _head_alone(block, variables, features, image_shape):
  return block.apply(variables, features, train=False, image_shape=image_shape,
                     method='head_outputs')


def flop_counts(model: PartitionedModel, input_shape) -> dict:
  """FLOPs per image of each block's backbone part and of its head, inference forward.

  Each block's backbone part and its head are lowered once each, the head on the
  backbone part's output shape (the lowering gives it): the backbone, by far the
  larger program, is traced once, not again as part of the whole block.

  Args:
    model: the partitioned network.
    input_shape: one image's [H, W, C].

  Returns:
    {'backbone': [K] floats (stem and units of block k), 'head': [K] floats
    (block k's head: its auxiliary network, with decoder or probe if any; the
    output layer for the last block)}.
  """
  states = abstract_block_states(model, optax.identity(), input_shape)
  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  image_shape = tuple(input_shape[-3:])
  backbone, head = [], []
  for block, state in zip(model.blocks, states):
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    features = _lowered(functools.partial(_block_features, block), variables, x)
    backbone.append(_flops(features))
    x = features.out_info
    head.append(_flops(_lowered(
        functools.partial(_head_alone, block, image_shape=image_shape), variables, x)))
  return {'backbone': backbone, 'head': head}


def aux_flop_fractions(model: PartitionedModel, input_shape) -> dict:
  """Each auxiliary head's FLOPs as a fraction of the whole backbone's (units and output layer).

  Returns:
    {'per_head': [K-1] fractions, 'total': their sum: the extra compute of
    block-wise training's forward pass over the plain network's}.
  """
  counts = flop_counts(model, input_shape)
  network = sum(counts['backbone']) + counts['head'][-1]
  per_head = [h / network for h in counts['head'][:-1]]
  return {'per_head': per_head, 'total': sum(per_head)}


def _nbytes(tree) -> int:
  return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def unit_activation_bytes(network: Union[Network, str], input_shape, *, batch_size: int,
                          width: float = 1.0, stem: str = 'cifar', dtype=jnp.float32) -> list:
  """Bytes each unit keeps alive between its forward and backward pass, training mode.

  The residuals of the unit's VJP (its input, conv outputs, BatchNorm
  intermediates, the weights its input gradient needs), from `jax.eval_shape`:
  nothing is computed. A block-wise step's peak memory is set by its largest
  block's residuals, the sum over its units; the stem's count goes to unit 0,
  the block it always belongs to. Counted with XLA's convolutions (a oneDNN
  convolution keeps the same tensors).

  Args:
    network: a `Network`, a built-in name or 'package.module:function' (as
      `build_model`'s).
    input_shape: one example's shape ([H, W, C] for an image).
    batch_size: examples per step (activations scale with it, weights do not).
    width, stem, dtype: as `build_model`'s (built-in networks).

  Returns:
    One byte count per unit.
  """
  network = models.resolve(network, width=width, stem=stem, dtype=dtype)
  x = jax.ShapeDtypeStruct((batch_size,) + tuple(input_shape), jnp.float32)
  counts = []
  labelled = ([('the stem', network.stem)] if network.stem is not None else []) + [
      (f'unit {i} ({type(unit).__name__})', unit) for i, unit in enumerate(network.units)]
  with layers.xla_convolutions():
    for label, layer in labelled:
      try:
        variables = jax.eval_shape(functools.partial(layer.init, train=True),
                                   jax.random.key(0), x)
      except Exception as e:  # pylint: disable=broad-except
        raise layer_failure(label, e, x.shape) from None
      params, others = variables['params'], {k: v for k, v in variables.items() if k != 'params'}

      def forward(params, x, others, layer=layer):
        y, _ = layer.apply({**others, 'params': params}, x, train=True, mutable=list(others))
        return y

      residuals = jax.eval_shape(
          lambda p, x, o: jax.vjp(functools.partial(forward, others=o), p, x)[1], params, x,
          others)
      counts.append(_nbytes(residuals))
      x = jax.eval_shape(forward, params, x, others)
  if network.stem is not None:
    counts = [counts[0] + counts[1]] + counts[2:]
  return counts


def activation_balanced_split_points(network: Union[Network, str], num_blocks: int,
                                     input_shape, *, batch_size: int, width: float = 1.0,
                                     stem: str = 'cifar', dtype=jnp.float32) -> tuple:
  """Split points that make the largest block's activation memory smallest.

  The block-wise bwbpf step holds one block's activations at a time, so its peak
  memory follows the largest block. The paper's cut (`default_split_points`)
  balances unit counts; early units at full resolution keep far more than late
  ones (ResNet-50 at 32x32: 0.9 GB against 0.1 GB per unit at batch 128), so a
  cut balanced on `unit_activation_bytes` lowers the peak for the same K.
  """
  costs = unit_activation_bytes(network, input_shape, batch_size=batch_size, width=width,
                                stem=stem, dtype=dtype)
  if not 1 <= num_blocks <= len(costs):
    raise UsageError(f'cannot cut {len(costs)} units into {num_blocks} blocks; '
                     f'choose num_blocks between 1 and {len(costs)}')
  return balanced_split_points(costs, num_blocks)


# Where build_model's blocks end: 'stages' is the paper's cut (partition.default_split_points),
# 'activations' balances the blocks' activation memory (activation_balanced_split_points).
SPLIT_BY = ('stages', 'activations')


def split_points_by(split_by: str, network: Union[Network, str], num_blocks: int, input_shape, *,
                    batch_size: int, width: float = 1.0, stem: str = 'cifar',
                    dtype=jnp.float32):
  """`build_model`'s split_points for a cut named in `SPLIT_BY` (None: the paper's default)."""
  if split_by == 'stages':
    return None
  return activation_balanced_split_points(network, num_blocks, input_shape,
                                          batch_size=batch_size, width=width, stem=stem,
                                          dtype=dtype)
