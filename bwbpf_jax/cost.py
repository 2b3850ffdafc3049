"""What the auxiliary networks cost: FLOPs of every head against the backbone's.

Local-learning methods differ in how much compute their auxiliary networks add
(a pooled linear head is nearly free, AugLocal's copies of later units are
not), so comparisons should state it. Counts are XLA's cost analysis of the
lowered (pre-optimisation) inference forward, traced with XLA's own
convolutions so that every convolution is counted; the training step costs
about 3x the forward for backbone and heads alike, so the fractions hold for
training too.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from bwbpf_jax.models import layers
from bwbpf_jax.partition import PartitionedModel
from bwbpf_jax.state import abstract_block_states


def _flops(fn, *args) -> float:
  with layers.xla_convolutions():
    lowered = jax.jit(fn).lower(*args)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0)) if cost else 0.0


def _block_forward(block, variables, x, image_shape):
  return block.apply(variables, x, train=False, image_shape=image_shape)


def _block_features(block, variables, x):
  return block.apply(variables, x, train=False, method='features')


def flop_counts(model: PartitionedModel, input_shape) -> dict:
  """FLOPs per image of each block's backbone part and of its head, inference forward.

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
    whole = _flops(functools.partial(_block_forward, block, image_shape=image_shape), variables,
                   x)
    features = _flops(functools.partial(_block_features, block), variables, x)
    backbone.append(features)
    head.append(whole - features)
    x = jax.eval_shape(functools.partial(_block_features, block), variables, x)
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
