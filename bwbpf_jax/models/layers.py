"""Layer defaults shared by the architectures, matching their PyTorch reference recipes."""

import contextlib
import contextvars
import functools

from flax import linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from bwbpf_jax.models import onednn_conv

# He-normal on fan-out, as torchvision initialises VGG and ResNet convolutions.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


_BATCH_STATS_AXIS = contextvars.ContextVar('batch_stats_axis', default=None)


@contextlib.contextmanager
def batch_stats_over(axis_name: str):
  """BatchNorms traced inside this block take their batch statistics over mesh axis `axis_name`.

  Inside a `shard_map`, where each device sees only its part of the batch, this
  gives the global-batch statistics that a jitted, sharded step gets from the
  compiler (`flax.linen.BatchNorm`'s `axis_name`).
  """
  token = _BATCH_STATS_AXIS.set(axis_name)
  try:
    yield
  finally:
    _BATCH_STATS_AXIS.reset(token)


def batch_norm(train: bool, dtype=jnp.float32, name=None) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1 there is 0.9 here)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, name=name, axis_name=_BATCH_STATS_AXIS.get())


def _im2col_conv(lhs, rhs, padding):
  """Stride-1 NHWC x HWIO convolution as one matrix multiply over gathered patches."""
  kernel_h, kernel_w, in_features, out_features = rhs.shape
  padded = jnp.pad(lhs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  out_h = padded.shape[1] - kernel_h + 1
  out_w = padded.shape[2] - kernel_w + 1
  patches = jnp.concatenate([padded[:, i:i + out_h, j:j + out_w, :]
                             for i in range(kernel_h) for j in range(kernel_w)], axis=-1)
  return lax.dot_general(patches, rhs.reshape(kernel_h * kernel_w * in_features, out_features),
                         (((3,), (0,)), ((), ())))


_XLA_CONVOLUTIONS_ONLY = contextvars.ContextVar('xla_convolutions_only', default=False)


@contextlib.contextmanager
def xla_convolutions():
  """Convolutions traced inside this block are XLA's own, even where oneDNN would run them.

  For what needs XLA's view of the network (its FLOP count) and for A/B timing.
  """
  token = _XLA_CONVOLUTIONS_ONLY.set(True)
  try:
    yield
  finally:
    _XLA_CONVOLUTIONS_ONLY.reset(token)


_PER_DEVICE_CODE = contextvars.ContextVar('per_device_code', default=False)


@contextlib.contextmanager
def per_device_code():
  """Marks code traced inside this block as per-device (a `shard_map` body).

  There the SPMD partitioner shards nothing, so a custom call is as good as
  XLA's convolution even in a multi-device program, and oneDNN may run it.
  """
  token = _PER_DEVICE_CODE.set(True)
  try:
    yield
  finally:
    _PER_DEVICE_CODE.reset(token)


def onednn_runs_convolutions() -> bool:
  """Whether float32 NHWC convolutions traced now run in oneDNN: CPU, built, per device.

  Per device means a process with one device in all (every process's devices
  counted), or code inside `per_device_code` (a `shard_map` body). Other
  multi-device CPU programs (fake devices, several processes) keep XLA's
  convolution, which the SPMD partitioner knows how to shard; a custom call
  it would replicate.
  """
  return (not _XLA_CONVOLUTIONS_ONLY.get() and jax.default_backend() == 'cpu'
          and (jax.device_count() == 1 or _PER_DEVICE_CODE.get())
          and onednn_conv.available())


def _is_plain_nhwc(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                   feature_group_count, **kwargs) -> bool:
  """A 2-D NHWC x HWIO convolution: one group, explicit padding, no dilation, no extras."""
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
  return (lhs.ndim == 4 and feature_group_count == 1 and not isinstance(padding, str)
          and not kwargs
          and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc)


def _onednn_applies(lhs, rhs, window_strides, **conv_args) -> bool:
  return (lhs.dtype == rhs.dtype == jnp.float32 and _is_plain_nhwc(lhs, rhs, **conv_args)
          and onednn_conv.handles(rhs.shape, window_strides, conv_args['padding'])
          and onednn_runs_convolutions())


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
  """`lax.conv_general_dilated`, with faster CPU lowerings; GPU and TPU keep XLA's.

  On CPU (chosen per platform with `lax.platform_dependent`):
  - float32 NHWC convolutions run in oneDNN (`onednn_conv`) when it is built
    and handles them (`onednn_conv.handles`),
    about 1.4x faster than XLA:CPU's Eigen convolutions;
  - otherwise, when H*W < kh*kw (VGG's 2x2 last stage at 32x32), XLA swaps the
    convolution's operands and the swapped form misses every fast Eigen
    kernel (about 2 GFLOP/s, 80% of a full-width VGG-19 step), so there the
    convolution is an im2col matrix multiply instead.
  Both give the same values to float rounding.
  """
  if isinstance(padding, str) and lhs.ndim == rhs.ndim == 4 and dimension_numbers is not None:
    # 'SAME'/'VALID' (flax's default) as explicit pairs, so the fast paths below apply.
    dilated_window = [(k - 1) * (1 if rhs_dilation is None else d) + 1
                      for k, d in zip(rhs.shape[:2], rhs_dilation or (1, 1))]
    if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == (
        lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))):
      padding = lax.padtype_to_pads(lhs.shape[1:3], dilated_window, window_strides, padding)
  conv_args = dict(padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                   dimension_numbers=dimension_numbers,
                   feature_group_count=feature_group_count, **kwargs)
  plain = functools.partial(lax.conv_general_dilated, window_strides=window_strides,
                            precision=precision, **conv_args)
  if _onednn_applies(lhs, rhs, window_strides, **conv_args):
    strides, padding = tuple(window_strides), tuple(map(tuple, padding))
    return lax.platform_dependent(
        lhs, rhs, cpu=lambda l, r: onednn_conv.conv(l, r, strides, padding), default=plain)
  if (_is_plain_nhwc(lhs, rhs, **conv_args) and tuple(window_strides) == (1, 1)
      and lhs.shape[1] * lhs.shape[2] < rhs.shape[0] * rhs.shape[1]):
    return lax.platform_dependent(lhs, rhs, cpu=lambda l, r: _im2col_conv(l, r, padding),
                                  default=plain)
  return plain(lhs, rhs)


def conv(features: int, kernel: int, stride: int = 1, *, use_bias: bool, dtype, name=None):
  """A square convolution with 'same'-style symmetric padding, as PyTorch pads."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=use_bias, dtype=dtype,
                 kernel_init=conv_kernel_init, conv_general_dilated=conv_general_dilated,
                 name=name)


@contextlib.contextmanager
def _attributes_set(module, **values):
  """Sets fields of a (frozen) Flax module for the length of one call, then restores them."""
  saved = {name: getattr(module, name) for name in values}
  for name, value in values.items():
    object.__setattr__(module, name, value)
  try:
    yield
  finally:
    for name, value in saved.items():
      object.__setattr__(module, name, value)


def _as_library_layers(next_fun, args, kwargs, context):
  """Interceptor: a plain `nn.Conv` or `nn.BatchNorm` of any network behaves as the library's own.

  - A `flax.linen.Conv` without a convolution of its own runs `conv_general_dilated`
    above (oneDNN on CPU, where XLA's convolution inside the stage pipeline's
    `lax.switch` is ~60x slower, jax#12868); GPU and TPU keep XLA's.
  - A `flax.linen.BatchNorm` without an `axis_name` takes its statistics over the
    axis of `batch_stats_over`, where one is set (the pipeline's 'global' choice).
  Modules that choose either themselves (the built-in networks do) are left alone,
  so the built-in networks compute exactly what they did without this.
  """
  module = context.module
  if context.method_name == '__call__':
    if (isinstance(module, nn.Conv) and module.conv_general_dilated is None
        and module.conv_general_dilated_cls is None):
      with _attributes_set(module, conv_general_dilated=conv_general_dilated):
        return next_fun(*args, **kwargs)
    if (isinstance(module, nn.BatchNorm) and module.axis_name is None
        and _BATCH_STATS_AXIS.get() is not None):
      with _attributes_set(module, axis_name=_BATCH_STATS_AXIS.get()):
        return next_fun(*args, **kwargs)
  return next_fun(*args, **kwargs)


def library_layers():
  """Within this block, every network's plain flax Conv and BatchNorm act as the library's layers.

  Blocks trace their units inside it (`partition.Block`), so a user's network
  written with `flax.linen` gets the library's CPU convolution and the stage
  pipeline's global BatchNorm statistics with no change to its code.
  """
  return nn.intercept_methods(_as_library_layers)


def scaled(channels: int, width: float) -> int:
  """Channel count under a width multiplier (width 0.25 turns 64 into 16)."""
  return max(1, int(round(channels * width)))


def _max_pool_2x2_by_slices(x):
  """2x2/2 max-pool as the elementwise max of the four strided sub-grids (odd edges dropped)."""
  height, width = x.shape[1] - x.shape[1] % 2, x.shape[2] - x.shape[2] % 2
  corners = [x[:, i:height:2, j:width:2] for i in (0, 1) for j in (0, 1)]
  return jnp.maximum(jnp.maximum(corners[0], corners[1]), jnp.maximum(corners[2], corners[3]))


def max_pool_2x2(x):
  """2x2 max-pool, stride 2, no padding: `nn.max_pool`, except on CPU.

  XLA:CPU differentiates a reduce-window max-pool through a variadic
  reduce-window over four index tensors and a scatter, about a fifth of a
  VGG-19 (width 0.5) train step there. On CPU the pool is the elementwise max of
  the window's four strided sub-grids instead, whose gradient is elementwise and
  fuses with its neighbours. (It slices only H and W, so it shards along the
  batch like any elementwise op; a max over a [B, H/2, 2, W/2, 2, C] reshape
  made the data-parallel step differ from the one-device step.) Values are
  identical; gradients differ only where a window holds tied maxima (shared
  instead of given to the first), which behind a ReLU are zeros whose gradient
  the ReLU stops anyway. GPU and TPU keep `nn.max_pool`.
  """
  return lax.platform_dependent(
      x, cpu=_max_pool_2x2_by_slices,
      default=functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2)))
