"""One CNN written twice, for the benchmark of a user's convolutions in the stage pipeline.

`flax_cnn` is written as a user writes it, with `flax.linen.Conv` and
`flax.linen.BatchNorm` ('SAME' padding, flax's defaults); `library_cnn` is the
same network built from the library's layers (`bwbpf_jax.models.layers.conv`,
the oneDNN convolution on CPU). Blocks run every plain `nn.Conv` through the
library's convolution (`layers.library_layers`), so the two should train at
the same speed, also inside the pipeline's `lax.switch`, where XLA:CPU's own
convolution is ~60x slower (jax#12868):

    python -m benchmarks.parallel_bench --arch=benchmarks.user_cnn:flax_cnn \\
        --processes=2 --num_blocks=2 --batch_size=128 --microbatches=4 --configs=sync,blocks
    python -m benchmarks.parallel_bench --arch=benchmarks.user_cnn:library_cnn ...
    python -m benchmarks.parallel_bench --arch=benchmarks.user_cnn:xla_cnn ...

`xla_cnn` is the flax network with XLA's convolution chosen explicitly, which
blocks leave alone: what a user's network ran before blocks routed it.

Six 3x3 conv-BN-ReLU units, 16-16-32(stride 2)-32-64(stride 2)-64 channels, on
32x32 images: a CIFAR-sized CNN of the size the CPU figures use.
"""

from flax import linen as nn
from jax import lax

import bwbpf_jax
from bwbpf_jax.models import layers

CHANNELS_AND_STRIDES = ((16, 1), (16, 1), (32, 2), (32, 1), (64, 2), (64, 1))


class FlaxConvUnit(nn.Module):
  """3x3 conv -> BatchNorm -> ReLU, in plain flax.linen."""
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (3, 3), strides=(self.stride, self.stride), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
    return nn.relu(x)


class XlaConvUnit(nn.Module):
  """The flax unit with XLA's convolution chosen explicitly (what a user's nn.Conv ran before
  blocks routed it through the library's convolution): the baseline of the comparison."""
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (3, 3), strides=(self.stride, self.stride), use_bias=False,
                conv_general_dilated=lax.conv_general_dilated)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
    return nn.relu(x)


class LibraryConvUnit(nn.Module):
  """The same unit from the library's layers (explicit symmetric padding, as PyTorch pads)."""
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    x = layers.conv(self.features, 3, self.stride, use_bias=False, dtype=x.dtype)(x)
    return nn.relu(layers.batch_norm(train)(x))


def flax_cnn() -> bwbpf_jax.Network:
  return bwbpf_jax.Network(units=tuple(FlaxConvUnit(c, s) for c, s in CHANNELS_AND_STRIDES),
                           name='flax_cnn')


def xla_cnn() -> bwbpf_jax.Network:
  return bwbpf_jax.Network(units=tuple(XlaConvUnit(c, s) for c, s in CHANNELS_AND_STRIDES),
                           name='xla_cnn')


def library_cnn() -> bwbpf_jax.Network:
  return bwbpf_jax.Network(units=tuple(LibraryConvUnit(c, s) for c, s in CHANNELS_AND_STRIDES),
                           name='library_cnn')
