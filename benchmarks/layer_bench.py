r"""Per-convolution timing, JAX against PyTorch: where a CPU step's time goes.

    python -m benchmarks.layer_bench --arch=vgg19 --width=0.5 --batch_size=128 --compare_torch

For every distinct convolution of the network (input shape, kernel, stride) it
times, each jitted on its own, the forward pass, the gradient with respect to
the input and the gradient with respect to the kernel: the three kernels a
train step runs per convolution. It prints one JSON line per shape (times in ms,
median of --repeats; `count` is how often the network uses the shape) and a
last line with the totals weighted by count. JAX goes through the library's own
convolution (`models.layers.conv_general_dilated`: oneDNN on CPU when built,
XLA's with `BWBPF_ONEDNN_CONV=0`; `jax_convolutions` says which ran);
with --compare_torch the same shapes run through PyTorch's channels-last
convolution and its backward kernels (`aten.convolution_backward`), and
`weight_grad_max_rel_diff` checks that both computed the same kernel gradient.
"""

import functools
import json
import os
from typing import NamedTuple

from experiments import xla_defaults

xla_defaults.apply()  # Before JAX starts.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import command_line
from benchmarks import harness
import bwbpf_jax as bw
from bwbpf_jax import step as step_lib
from bwbpf_jax.models import layers

FLAGS = flags.FLAGS


def _define_flags():
  """Defined when run as a program only, so importing this module adds no global flags."""
  flags.DEFINE_string('arch', 'vgg19', 'Architecture.')
  flags.DEFINE_float('width', 0.5, 'Channel multiplier.')
  flags.DEFINE_integer('batch_size', 128, 'Batch size.')
  flags.DEFINE_integer('image_size', 32, 'Image side.')
  flags.DEFINE_integer('repeats', 5, 'Timed calls per kernel after one warm-up call.')
  flags.DEFINE_bool('compare_torch', False, 'Also time PyTorch (needs `pip install torch`).')

_NHWC = ('NHWC', 'HWIO', 'NHWC')
_KERNELS = ('forward', 'input_grad', 'weight_grad')


class ConvShape(NamedTuple):
  """One distinct convolution of a network, and how often the network runs it."""
  input: tuple  # [B, H, W, C_in]
  kernel: tuple  # [kh, kw, C_in, C_out]
  output: tuple  # [B, H', W', C_out]
  stride: tuple
  padding: tuple  # ((top, bottom), (left, right))
  count: int


def conv_shapes(arch: str, width: float, batch_size: int, image_size: int) -> list:
  """The network's convolutions (`ConvShape`s), read off one abstract inference forward."""
  model = bw.build_model(arch, num_classes=10, num_blocks=1, mode='bp', width=width)
  image_shape = (batch_size, image_size, image_size, 3)
  states = bw.abstract_block_states(model, bw.make_optimizer('sgd', total_steps=1), image_shape)
  counts = {}

  def record(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    module = context.module
    if isinstance(module, nn.Conv) and context.method_name == '__call__':
      x = args[0]
      key = (tuple(x.shape), (*module.kernel_size, x.shape[-1], module.features),
             tuple(y.shape), tuple(module.strides), tuple(map(tuple, module.padding)))
      counts[key] = counts.get(key, 0) + 1
    return y

  batch = {'image': jax.ShapeDtypeStruct(image_shape, jnp.float32),
           'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
  with nn.intercept_methods(record):
    jax.eval_shape(functools.partial(step_lib.eval_step, model), states, batch)
  return [ConvShape(*key, count) for key, count in counts.items()]


def _median_ms(fn, repeats: int, block=None) -> float:
  """Median ms of `fn()` after one compiling call (JAX results are waited for)."""
  return 1e3 * harness.time_calls(fn, repeats=repeats, block=block).median_seconds


def time_jax(x, w, dy, stride, padding, repeats):
  """ms of forward, input gradient and kernel gradient; and the kernel gradient."""
  conv = lambda x, w: layers.conv_general_dilated(x, w, stride, padding, dimension_numbers=_NHWC)
  forward = jax.jit(conv)
  input_grad = jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0])
  weight_grad = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
  ms = {'forward': _median_ms(lambda: forward(x, w), repeats),
        'input_grad': _median_ms(lambda: input_grad(x, w, dy), repeats),
        'weight_grad': _median_ms(lambda: weight_grad(x, w, dy), repeats)}
  return ms, np.asarray(weight_grad(x, w, dy))


def time_torch(x, w, dy, stride, padding, repeats):
  """The same three kernels in PyTorch, channels-last, all CPU threads."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  channels_last = lambda a: torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).contiguous(
      memory_format=torch.channels_last)
  tx, tdy = channels_last(x), channels_last(dy)
  tw = torch.from_numpy(np.array(w)).permute(3, 2, 0, 1).contiguous(
      memory_format=torch.channels_last)
  pad = [p[0] for p in padding]
  assert all(p[0] == p[1] for p in padding), 'PyTorch pads symmetrically'

  def backward(mask):
    return torch.ops.aten.convolution_backward(tdy, tx, tw, None, list(stride), pad, [1, 1],
                                               False, [0, 0], 1, mask)

  ready = lambda outputs: outputs  # PyTorch's CPU kernels return when done.
  with torch.no_grad():
    ms = {'forward': _median_ms(lambda: torch.nn.functional.conv2d(tx, tw, None, stride, pad),
                                repeats, ready),
          'input_grad': _median_ms(lambda: backward([True, False, False]), repeats, ready),
          'weight_grad': _median_ms(lambda: backward([False, True, False]), repeats, ready)}
    weight_grad = backward([False, True, False])[1].permute(2, 3, 1, 0).numpy()
  return ms, weight_grad


def main(argv):
  del argv
  frameworks = ('jax', 'torch') if FLAGS.compare_torch else ('jax',)
  rng = np.random.default_rng(0)
  lines = []
  for shape in conv_shapes(FLAGS.arch, FLAGS.width, FLAGS.batch_size, FLAGS.image_size):
    x = jnp.asarray(rng.standard_normal(shape.input, np.float32))
    fan_in = np.prod(shape.kernel[:3])
    w = jnp.asarray(rng.standard_normal(shape.kernel, np.float32) / np.sqrt(fan_in))
    dy = jnp.asarray(rng.standard_normal(shape.output, np.float32))
    line = {'input': list(shape.input), 'kernel': list(shape.kernel),
            'stride': list(shape.stride), 'count': shape.count,
            'forward_gflop': 2 * np.prod(shape.output) * fan_in / 1e9}
    line['jax_ms'], jax_weight_grad = time_jax(x, w, dy, shape.stride, shape.padding,
                                               FLAGS.repeats)
    if FLAGS.compare_torch:
      line['torch_ms'], torch_weight_grad = time_torch(x, w, dy, shape.stride, shape.padding,
                                                       FLAGS.repeats)
      line['weight_grad_max_rel_diff'] = float(
          np.max(np.abs(jax_weight_grad - torch_weight_grad)) / np.max(np.abs(torch_weight_grad)))
    line['load_avg_1m'] = os.getloadavg()[0]
    print(json.dumps(harness.warn_if_loaded(line)), flush=True)
    lines.append(line)
  total_ms = {}
  for framework in frameworks:
    total_ms[framework] = {kernel: sum(l['count'] * l[f'{framework}_ms'][kernel] for l in lines)
                           for kernel in _KERNELS}
    total_ms[framework]['all'] = sum(total_ms[framework].values())
  summary = {'arch': FLAGS.arch, 'width': FLAGS.width, 'batch_size': FLAGS.batch_size,
             'jax_convolutions': 'onednn' if layers.onednn_runs_convolutions() else 'xla',
             'total_ms': total_ms}
  if FLAGS.compare_torch:
    summary['jax_over_torch_time'] = (summary['total_ms']['jax']['all']
                                      / summary['total_ms']['torch']['all'])
  print(json.dumps(summary), flush=True)


if __name__ == '__main__':
  _define_flags()
  command_line.run(main)
