"""The benchmark's FLOP count, which its MFU figures rest on."""

import jax
import jax.numpy as jnp

import bwbpf_jax as bw
from benchmarks import bench


def _vgg11_forward_flops(width: float, size: int, batch: int, model) -> int:
  """2 x multiply-adds of VGG-11's forward at `size`x`size`, counted by hand.

  Every 3x3 convolution counts 9 taps at every output position, padding
  included; every head (average pool + dense) counts its dense layer.
  """
  channels = [64, 128, 256, 256, 512, 512, 512, 512]
  pool_after = [True, True, False, True, False, True, False, True]
  flops, c_in, block_ends = 0, 3, [p - 1 for p in model.split_points] + [len(channels) - 1]
  for unit, (c, pool) in enumerate(zip(channels, pool_after)):
    c_out = bw.models.layers.scaled(c, width)
    flops += 2 * (size * size * 9) * c_in * c_out
    if unit in block_ends:
      flops += 2 * c_out * model.num_classes  # The head reading this block's output.
    c_in, size = c_out, size // 2 if pool else size
  return batch * flops


def test_forward_flops_match_a_hand_count():
  model = bw.build_model('vgg11', num_classes=10, num_blocks=4, width=0.25)
  tx = bw.make_optimizer('sgd', total_steps=10)
  states = bw.abstract_block_states(model, tx, (2, 32, 32, 3))
  batch = {'image': jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32),
           'label': jax.ShapeDtypeStruct((2,), jnp.int32)}
  counted = bench.forward_flops(model, states, batch)
  by_hand = _vgg11_forward_flops(0.25, 32, 2, model)
  # One convention counted two ways (the traced network, the architecture table): equal.
  assert counted == by_hand, (counted, by_hand)
