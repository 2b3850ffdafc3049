"""The benchmark's FLOP count, which its MFU figures rest on."""

import jax
import jax.numpy as jnp

import bwbpf_jax as bw
from experiments import bench


def _vgg11_conv_flops(width: float, size: int, count_padding: bool) -> int:
  """2 x multiply-adds of VGG-11's 3x3 convolutions at `size`x`size`, counted by hand.

  Without `count_padding`, only kernel taps that land inside the image count, as
  XLA counts a convolution: (3n - 2)^2 of the 9 n^2 taps on an n x n map.
  """
  channels = [64, 128, 256, 256, 512, 512, 512, 512]
  pool_after = [True, True, False, True, False, True, False, True]
  flops, c_in = 0, 3
  for c, pool in zip(channels, pool_after):
    c_out = bw.models.layers.scaled(c, width)
    taps = 9 * size * size if count_padding else (3 * size - 2) ** 2
    flops += 2 * taps * c_in * c_out
    c_in, size = c_out, size // 2 if pool else size
  return flops


def test_forward_flops_counts_the_convolutions():
  model = bw.build_model('vgg11', num_classes=10, num_blocks=4, width=0.25)
  tx = bw.make_optimizer('sgd', total_steps=10)
  states = bw.abstract_block_states(model, tx, (2, 32, 32, 3))
  batch = {'image': jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32),
           'label': jax.ShapeDtypeStruct((2,), jnp.int32)}
  counted = bench.forward_flops(model, states, batch) / 2
  # The CPU's im2col path (maps smaller than the kernel) multiplies the padding zeros too;
  # BatchNorm, ReLU, pooling and the heads add a little.
  assert _vgg11_conv_flops(0.25, 32, False) <= counted
  assert counted <= 1.05 * _vgg11_conv_flops(0.25, 32, True)
