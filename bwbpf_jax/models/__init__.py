"""The built-in networks, as `Network`s from a registry of names, and the heads.

`network(name, ...)` is the one place a name becomes a network; everything
after it takes the `Network` value, so a user's own network goes the same way.
"""

import jax.numpy as jnp

from bwbpf_jax.errors import UsageError
from bwbpf_jax.network import Network, import_network, is_import_spec
from bwbpf_jax.models import cifar_resnet
from bwbpf_jax.models import heads
from bwbpf_jax.models import layers
from bwbpf_jax.models import resnet
from bwbpf_jax.models import vgg
from bwbpf_jax.models import vit

ARCHITECTURES = (tuple(vgg.CONVS_PER_STAGE) + tuple(resnet.UNITS_PER_STAGE)
                 + tuple(cifar_resnet.UNITS_PER_STAGE) + vit.ARCHITECTURES)
HEADS = tuple(heads.HEADS)


def network(arch: str, *, width: float = 1.0, stem: str = 'cifar', dtype=jnp.float32) -> Network:
  """The built-in network `arch` (one of `ARCHITECTURES`) as a `Network`.

  Args:
    arch: its name.
    width: channel multiplier (0.25 for quick CPU runs).
    stem: 'cifar' (3x3 stride 1) or 'imagenet' (7x7 stride 2 + max-pool) for ResNets;
      for ViTs the patch size: 'cifar' 4 (32x32 images), 'imagenet' 8 (64x64).
    dtype: computation dtype of its layers.
  """
  if arch in vgg.CONVS_PER_STAGE:
    stem_module, units, stages = vgg.vgg_units(arch, width, dtype)
  elif arch in resnet.UNITS_PER_STAGE or arch in cifar_resnet.UNITS_PER_STAGE:
    if stem not in resnet.STEMS:
      raise UsageError(f'unknown stem {stem!r}; choose one of {", ".join(resnet.STEMS)}')
    build = (cifar_resnet.cifar_resnet_units if arch in cifar_resnet.UNITS_PER_STAGE
             else resnet.resnet_units)
    stem_module, units, stages = build(arch, width, stem, dtype)
  elif arch in vit.ARCHITECTURES:
    stem_module, units, stages = vit.vit_units(arch, width, stem, dtype)
  else:
    raise UsageError(f'unknown architecture {arch!r}; choose one of {", ".join(ARCHITECTURES)} '
                     f'or give a package.module:function that returns a bwbpf_jax.Network')
  return Network(units=units, stem=stem_module, stage_of_unit=stages, name=arch)


def resolve(arch, *, width: float = 1.0, stem: str = 'cifar', dtype=jnp.float32) -> Network:
  """A `Network` from a `Network` (returned as it is), a built-in name or 'package.module:function'.

  `width` and `stem` shape the built-in networks only; a user's network is
  built by its own code, so asking for another width or stem of it is refused
  rather than ignored.
  """
  if isinstance(arch, Network) or (isinstance(arch, str) and is_import_spec(arch)):
    if width != 1.0:
      raise UsageError(f'width={width:g} scales the built-in networks; a user\'s network is '
                       f'built by its own code (leave width at 1)')
    return arch if isinstance(arch, Network) else import_network(arch)
  if not isinstance(arch, str):
    raise UsageError(f'the network must be a bwbpf_jax.Network or a name, got a '
                     f'{type(arch).__name__}')
  return network(arch, width=width, stem=stem, dtype=dtype)


def architecture_units(arch: str, *, width: float = 1.0, stem: str = 'cifar',
                       dtype=jnp.float32):
  """(stem or None, units, stage_of_unit) of a built-in network: `network(...)`'s parts."""
  built = network(arch, width=width, stem=stem, dtype=dtype)
  return built.stem, built.units, built.stage_of_unit


def make_head(name: str, num_classes: int, dtype=jnp.float32, *, following_units=(),
              aux_index: int = 0, num_aux: int = 1, auglocal_depth: int = 2):
  """One head; `auglocal` also needs the units after its block and its place among the aux heads.

  Args:
    name: one of `HEADS`, or a user's head: a callable (e.g. a Flax module class)
      called as `name(num_classes, dtype=dtype)` that returns a module called as
      `head(features, train=...)` -> float32 logits [B, num_classes].
    num_classes: the head's outputs (classes, or an embedding's size).
    dtype: computation dtype.
    following_units: the backbone's units after this block (copied, never shared, by `auglocal`).
    aux_index, num_aux: this block's index among the K-1 auxiliary blocks, and K-1
      (`auglocal`'s depth falls linearly with it).
    auglocal_depth: units copied into the first auxiliary block's `auglocal` network
      (AugLocal's depth hyperparameter; later blocks get fewer).
  """
  if callable(name):
    return name(num_classes, dtype=dtype)
  if name not in heads.HEADS:
    raise UsageError(f'unknown auxiliary head {name!r}; choose one of {", ".join(HEADS)}')
  if name == 'auglocal':
    if auglocal_depth < 1:
      raise UsageError(f'--auglocal_depth must be at least 1, got {auglocal_depth}')
    depth = heads.auglocal_depth(aux_index, num_aux, max_depth=auglocal_depth)
    return heads.AugLocalHead(num_classes, units=heads.auglocal_units(following_units, depth),
                              dtype=dtype)
  return heads.HEADS[name](num_classes, dtype=dtype)
