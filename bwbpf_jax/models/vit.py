"""Vision Transformers (Dosovitskiy et al., 2021) as a stem and one unit per transformer layer.

The stem cuts the image into p x p patches, embeds each linearly and adds a
learned position embedding: [B, H, W, C] -> [B, T, D] tokens, T = (H/p)(W/p).
Every unit is one pre-norm transformer layer (x + MHA(LN(x)), then
x + MLP(LN(x)), GELU), so blocks may be cut between any two layers and, since
the layers are alike, pipeline stages balance by unit count. The last unit
also applies the final LayerNorm; the output block's head is the library's
`LinearHead` (mean of the tokens -> dense).

Mean pooling instead of a class token: every head of the library reads token
sequences by pooling them (`heads.pool_features`), so an auxiliary head after
any block and the output head read the same [B, T, D] features without knowing
of a special token, and a class token would carry no gradient to earlier
blocks in bwbpf mode anyway (each block sees its input detached). Beyer et al.
("Better plain ViT baselines for ImageNet-1k", 2022) use global average
pooling of the tokens with no loss of accuracy.

The patch embedding is a reshape and a dense layer, the same function as a
p x p convolution of stride p (the same parameter count), but a matrix
multiply: it keeps XLA's speed inside the stage pipeline's `lax.switch`,
where XLA:CPU's own convolutions slow down (see `layers.conv_general_dilated`).

Sizes are DeiT's (Touvron et al., 2021): Tiny 192 wide, 3 heads, MLP 768;
Small 384, 6 heads, 1536; 12 layers each. `width` scales the embedding and MLP
sizes and the head count (head size stays near 64); a `_d<N>` suffix of the
name (`vit_tiny_d6`) keeps N layers, for networks that train on a CPU in
minutes.
"""

import re
from typing import Any

from flax import linen as nn
import jax.numpy as jnp

from bwbpf_jax.errors import UsageError
from bwbpf_jax.models import layers

# name: (embedding size, layers, attention heads, MLP size).
SIZES = {'vit_tiny': (192, 12, 3, 768), 'vit_small': (384, 12, 6, 1536)}
# Depths offered as `<size>_d<N>` names, for quick runs (the full depth is the plain name).
SHORT_DEPTHS = (4, 6, 8)
ARCHITECTURES = tuple(SIZES) + tuple(f'{size}_d{depth}' for size in SIZES
                                     for depth in SHORT_DEPTHS)
# Patch size for each stem choice: 32x32 images (CIFAR) -> 8x8 = 64 tokens; 64x64
# (Tiny-ImageNet, which the command line gives the 'imagenet' stem) -> 8x8 = 64 tokens.
PATCH_OF_STEM = {'cifar': 4, 'imagenet': 8}

dense_init = nn.initializers.xavier_uniform()  # The ViT reference's (big_vision's) Dense init.


class PatchEmbedding(nn.Module):
  """[B, H, W, C] -> p x p patches -> dense(D) + learned position embedding -> [B, T, D]."""
  dim: int
  patch: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    if x.ndim != 4:
      raise UsageError(f'the ViT patch embedding reads images [B, H, W, C], got shape '
                       f'{list(x.shape)}')
    batch, height, width, channels = x.shape
    if height % self.patch or width % self.patch:
      raise UsageError(f'patch size {self.patch} does not divide the image size '
                       f'{height}x{width}; choose another stem or image size')
    p = self.patch
    x = x.reshape(batch, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch, (height // p) * (width // p), p * p * channels)
    x = nn.Dense(self.dim, dtype=self.dtype, name='embedding')(x)
    position = self.param('position', nn.initializers.normal(0.02), x.shape[1:])
    return x + position.astype(x.dtype)


class TransformerLayer(nn.Module):
  """Pre-norm transformer layer on [B, T, D]: x + MHA(LN(x)); x + MLP(LN(x)) [-> LN].

  `final_norm`: the network's last layer also applies the final LayerNorm of a
  pre-norm ViT, so the output head reads normalised tokens.
  """
  num_heads: int
  mlp_dim: int
  final_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    if x.ndim != 3:
      raise UsageError(f'a transformer layer reads tokens [B, T, D], got shape {list(x.shape)}')
    dim = x.shape[-1]
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                        kernel_init=dense_init, deterministic=True)(y, y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=dense_init)(y))
    x = x + nn.Dense(dim, dtype=self.dtype, kernel_init=dense_init)(y)
    if self.final_norm:
      x = nn.LayerNorm(dtype=self.dtype, name='final_norm')(x)
    return x

  @property
  def downsamples(self) -> bool:
    """A transformer layer keeps its token count (what AugLocal's copies ask)."""
    return False

  def with_downsampling(self, downsample: bool) -> 'TransformerLayer':
    """A fresh, unbound copy; a transformer layer has no downsampling to add."""
    if downsample:
      raise UsageError('a transformer layer keeps its token count and cannot downsample')
    return self.clone(parent=None)


def parse_name(arch: str):
  """'vit_tiny_d6' -> ('vit_tiny', 6); 'vit_small' -> ('vit_small', 12)."""
  match = re.fullmatch(r'(vit_[a-z]+?)(?:_d(\d+))?', arch)
  if not match or match.group(1) not in SIZES:
    raise UsageError(f'unknown ViT {arch!r}; choose one of {", ".join(ARCHITECTURES)}')
  depth = SIZES[match.group(1)][1] if match.group(2) is None else int(match.group(2))
  return match.group(1), depth


def scaled_sizes(size: str, width: float):
  """(embedding size, heads, MLP size) of `size` under a width multiplier.

  The head count scales with the width (at least 1) and the embedding size is
  rounded to a multiple of it, so the head size stays that of the full network
  (64) near width 1 and every width gives a valid attention.
  """
  dim, _, num_heads, mlp_dim = SIZES[size]
  num_heads = max(1, round(num_heads * width))
  dim = num_heads * max(1, round(dim * width / num_heads))
  return dim, num_heads, layers.scaled(mlp_dim, width)


def vit_units(arch: str, width: float = 1.0, stem: str = 'cifar', dtype=jnp.float32):
  """Returns (stem, units, stage_of_unit) of a ViT: the patch embedding and one unit per layer.

  Args:
    arch: one of `ARCHITECTURES` (a size, optionally with a `_d<N>` depth).
    width: multiplier of the embedding and MLP sizes and of the head count.
    stem: 'cifar' (patch 4, for 32x32 images) or 'imagenet' (patch 8, for 64x64).
    dtype: computation dtype.
  """
  if arch not in ARCHITECTURES:
    raise UsageError(f'unknown ViT {arch!r}; choose one of {", ".join(ARCHITECTURES)}')
  if stem not in PATCH_OF_STEM:
    raise UsageError(f'unknown stem {stem!r} for a ViT; choose one of '
                     f'{", ".join(PATCH_OF_STEM)} (patch {", ".join(map(str, PATCH_OF_STEM.values()))})')
  size, depth = parse_name(arch)
  dim, num_heads, mlp_dim = scaled_sizes(size, width)
  units = tuple(TransformerLayer(num_heads, mlp_dim, final_norm=(i == depth - 1), dtype=dtype)
                for i in range(depth))
  # One stage: the default cut spreads the layers evenly over the blocks.
  return PatchEmbedding(dim, PATCH_OF_STEM[stem], dtype=dtype), units, (0,) * depth
