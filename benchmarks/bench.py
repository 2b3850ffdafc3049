r"""Speed and memory of the train step, one fresh process per mode.

    python -m benchmarks.bench --arch=resnet50 --batch_size=128 --num_blocks=4 \
        --modes=bp,deep_supervision,bwbpf --steps=5

prints one JSON line per mode: images_per_sec (median over --steps timed steps
after compilation, timed by `benchmarks.harness`), peak_rss_bytes (the worker
process's peak resident memory, runtime included) and step_memory_bytes (XLA's own account of what the step
needs: arguments + outputs + temporaries - donated buffers; for the block-wise
step, every block's state plus the largest single block call's other buffers).
Where the peak goes: baseline_rss_bytes is the worker's resident memory before
the model exists (interpreter, JAX, XLA:CPU, oneDNN), state_bytes every
block's parameters, BatchNorm statistics and optimizer state, ready_rss_bytes
the resident memory when the step is compiled and about to run (baseline,
states, compiled programs, the compiler's and the allocator's leftovers); the
peak above it is the step's own buffers.
cpu_seconds_per_step (process CPU time over the timed steps) is steadier than
images_per_sec on a shared CPU; load_avg_1m says how shared it was (above one
per core, a `warning` field and a `warning:` line on stderr say so).

`--aux_head` and `--local_loss` measure the step with another auxiliary network
or loss (JAX only), so heads compare at equal compute: aux_flop_fraction is the
heads' share of the backbone's FLOPs (`bwbpf_jax.aux_flop_fractions`).

Model FLOP utilisation: model_flops_per_image is 3x the forward pass of the
backbone and every head (the backward costs about twice the forward), the same
count for every mode, so modes compare on work done for the user. The forward
is counted as 2 x the multiply-adds of every convolution and dense layer, every
kernel tap counted, padding included (`forward_flops`); elementwise work
(BatchNorm, ReLU, pooling) is left out, as MFU conventions do. mfu divides model FLOP/s by the
device's dense peak for the dtype (`--peak_tflops`, or a table of known
accelerators; float32 counts the TF32 tensor-core peak, which XLA uses for
float32 convolutions on NVIDIA GPUs at the default precision).
A mode with the suffix `_remat` (`bp_remat`, `deep_supervision_remat`,
`bwbpf_remat`) is that mode with gradient checkpointing of every unit
(`build_model(remat=True)`); the PyTorch peer has no such mode.
`--compare_torch` adds the PyTorch peer of each mode (benchmarks/torch_peer.py;
needs `pip install -r requirements-bench.txt`).

Before anything is timed, the modes are checked against `all_modes()` and, with
--compare_torch, PyTorch is imported and the peer's limits checked: a mistake
ends with one line naming the fix and exit code 2, not after minutes of JAX
timings (1: a worker failed while measuring).
"""

import functools
import importlib
import json
import math
import os
import subprocess
import sys

from experiments import xla_defaults

xla_defaults.apply()  # Before JAX starts.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags

from benchmarks import command_line
from benchmarks import harness

FLAGS = flags.FLAGS
flags.DEFINE_string('arch', 'resnet50', 'Network: a built-in name or package.module:function '
                    'returning a bwbpf_jax.Network.')
flags.DEFINE_float('width', 1.0, 'Channel multiplier.')
flags.DEFINE_integer('batch_size', 128, 'Batch size.')
flags.DEFINE_integer('image_size', 32, 'Image side.')
flags.DEFINE_integer('num_classes', 10, 'Classes.')
flags.DEFINE_integer('num_blocks', 4, 'K.')
# bwbpf_jax.cost.SPLIT_BY, spelled out: the PyTorch worker must not import JAX.
flags.DEFINE_enum('split_by', 'stages', ('stages', 'activations'), 'The cut into K blocks '
                  '(experiments.main\'s --split_by; the PyTorch peer has stages).')
flags.DEFINE_string('aux_head', 'linear', 'Auxiliary head (JAX only; the PyTorch peer has linear).')
flags.DEFINE_string('local_loss', 'xent', 'Local loss of the auxiliary blocks (JAX only).')
flags.DEFINE_list('modes', ['bp', 'deep_supervision', 'bwbpf'], 'Modes to measure; '
                  'a _remat suffix (bp_remat) adds gradient checkpointing of every unit.')
flags.DEFINE_enum('train_step', 'auto', ('auto', 'fused', 'blockwise'),
                  'bwbpf step variant; auto: blockwise for bwbpf (as experiments.main).')
flags.DEFINE_enum('dtype', 'float32', ('float32', 'bfloat16'), 'Computation dtype.')
flags.DEFINE_integer('steps', 5, 'Timed steps after one compile step.')
flags.DEFINE_float('peak_tflops', None, 'Dense peak TFLOP/s of the device for --dtype, for '
                   'mfu; default: PEAK_TFLOPS for known accelerators.')
flags.DEFINE_bool('compare_torch', False, 'Also measure the PyTorch peer of each mode.')
flags.DEFINE_bool('jax', True, 'Measure the JAX step (--nojax --compare_torch: the peer only).')
flags.DEFINE_enum('torch_bwbpf_step', None, ('per_block', 'summed'), 'PyTorch peer\'s bwbpf '
                  'program (default: torch_peer.DEFAULT_BWBPF_STEP, the fastest measured).')
flags.DEFINE_bool('torch_channels_last', None, 'PyTorch peer\'s memory layout (default: '
                  'torch_peer.DEFAULT_CHANNELS_LAST).')
flags.DEFINE_string('worker', None, 'Internal: measure this one mode in this process.')
flags.DEFINE_enum('framework', 'jax', ('jax', 'torch'), 'Internal: worker framework.')


# Dense (no sparsity) datasheet peaks, TFLOP/s, by device_kind prefix and dtype.
PEAK_TFLOPS = {
    'NVIDIA H100': {'bfloat16': 989.4, 'float32': 494.7},
    'NVIDIA H200': {'bfloat16': 989.4, 'float32': 494.7},
    'NVIDIA A100': {'bfloat16': 312.0, 'float32': 156.0},
    'TPU v4': {'bfloat16': 275.0, 'float32': 275.0},
    'TPU v5 lite': {'bfloat16': 197.0, 'float32': 197.0},
    'TPU v5p': {'bfloat16': 459.0, 'float32': 459.0},
    'TPU v6 lite': {'bfloat16': 918.0, 'float32': 918.0},
}


def peak_tflops(device_kind: str, dtype: str, override=None):
  """`override`, else the device's dense peak for `dtype`, else None (then no mfu)."""
  if override:
    return override
  for prefix, peaks in PEAK_TFLOPS.items():
    if device_kind.startswith(prefix):
      return peaks[dtype]
  return None


def forward_flops(model, states, batch) -> float:
  """2 x multiply-adds of every convolution and dense layer in one inference forward.

  Read off the traced network (Flax method interception on `eval_step`'s
  abstract evaluation), so it is the same however the platform lowers a
  convolution: every kernel tap of every output position counts, padding
  included. XLA's cost analysis would count only taps inside the image on its
  convolutions and every tap on the CPU's im2col path, and none after GPU
  compilation turns convolutions into library calls.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from bwbpf_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  flops = []

  def record(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == '__call__' and isinstance(module, (nn.Conv, nn.Dense)):
      in_features = args[0].shape[-1]
      taps = math.prod(module.kernel_size) if isinstance(module, nn.Conv) else 1
      groups = getattr(module, 'feature_group_count', 1)
      flops.append(2 * math.prod(y.shape) * taps * in_features // groups)
    return y

  with nn.intercept_methods(record):
    jax.eval_shape(functools.partial(step_lib.eval_step, model), states, batch)
  return float(sum(flops))


def _memory_bytes(compiled) -> int:
  stats = compiled.memory_analysis()
  if stats is None:
    return -1
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def _tree_bytes(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree))


REMAT_SUFFIX = '_remat'
# bwbpf_jax.MODES, spelled out: the parent process does not import JAX.
BASE_MODES = ('bp', 'deep_supervision', 'bwbpf')
TORCH_INSTALL = 'pip install -r requirements-bench.txt'


def all_modes() -> tuple:
  """Every mode --modes accepts: the training modes, then each with gradient checkpointing."""
  return BASE_MODES + tuple(mode + REMAT_SUFFIX for mode in BASE_MODES)


def check_request() -> None:
  """Raises SystemExit(one line, code 2) for a request the workers could not measure."""
  unknown = [mode for mode in FLAGS.modes if mode not in all_modes()]
  if unknown:
    _refuse(f'unknown mode{"s" if len(unknown) > 1 else ""} {", ".join(unknown)} in --modes; '
            f'choose from {", ".join(all_modes())}')
  if not FLAGS.compare_torch:
    return
  if FLAGS.aux_head != 'linear' or FLAGS.local_loss != 'xent':
    _refuse('the PyTorch peer has linear heads and cross-entropy only; drop --compare_torch '
            'or --aux_head/--local_loss')
  if FLAGS.split_by != 'stages':
    _refuse('the PyTorch peer cuts at stages only (--split_by=stages); drop --compare_torch '
            'or --split_by')
  try:
    importlib.import_module('torch')
  except ImportError as e:
    _refuse(f'--compare_torch needs PyTorch ({e}); install it with `{TORCH_INSTALL}` '
            f'(torch, CPU build), or drop --compare_torch')


def _refuse(message: str):
  print(f'error: {message}', file=sys.stderr)
  raise SystemExit(2)


def measure_jax(mode: str) -> dict:
  """Times the train step of `mode` in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  import bwbpf_jax as bw  # pylint: disable=g-import-not-at-top
  from bwbpf_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  from bwbpf_jax.models import layers  # pylint: disable=g-import-not-at-top

  remat = mode.endswith(REMAT_SUFFIX)
  layers.onednn_runs_convolutions()  # Starts the backend and loads oneDNN before the baseline.
  baseline_rss = harness.current_rss_bytes()
  shape = (FLAGS.batch_size, FLAGS.image_size, FLAGS.image_size, 3)
  # A built-in network at --width, or a user's (package.module:function), which sets its own.
  network = (bw.models.network(FLAGS.arch, width=FLAGS.width, dtype=jnp.dtype(FLAGS.dtype))
             if FLAGS.arch in bw.ARCHITECTURES else bw.models.resolve(FLAGS.arch))
  split_points = bw.cost.split_points_by(FLAGS.split_by, network, FLAGS.num_blocks, shape[1:],
                                         batch_size=FLAGS.batch_size)
  model = bw.build_model(network, num_classes=FLAGS.num_classes, num_blocks=FLAGS.num_blocks,
                         split_points=split_points, mode=mode.removesuffix(REMAT_SUFFIX),
                         dtype=jnp.dtype(FLAGS.dtype), remat=remat,
                         aux_head=FLAGS.aux_head, local_loss=FLAGS.local_loss)
  tx = bw.make_optimizer('sgd', learning_rate=0.01, total_steps=1000)
  states = bw.init_block_states(model, tx, jax.random.key(0), shape)
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=shape), jnp.float32),
           'label': jnp.asarray(rng.integers(0, FLAGS.num_classes, FLAGS.batch_size), jnp.int32)}
  if step_lib.needs_pixels(model):
    batch['pixels'] = jnp.asarray(rng.integers(0, 256, size=shape), jnp.uint8)
  targets = step_lib.loss_targets(batch)
  blockwise = model.mode == 'bwbpf' and FLAGS.train_step != 'fused' and model.num_blocks > 1
  # The timed step runs the executables whose memory is reported (each program compiled
  # once, as in training: a second copy of the compiled code would inflate peak RSS).
  if blockwise:
    block_steps, memory, x = [], 0, batch['image']
    for block, state in zip(model.blocks, states):
      compiled = jax.jit(lambda s, x, l, b=block: step_lib.block_train_step(b, tx, s, x, l),
                         donate_argnums=(0,), **step_lib.jit_options(model)).lower(
                             state, x, targets).compile()
      block_steps.append(compiled)
      memory = max(memory, _memory_bytes(compiled) - _tree_bytes(state))
      x = jax.eval_shape(lambda s, x, l, b=block: step_lib.block_train_step(b, tx, s, x, l),
                         state, x, targets)[1]
    memory += _tree_bytes(states)
    step = step_lib.chain_block_steps(block_steps)
  else:
    step = bw.make_train_step(model, tx).lower(states, batch).compile()
    memory = _memory_bytes(step)
  state_bytes = _tree_bytes(states)
  ready_rss = harness.current_rss_bytes()
  timing, states = harness.time_steps(lambda states: step(states, batch)[0], states,
                                      steps=FLAGS.steps)
  images_per_sec = timing.per_second(FLAGS.batch_size)
  model_flops_per_image = 3 * forward_flops(model, states, batch) / FLAGS.batch_size
  device_kind = jax.devices()[0].device_kind
  peak = peak_tflops(device_kind, FLAGS.dtype, FLAGS.peak_tflops)
  return {'framework': 'jax', 'step': 'blockwise' if blockwise else 'fused', 'remat': remat,
          'images_per_sec': images_per_sec,
          'model_flops_per_image': model_flops_per_image,
          'model_tflops_per_sec': images_per_sec * model_flops_per_image / 1e12,
          'mfu': (images_per_sec * model_flops_per_image / (peak * 1e12)) if peak else None,
          'cpu_seconds_per_step': timing.cpu_seconds_per_call,
          'step_memory_bytes': memory, 'platform': jax.default_backend(),
          'baseline_rss_bytes': baseline_rss, 'state_bytes': state_bytes,
          'ready_rss_bytes': ready_rss,
          'aux_flop_fraction': bw.aux_flop_fractions(model, shape[1:])['total'],
          'split_points': list(model.split_points),
          'device': device_kind,
          'convolutions': ('onednn' if FLAGS.dtype == 'float32'
                           and layers.onednn_runs_convolutions() else 'xla')}


def _worker(mode: str):
  if FLAGS.framework == 'torch':
    if FLAGS.aux_head != 'linear' or FLAGS.local_loss != 'xent':
      raise SystemExit('error: the PyTorch peer has linear heads and cross-entropy only')
    if FLAGS.split_by != 'stages':
      raise SystemExit('error: the PyTorch peer cuts at stages only (--split_by=stages)')
    from benchmarks import torch_peer  # pylint: disable=g-import-not-at-top
    result = torch_peer.measure(mode, arch=FLAGS.arch, width=FLAGS.width,
                                batch_size=FLAGS.batch_size, image_size=FLAGS.image_size,
                                num_classes=FLAGS.num_classes, num_blocks=FLAGS.num_blocks,
                                steps=FLAGS.steps, **{
                                    name: value for name, value in (
                                        ('bwbpf_step', FLAGS.torch_bwbpf_step),
                                        ('channels_last', FLAGS.torch_channels_last))
                                    if value is not None})
  else:
    result = measure_jax(mode)
  result.update(mode=mode, arch=FLAGS.arch, aux_head=FLAGS.aux_head,
                local_loss=FLAGS.local_loss, width=FLAGS.width, batch_size=FLAGS.batch_size,
                image_size=FLAGS.image_size, num_blocks=FLAGS.num_blocks,
                split_by=FLAGS.split_by, dtype=FLAGS.dtype, steps=FLAGS.steps,
                **harness.process_fields())
  print(json.dumps(result), flush=True)


def _run_worker(mode: str, framework: str) -> int:
  argv = [sys.executable, '-m', 'benchmarks.bench', f'--worker={mode}',
          f'--framework={framework}'] + [
              f'--{name}={",".join(value) if isinstance(value, list) else value}'
              for name, value in FLAGS.flag_values_dict().items()
              if name in ('arch', 'width', 'batch_size', 'image_size', 'num_classes',
                          'num_blocks', 'split_by', 'aux_head', 'local_loss', 'train_step',
                          'dtype', 'steps', 'peak_tflops', 'torch_bwbpf_step', 'torch_channels_last')
              and value is not None]
  proc = subprocess.run(argv, capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode or not lines:
    print(f'error: {framework} {mode} worker failed: '
          f'{(proc.stderr.strip().splitlines() or ["no output"])[-1]}', file=sys.stderr)
    return 1
  print(json.dumps(harness.warn_if_loaded(json.loads(lines[-1]))), flush=True)
  return 0


def main(argv):
  del argv
  if FLAGS.worker:
    _worker(FLAGS.worker)
    return
  check_request()
  failures = 0
  for mode in FLAGS.modes:
    if FLAGS.jax:
      failures += _run_worker(mode, 'jax')
    if FLAGS.compare_torch and not mode.endswith(REMAT_SUFFIX):
      failures += _run_worker(mode, 'torch')
  sys.exit(1 if failures else 0)


if __name__ == '__main__':
  command_line.run(main)
