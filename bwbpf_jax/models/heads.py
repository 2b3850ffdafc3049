"""Classifier heads: every block ends in one; the last block's head is the network's output layer.

`linear` (global average pool + dense) is the paper's auxiliary classifier and the
standard VGG/ResNet output layer. `mlp` is a stronger auxiliary network in the
style of DGL (Belilovsky et al., 2020): a 1x1 conv, pooling to 2x2 and a
two-layer MLP, which gives early blocks features that are good for later ones
rather than only linearly separable ones.
"""

from typing import Any

from flax import linen as nn
import jax.numpy as jnp

from bwbpf_jax.models import layers


class LinearHead(nn.Module):
  """[B, H, W, C] -> global average pool -> dense -> float32 logits [B, num_classes]."""
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class MLPHead(nn.Module):
  """[B, H, W, C] -> 1x1 conv-BN-ReLU -> avg-pool to 2x2 -> dense-ReLU -> dense logits."""
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    hidden = max(32, x.shape[-1])
    x = layers.conv(hidden, 1, use_bias=False, dtype=self.dtype)(x)
    x = nn.relu(layers.batch_norm(train, self.dtype)(x))
    height, width = x.shape[1:3]
    if height >= 2 and width >= 2:
      x = nn.avg_pool(x, (height // 2, width // 2), strides=(height // 2, width // 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(hidden, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


HEADS = {'linear': LinearHead, 'mlp': MLPHead}
