"""Layer defaults shared by the architectures, matching their PyTorch reference recipes."""

import functools

from flax import linen as nn
import jax.numpy as jnp

# He-normal on fan-out, as torchvision initialises VGG and ResNet convolutions.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def batch_norm(train: bool, dtype=jnp.float32, name=None) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1 there is 0.9 here)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, name=name)


def conv(features: int, kernel: int, stride: int = 1, *, use_bias: bool, dtype, name=None):
  """A square convolution with 'same'-style symmetric padding, as PyTorch pads."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=use_bias, dtype=dtype,
                 kernel_init=conv_kernel_init, name=name)


def scaled(channels: int, width: float) -> int:
  """Channel count under a width multiplier (width 0.25 turns 64 into 16)."""
  return max(1, int(round(channels * width)))


max_pool_2x2 = functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2))
