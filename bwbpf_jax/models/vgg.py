"""VGG with BatchNorm as a flat sequence of conv units (Simonyan & Zisserman, 2015).

Every 3x3 conv + BN + ReLU is one unit, so a partition may cut between any two
convolutions; the unit that ends a stage also max-pools. The classifier is the
last block's head (global average pool + linear, which at 32x32 is exactly the
CIFAR VGG's flatten + linear).
"""

from typing import Any

from flax import linen as nn
import jax.numpy as jnp

from bwbpf_jax.models import layers

STAGE_CHANNELS = (64, 128, 256, 512, 512)
CONVS_PER_STAGE = {
    'vgg11': (1, 1, 2, 2, 2),
    'vgg13': (2, 2, 2, 2, 2),
    'vgg16': (2, 2, 3, 3, 3),
    'vgg19': (2, 2, 4, 4, 4),
}


class ConvUnit(nn.Module):
  """3x3 conv (with bias, as torchvision's vgg*_bn) -> BN -> ReLU [-> 2x2 max-pool]."""
  features: int
  pool: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = layers.conv(self.features, 3, use_bias=True, dtype=self.dtype)(x)
    x = nn.relu(layers.batch_norm(train, self.dtype)(x))
    if self.pool and x.shape[1] > 1:  # Inputs smaller than 32x32 stop pooling at 1x1.
      x = layers.max_pool_2x2(x)
    return x

  @property
  def downsamples(self) -> bool:
    """Whether the unit halves the map (what AugLocal's copies of it must know)."""
    return self.pool

  def with_downsampling(self, downsample: bool) -> 'ConvUnit':
    """A fresh, unbound copy that pools or not."""
    return self.clone(parent=None, pool=downsample)


def vgg_units(arch: str, width: float = 1.0, dtype=jnp.float32):
  """Returns (stem, units, stage_of_unit) for a VGG; VGG has no stem."""
  units, stages = [], []
  for stage, (channels, count) in enumerate(zip(STAGE_CHANNELS, CONVS_PER_STAGE[arch])):
    for i in range(count):
      units.append(ConvUnit(layers.scaled(channels, width), pool=(i == count - 1), dtype=dtype))
      stages.append(stage)
  return None, tuple(units), tuple(stages)
