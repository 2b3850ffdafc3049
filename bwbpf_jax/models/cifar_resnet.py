"""The CIFAR ResNets of He et al. (2016, section 4.2): ResNet-20/32/56/110.

Three stages of basic units (two 3x3 convs) with 16, 32 and 64 channels on a
32x32 input, 3, 5, 9 or 18 units per stage: the networks the local-learning
literature (DGL, InfoPro, AugLocal) reports on.

Shortcuts are option B of the paper: identity, except a 1x1 projection + BN
where the shape changes (twice per network). This is what InfoPro's reference
code builds; option A (zero-padded identity) would have 2,752 parameters fewer
(0.27M/0.46M/0.85M/1.7M either way).

The stem (3x3 conv-BN-ReLU, 16 channels) is unit 0 of stage 0 rather than
part of block 0, so a block may end right after it: InfoPro's 16-block
ResNet-32 has the stem alone as its first local module.
"""

import jax.numpy as jnp

from bwbpf_jax.models import layers
from bwbpf_jax.models import resnet

STAGE_CHANNELS = (16, 32, 64)
UNITS_PER_STAGE = {
    'resnet20': (3, 3, 3),
    'resnet32': (5, 5, 5),
    'resnet56': (9, 9, 9),
    'resnet110': (18, 18, 18),
}


def cifar_resnet_units(arch: str, width: float = 1.0, stem: str = 'cifar', dtype=jnp.float32):
  """Returns (None, units, stage_of_unit); units[0] is the stem."""
  units = [resnet.Stem(layers.scaled(STAGE_CHANNELS[0], width), stem, dtype=dtype)]
  stages = [0]
  for stage, (channels, count) in enumerate(zip(STAGE_CHANNELS, UNITS_PER_STAGE[arch])):
    for i in range(count):
      stride = 2 if (stage > 0 and i == 0) else 1
      units.append(resnet.ResidualUnit(layers.scaled(channels, width), stride, bottleneck=False,
                                       dtype=dtype))
      stages.append(stage)
  return None, tuple(units), tuple(stages)
