"""ResNets (He et al., 2016) as a stem followed by a flat sequence of residual units.

Basic units (two 3x3 convs) for ResNet-18/34, bottleneck units (1x1, 3x3, 1x1
with 4x expansion; stride on the 3x3, as torchvision's v1.5) for ResNet-50/101/152.
The `cifar` stem is one 3x3 stride-1 conv for 32x32 inputs; the `imagenet` stem
is a 7x7 stride-2 conv and a 3x3 stride-2 max-pool, for 64x64 and larger.
"""

from typing import Any

from flax import linen as nn
import jax.numpy as jnp

from bwbpf_jax.models import layers

STAGE_CHANNELS = (64, 128, 256, 512)
UNITS_PER_STAGE = {
    'resnet18': (2, 2, 2, 2),
    'resnet34': (3, 4, 6, 3),
    'resnet50': (3, 4, 6, 3),
    'resnet101': (3, 4, 23, 3),
    'resnet152': (3, 8, 36, 3),
}
BOTTLENECK = {'resnet18': False, 'resnet34': False,
              'resnet50': True, 'resnet101': True, 'resnet152': True}
STEMS = ('cifar', 'imagenet')


class Stem(nn.Module):
  """Input stem; its output has `features` channels."""
  features: int
  kind: str = 'cifar'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if self.kind == 'cifar':
      x = layers.conv(self.features, 3, use_bias=False, dtype=self.dtype)(x)
      return nn.relu(layers.batch_norm(train, self.dtype)(x))
    x = layers.conv(self.features, 7, 2, use_bias=False, dtype=self.dtype)(x)
    x = nn.relu(layers.batch_norm(train, self.dtype)(x))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

  @property
  def downsamples(self) -> bool:
    return self.kind != 'cifar'

  def with_downsampling(self, downsample: bool) -> 'Stem':
    """A fresh copy; a stem's resolution is fixed by its kind, so only its own is possible."""
    if downsample != self.downsamples:
      raise ValueError(f'a {self.kind} stem cannot be copied with downsample={downsample}')
    return self.clone(parent=None)


class ResidualUnit(nn.Module):
  """One basic or bottleneck unit with a projection shortcut where shapes change."""
  features: int
  stride: int = 1
  bottleneck: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda f, k, s=1: layers.conv(f, k, s, use_bias=False, dtype=self.dtype)
    bn = lambda: layers.batch_norm(train, self.dtype)
    if self.bottleneck:
      out_features = 4 * self.features
      y = nn.relu(bn()(conv(self.features, 1)(x)))
      y = nn.relu(bn()(conv(self.features, 3, self.stride)(y)))
      y = bn()(conv(out_features, 1)(y))
    else:
      out_features = self.features
      y = nn.relu(bn()(conv(self.features, 3, self.stride)(x)))
      y = bn()(conv(self.features, 3)(y))
    if self.stride != 1 or x.shape[-1] != out_features:
      x = bn()(conv(out_features, 1, self.stride)(x))
    return nn.relu(x + y)

  @property
  def downsamples(self) -> bool:
    """Whether the unit halves the map (what AugLocal's copies of it must know)."""
    return self.stride > 1

  def with_downsampling(self, downsample: bool) -> 'ResidualUnit':
    """A fresh, unbound copy with stride 2 or 1."""
    return self.clone(parent=None, stride=2 if downsample else 1)


def resnet_units(arch: str, width: float = 1.0, stem: str = 'cifar', dtype=jnp.float32):
  """Returns (stem, units, stage_of_unit) for a ResNet."""
  units, stages = [], []
  for stage, (channels, count) in enumerate(zip(STAGE_CHANNELS, UNITS_PER_STAGE[arch])):
    for i in range(count):
      stride = 2 if (stage > 0 and i == 0) else 1
      units.append(ResidualUnit(layers.scaled(channels, width), stride,
                                BOTTLENECK[arch], dtype=dtype))
      stages.append(stage)
  stem_module = Stem(layers.scaled(STAGE_CHANNELS[0], width), stem, dtype=dtype)
  return stem_module, tuple(units), tuple(stages)
