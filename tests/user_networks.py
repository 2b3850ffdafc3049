"""Networks a user would write, with `flax.linen` only: what the front door must take.

They live with the tests, never in the library, so that nothing in
`bwbpf_jax` knows them. Each function takes no arguments and returns a
`bwbpf_jax.Network`, so the command line can load it as
`--arch=user_networks:small_cnn` (with this folder on the module path).
"""

from flax import linen as nn
import bwbpf_jax


class ConvBN(nn.Module):
  """3x3 conv -> BatchNorm -> ReLU, optionally strided."""
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (3, 3), strides=(self.stride, self.stride), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.relu(x)


class Residual(nn.Module):
  """Two 3x3 convs with an identity shortcut."""
  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    y = ConvBN(self.features)(x, train)
    y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
    y = nn.BatchNorm(use_running_average=not train, momentum=0.9)(y)
    return nn.relu(x + y)


def small_cnn() -> bwbpf_jax.Network:
  """4 units: conv-BN, a residual unit, a strided conv-BN, conv-BN. [B, H, W, 3] -> [B, H/2, W/2, 16]."""
  return bwbpf_jax.Network(units=(ConvBN(8), Residual(8), ConvBN(16, stride=2), ConvBN(16)),
                           name='small_cnn')


class PatchEmbed(nn.Module):
  """[B, H, W, C] -> [B, (H/p)(W/p), D] tokens plus a learned position embedding."""
  dim: int
  patch: int = 4

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    x = nn.Conv(self.dim, (self.patch, self.patch), strides=(self.patch, self.patch))(x)
    x = x.reshape(x.shape[0], -1, self.dim)
    position = self.param('position', nn.initializers.normal(0.02), x.shape[1:])
    return x + position


class TokenMixer(nn.Module):
  """Pre-norm self-attention, then a pre-norm MLP, each with a residual: [B, T, D] -> [B, T, D]."""
  heads: int = 2

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(y, y)
    y = nn.LayerNorm()(x)
    y = nn.Dense(2 * x.shape[-1])(y)
    return x + nn.Dense(x.shape[-1])(nn.gelu(y))


def tiny_token_net() -> bwbpf_jax.Network:
  """A stem (patch embedding) and 4 token-mixing units on [B, T, D]."""
  return bwbpf_jax.Network(units=tuple(TokenMixer() for _ in range(4)),
                           stem=PatchEmbed(16, patch=4), name='tiny_token_net')


class DenseUnit(nn.Module):
  """Flatten (if needed) -> dense -> LayerNorm -> ReLU: [B, ...] -> [B, D]."""
  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    x = x.reshape(x.shape[0], -1)
    return nn.relu(nn.LayerNorm()(nn.Dense(self.features)(x)))


def mlp() -> bwbpf_jax.Network:
  """An MLP on flattened images: features [B, D] everywhere."""
  return bwbpf_jax.Network(units=tuple(DenseUnit(32) for _ in range(3)), name='mlp')


# Broken networks, for the errors a user can cause.

class NoTrainArgument(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8)(x)


def without_train() -> bwbpf_jax.Network:
  return bwbpf_jax.Network(units=(DenseUnit(8), NoTrainArgument(), DenseUnit(8)))


def not_chaining() -> bwbpf_jax.Network:
  """Unit 1 is a 2-D convolution after a unit that makes vectors [B, D]."""
  return bwbpf_jax.Network(units=(DenseUnit(8), ConvBN(8), DenseUnit(8)))


def not_a_network():
  return [DenseUnit(8)]
