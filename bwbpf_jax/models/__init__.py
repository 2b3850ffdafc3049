"""Architectures as (stem, units, stage_of_unit) sequences, and the classifier heads."""

import jax.numpy as jnp

from bwbpf_jax.errors import UsageError
from bwbpf_jax.models import cifar_resnet
from bwbpf_jax.models import heads
from bwbpf_jax.models import resnet
from bwbpf_jax.models import vgg

ARCHITECTURES = (tuple(vgg.CONVS_PER_STAGE) + tuple(resnet.UNITS_PER_STAGE)
                 + tuple(cifar_resnet.UNITS_PER_STAGE))
HEADS = tuple(heads.HEADS)


def architecture_units(arch: str, *, width: float = 1.0, stem: str = 'cifar',
                       dtype=jnp.float32):
  """Returns (stem_module_or_None, units, stage_of_unit) of an architecture."""
  if arch in vgg.CONVS_PER_STAGE:
    return vgg.vgg_units(arch, width, dtype)
  if arch in resnet.UNITS_PER_STAGE or arch in cifar_resnet.UNITS_PER_STAGE:
    if stem not in resnet.STEMS:
      raise UsageError(f'unknown stem {stem!r}; choose one of {", ".join(resnet.STEMS)}')
    if arch in cifar_resnet.UNITS_PER_STAGE:
      return cifar_resnet.cifar_resnet_units(arch, width, stem, dtype)
    return resnet.resnet_units(arch, width, stem, dtype)
  raise UsageError(f'unknown architecture {arch!r}; choose one of {", ".join(ARCHITECTURES)}')


def make_head(name: str, num_classes: int, dtype=jnp.float32, *, following_units=(),
              aux_index: int = 0, num_aux: int = 1, auglocal_depth: int = 2):
  """One head; `auglocal` also needs the units after its block and its place among the aux heads.

  Args:
    name: one of `HEADS`.
    num_classes: the head's outputs (classes, or an embedding's size).
    dtype: computation dtype.
    following_units: the backbone's units after this block (copied, never shared, by `auglocal`).
    aux_index, num_aux: this block's index among the K-1 auxiliary blocks, and K-1
      (`auglocal`'s depth falls linearly with it).
    auglocal_depth: units copied into the first auxiliary block's `auglocal` network
      (AugLocal's depth hyperparameter; later blocks get fewer).
  """
  if name not in heads.HEADS:
    raise UsageError(f'unknown auxiliary head {name!r}; choose one of {", ".join(HEADS)}')
  if name == 'auglocal':
    if auglocal_depth < 1:
      raise UsageError(f'--auglocal_depth must be at least 1, got {auglocal_depth}')
    depth = heads.auglocal_depth(aux_index, num_aux, max_depth=auglocal_depth)
    return heads.AugLocalHead(num_classes, units=heads.auglocal_units(following_units, depth),
                              dtype=dtype)
  return heads.HEADS[name](num_classes, dtype=dtype)
