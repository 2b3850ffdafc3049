"""Heads: every block ends in one; the last block's head is the network's output layer.

Auxiliary networks of the local-learning literature, each a module owned by its
block (its parameters live under the block's 'head' and are shared with nothing):

- `linear` (`LinearHead`): global average pool + dense, the paper's auxiliary
  classifier and the standard VGG/ResNet output layer ("greedy supervised
  learning" in InfoPro's terms).
- `mlp` (`MLPHead`): one 1x1 conv-BN-ReLU on the full map, pool to 2x2, a
  two-layer MLP. Not a paper's: it was this library's first non-linear head,
  before the literature's below were added, and stays a documented
  `--aux_head` choice so that commands and stored configs naming it still run.
  It is the middle ground the others lack: spatial layout kept (2x2) like
  `dgl`, but no pooling before its conv, so it sees every position of the map
  (2.4% of ResNet-32's FLOPs for K=4, against 0.4% for `dgl`, 5.4% for
  `infopro`).
- `dgl` (`DGLHead`): DGL's MLP-SR auxiliary network as Belilovsky et al. (2020)
  built it: pool to a quarter of the side, three 1x1 conv-BN-ReLU, pool to 2x2,
  three dense-BN-ReLU layers of 4C units, a linear classifier.
- `infopro` (`InfoProHead`): InfoPro's '1c2f' auxiliary network (Wang et al.,
  2021): one 3x3 conv-BN-ReLU (stride 2 and twice the channels where the map is
  larger than 8x8, as InfoPro does for its 16- and 32-channel stages), global
  average pool, a 128-unit hidden layer, the output layer.
- `auglocal` (`AugLocalHead`): AugLocal's augmented auxiliary network (Ma et
  al., 2024): fresh copies of a uniformly sampled subset of the units after the
  block, then pool and linear.
- `transformer` (`TransformerHead`): one pre-norm transformer layer of the
  features' width, the final LayerNorm, mean of the tokens, linear. A design
  of this library, not a paper's: the token analogue of DGL's and InfoPro's
  small auxiliary networks (a layer of the backbone's own kind before the
  pooled classifier). The transformer local-learning work we found uses
  decoders that reconstruct features (Swin, "Local learning on transformers
  via feature reconstruction", 2022) rather than a named classifier head.

`Objective` wraps any of them when the block's loss needs more than logits: an
embedding for a contrastive loss (with a linear probe on detached features for
the accuracy readout) and InfoPro's image decoder for a reconstruction loss.

Features of any rank: `linear`, `mlp` and `auglocal` read vectors [B, D],
token sequences [B, T, D] and maps [B, H, W, C] (pooled over every axis
between batch and channels); `dgl`, `infopro` and the decoder are built on
convolutions over maps and refuse other features with a `UsageError` that
says what they read; `transformer` reads tokens, and maps as their H*W
positions' tokens, and refuses vectors (nothing to attend over).
"""

import math
from typing import Any, Optional, Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bwbpf_jax.errors import UsageError
from bwbpf_jax.models import layers
from bwbpf_jax.models import vit


def adaptive_avg_pool(x, output_hw):
  """PyTorch's `adaptive_avg_pool2d` on [B, H, W, C]: cell i averages rows floor(iH/n)..ceil((i+1)H/n)."""
  (height, width), (out_h, out_w) = x.shape[1:3], output_hw
  if height % out_h == 0 and width % out_w == 0:
    return x.reshape(x.shape[0], out_h, height // out_h, out_w, width // out_w,
                     x.shape[3]).mean(axis=(2, 4))
  rows = [x[:, (i * height) // out_h:-(-((i + 1) * height) // out_h)].mean(axis=1, keepdims=True)
          for i in range(out_h)]
  x = jnp.concatenate(rows, axis=1)
  columns = [x[:, :, (j * width) // out_w:-(-((j + 1) * width) // out_w)].mean(axis=2, keepdims=True)
             for j in range(out_w)]
  return jnp.concatenate(columns, axis=2)


def pool_features(x):
  """[B, ..., C] -> [B, C]: the mean over every axis between batch and channels.

  Global average pooling of a map [B, H, W, C], mean pooling of tokens
  [B, T, D]; a vector [B, D] is returned as it is.
  """
  if x.ndim < 2:
    raise UsageError(f'features must have a batch and a feature axis, got shape {x.shape}')
  return jnp.mean(x, axis=tuple(range(1, x.ndim - 1))) if x.ndim > 2 else x


def require_maps(x, head: str):
  """Refuses features that are not [B, H, W, C] maps, for heads built on convolutions."""
  if x.ndim != 4:
    raise UsageError(f'the {head} head reads [B, H, W, C] feature maps, got features of shape '
                     f'{list(x.shape)}; linear, mlp and auglocal read features of any rank')


class LinearHead(nn.Module):
  """[B, ..., C] -> average over all but batch and channels -> dense -> float32 [B, num_classes]."""
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    x = pool_features(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class MLPHead(nn.Module):
  """[B, H, W, C] -> 1x1 conv-BN-ReLU -> avg-pool to 2x2 -> dense-ReLU -> dense logits.

  The library's own light head (see the module docstring for why it stays):
  max(32, C) hidden channels and units. On vectors [B, D] and tokens [B, T, D]
  the 1x1 conv is its per-position analogue, dense-ReLU (no BatchNorm, which
  token networks do not use), and the positions are mean-pooled instead of
  pooled to 2x2.
  """
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    hidden = max(32, x.shape[-1])
    if x.ndim != 4:
      x = pool_features(nn.relu(nn.Dense(hidden, dtype=self.dtype)(x)))
      x = nn.relu(nn.Dense(hidden, dtype=self.dtype)(x))
      return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
    x = layers.conv(hidden, 1, use_bias=False, dtype=self.dtype)(x)
    x = nn.relu(layers.batch_norm(train, self.dtype)(x))
    height, width = x.shape[1:3]
    if height >= 2 and width >= 2:
      x = nn.avg_pool(x, (height // 2, width // 2), strides=(height // 2, width // 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(hidden, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class DGLHead(nn.Module):
  """DGL's MLP-SR: [B, H, W, C] -> pool to ceil(H/4) x ceil(W/4) -> 3x (1x1 conv-BN-ReLU, C)
  -> pool to 2x2 -> 3x (dense-BN-ReLU, 4C) -> dense [B, num_classes].

  The spatial reduction (SR) before the 1x1 convs keeps their cost at 1/16 of
  a conv on the full map; the 2x2 pool keeps coarse spatial layout for the MLP.
  """
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    require_maps(x, 'dgl')
    channels = x.shape[-1]
    x = adaptive_avg_pool(x, (math.ceil(x.shape[1] / 4), math.ceil(x.shape[2] / 4)))
    for _ in range(3):
      x = layers.conv(channels, 1, use_bias=False, dtype=self.dtype)(x)
      x = nn.relu(layers.batch_norm(train, self.dtype)(x))
    x = adaptive_avg_pool(x, (2, 2)).reshape(x.shape[0], 4 * channels)
    for _ in range(3):
      x = nn.Dense(4 * channels, dtype=self.dtype)(x)
      x = nn.relu(layers.batch_norm(train, self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class InfoProHead(nn.Module):
  """InfoPro's '1c2f': [B, H, W, C] -> 3x3 conv-BN-ReLU -> global pool -> dense(128)-ReLU -> dense.

  On maps larger than 8x8 the conv has stride 2 and 2C channels, else stride 1
  and C: on a CIFAR ResNet that is InfoPro's 16->32/2, 32->64/2, 64->64/1.
  """
  num_classes: int
  dtype: Any = jnp.float32
  hidden: int = 128

  @nn.compact
  def __call__(self, x, train: bool):
    require_maps(x, 'infopro')
    large = x.shape[1] > 8
    x = layers.conv(x.shape[-1] * (2 if large else 1), 3, 2 if large else 1, use_bias=False,
                    dtype=self.dtype)(x)
    x = nn.relu(layers.batch_norm(train, self.dtype)(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def _asks_resolution(unit) -> bool:
  """Whether a unit says how it changes resolution (the protocol in `bwbpf_jax.network`)."""
  return hasattr(unit, 'downsamples') and callable(getattr(unit, 'with_downsampling', None))


def auglocal_depth(aux_index: int, num_aux: int, max_depth: int = 2,
                   coefficient: float = 0.5) -> int:
  """AugLocal's pyramidal depth of auxiliary network `aux_index` of `num_aux`.

  Falls linearly from `max_depth` at the first block to
  (1 - coefficient) * max_depth + coefficient at the last auxiliary block, at
  least 1; rounded as AugLocal rounds (Python's round).
  """
  ratio = aux_index * coefficient / (num_aux - 1) if num_aux > 1 else 0.0
  return max(1, round(max_depth * (1 - ratio) + ratio))


def auglocal_units(following_units: Sequence[nn.Module], depth: int) -> tuple:
  """Fresh copies of `depth` units sampled uniformly from `following_units` (the last one included).

  Unit i of the sample is following_units[round(i * n / depth) - 1] for n
  following units, as AugLocal samples. Units skipped over may have halved the
  map; their downsampling moves to the next copied unit (one halving per unit,
  the rest carried on), so the auxiliary network ends at the resolution the
  backbone would reach.
  """
  count = len(following_units)
  if depth >= count:
    picks = list(range(count))
  else:
    picks = [round(i * count / depth) - 1 for i in range(1, depth + 1)]
  if picks == list(range(len(picks))) and not any(map(_asks_resolution, following_units)):
    # Nothing skipped: plain copies of a network whose units say nothing of resolution.
    return tuple(unit.clone(parent=None) for unit in following_units[:len(picks)])
  for offset, unit in enumerate(following_units[:picks[-1] + 1]):
    if not _asks_resolution(unit):
      raise UsageError(
          f'the auglocal head copies a sample of the later units and must move the '
          f'downsampling of those it skips: unit {type(unit).__name__} ({offset} after the '
          f'block) has no `downsamples` attribute and `with_downsampling(bool)` method; give '
          f'its class these two (see bwbpf_jax.Network), or choose another head')
  copies, pending, previous = [], 0, -1
  for index in picks:
    pending += sum(bool(u.downsamples) for u in following_units[previous + 1:index + 1])
    copies.append(following_units[index].with_downsampling(pending > 0))
    pending = max(0, pending - 1)
    previous = index
  return tuple(copies)


class AugLocalHead(nn.Module):
  """AugLocal: features -> fresh copies of sampled later units -> pool [-> BN] -> dense.

  The copies have the shapes of the backbone's later units but parameters of
  their own, so the block learns features that serve the layers after it
  without any gradient crossing the block boundary. With a single copied unit
  the pooled features pass a BatchNorm first, as in AugLocal.
  """
  num_classes: int
  units: tuple = ()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    for unit in self.units:
      x = unit(x, train=train)
    x = pool_features(x)
    if len(self.units) <= 1:
      x = layers.batch_norm(train, self.dtype)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def attention_heads(dim: int, head_size: int = 64) -> int:
  """Heads of an attention over `dim` features: the most, up to dim // head_size, that divide dim."""
  return max(h for h in range(1, max(1, dim // head_size) + 1) if dim % h == 0)


class TransformerHead(nn.Module):
  """[B, T, D] -> pre-norm transformer layer (D wide, MLP 4D) -> LayerNorm -> mean -> dense.

  A map [B, H, W, C] is read as its H*W positions' tokens (as hybrid ViTs read
  a CNN's map); vectors [B, D] are refused, having no tokens to attend over.
  Costs about one backbone layer per auxiliary block of a ViT.
  """
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if x.ndim == 4:
      x = x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])
    if x.ndim != 3:
      raise UsageError(f'the transformer head reads tokens [B, T, D] or maps [B, H, W, C], got '
                       f'features of shape {list(x.shape)}; vectors have no tokens to attend '
                       f'over: choose linear or mlp')
    dim = x.shape[-1]
    x = vit.TransformerLayer(attention_heads(dim), 4 * dim, final_norm=True, dtype=self.dtype,
                             name='layer')(x, train=train)
    return nn.Dense(self.num_classes, dtype=self.dtype)(pool_features(x)).astype(jnp.float32)


def _bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights of 1-D bilinear resizing with aligned corners (PyTorch's align_corners=True)."""
  weights = np.zeros((size_out, size_in), np.float32)
  if size_in == 1 or size_out == 1:
    weights[:, 0] = 1.0
    return weights
  positions = np.arange(size_out) * (size_in - 1) / (size_out - 1)
  low = np.minimum(np.floor(positions).astype(int), size_in - 2)
  fraction = positions - low
  weights[np.arange(size_out), low] = 1.0 - fraction
  weights[np.arange(size_out), low + 1] += fraction
  return weights


def upsample_bilinear(x, output_hw):
  """[B, h, w, C] -> [B, H, W, C], bilinear with aligned corners, as InfoPro's decoder upsamples."""
  rows = jnp.asarray(_bilinear_matrix(x.shape[1], output_hw[0]), x.dtype)
  columns = jnp.asarray(_bilinear_matrix(x.shape[2], output_hw[1]), x.dtype)
  return jnp.einsum('Hh,Ww,bhwc->bHWc', rows, columns, x)


class Decoder(nn.Module):
  """InfoPro's decoder: upsample to the image, 3x3 conv(12)-BN-ReLU, 3x3 conv(C of the image).

  `image_shape` (H, W, C) is static; it must be given when the parameters are
  created (`init_block_states` passes the input's shape) and when applied.
  Returns the reconstruction's logits [B, H, W, C]; the sigmoid of InfoPro's
  decoder is applied inside the loss (binary cross-entropy from logits), which
  is the same function without its overflow.
  """
  hidden: int = 12
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, image_shape=None):
    if image_shape is None:
      raise ValueError('the decoder needs the image shape (H, W, C) it reconstructs')
    require_maps(x, 'reconstruction decoder')
    if len(image_shape) != 3:
      raise UsageError(f'the reconstruction losses rebuild an image [H, W, C]; the input has '
                       f'shape {list(image_shape)}')
    height, width, channels = image_shape
    x = upsample_bilinear(x, (height, width))
    x = layers.conv(self.hidden, 3, use_bias=True, dtype=self.dtype)(x)
    x = nn.relu(layers.batch_norm(train, self.dtype)(x))
    return layers.conv(channels, 3, use_bias=True, dtype=self.dtype)(x).astype(jnp.float32)


class Objective(nn.Module):
  """An auxiliary network plus what a block's loss needs besides logits.

  Returns a dict: 'logits' [B, num_classes]; with `contrastive`, 'embedding'
  [B, D] from `network` and 'logits' from a linear probe on detached features
  (a readout that does not train the block); with a `decoder`,
  'reconstruction' [B, H, W, C] logits of an image of `image_shape`.
  """
  network: nn.Module
  num_classes: int
  contrastive: bool = False
  decoder: Optional[nn.Module] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, image_shape=None):
    outputs = {}
    if self.contrastive:
      outputs['embedding'] = self.network(x, train=train)
      outputs['logits'] = LinearHead(self.num_classes, self.dtype, name='probe')(
          jax.lax.stop_gradient(x), train=train)
    else:
      outputs['logits'] = self.network(x, train=train)
    if self.decoder is not None:
      outputs['reconstruction'] = self.decoder(x, train=train, image_shape=image_shape)
    return outputs


HEADS = {'linear': LinearHead, 'mlp': MLPHead, 'dgl': DGLHead, 'infopro': InfoProHead,
         'auglocal': AugLocalHead, 'transformer': TransformerHead}
