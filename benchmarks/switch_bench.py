r"""What running alike pipeline stages inside `lax.switch` costs, against stacked weights.

    taskset -c 1 python -m benchmarks.switch_bench --arch=vit_tiny_d8 --width=0.5 \
        --num_blocks=4 --batch_size=32

The stage pipeline (`bwbpf_jax.parallel.pipeline`) runs each device's stage as
a branch of `lax.switch` on the stage index. When the stages are alike (a
ViT's middle blocks: the same layers and head), MaxText's shape is possible
instead: one stage function over weights stacked on a leading axis, each
device indexing its own slice, with no conditional. This times, for one
micro-batch of block 2's input (alike blocks 2..K-1), the gradient of block
2's local loss three ways, each jitted alone, in one process:
- `plain`: the block's gradient function on its own weights;
- `switch`: the same inside `lax.switch` over the alike blocks (branch index
  a traced argument, so nothing is folded away), as the pipeline runs it;
- `stacked`: one gradient function on weights stacked over the alike blocks,
  the slice chosen by a traced index (`lax.dynamic_index_in_dim`).
It prints one JSON line: median ms of each over --steps interleaved rounds
(one call of each per round, `harness.time_calls`) and the ratios. Pin it to one core (taskset) to see one device's cost.
"""

import json

from experiments import xla_defaults

xla_defaults.apply()  # Before JAX starts.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from benchmarks import command_line
from benchmarks import harness
import bwbpf_jax as bw
from bwbpf_jax import step as step_lib

FLAGS = flags.FLAGS


def _define_flags():
  """Defined when run as a program only, so importing this module adds no global flags."""
  flags.DEFINE_string('arch', 'vit_tiny_d8', 'Architecture (a network with alike middle blocks).')
  flags.DEFINE_float('width', 0.5, 'Width multiplier.')
  flags.DEFINE_integer('num_blocks', 4, 'K; blocks 2..K-1 must be alike (at least 2 of them).')
  flags.DEFINE_integer('batch_size', 32, 'Micro-batch size.')
  flags.DEFINE_integer('image_size', 32, 'Image side.')
  flags.DEFINE_integer('steps', 10, 'Interleaved timed rounds (one call of each variant), after two warm-up calls each.')


def measure(arch, width, num_blocks, batch_size, image_size, steps) -> dict:
  model = bw.build_model(arch, num_classes=10, num_blocks=num_blocks, width=width)
  tx = bw.make_optimizer('sgd', learning_rate=0.1, total_steps=1)
  image = (image_size, image_size, 3)
  states = bw.init_block_states(model, tx, jax.random.key(0), image)
  alike = list(range(1, num_blocks - 1))
  if len(alike) < 2:
    raise bw.UsageError(f'needs at least 2 alike middle blocks; K={num_blocks} has {len(alike)}')
  params = [states[k].params for k in alike]
  if len({jax.tree_util.tree_structure(p) for p in params}) != 1:
    raise bw.UsageError(f'blocks {[k + 1 for k in alike]} of {arch} are not alike')
  stats = states[alike[0]].batch_stats
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch_size,) + image), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)
  x = images
  for k in range(alike[0]):  # Block 2's input: block 1's features.
    x = model.blocks[k].apply({'params': states[k].params, 'batch_stats': states[k].batch_stats},
                              x, train=False)[0]
  block = model.blocks[alike[0]]

  def grad(p):
    return jax.grad(lambda p: step_lib.local_loss(block, p, stats, x, labels)[0])(p)

  plain = jax.jit(grad)
  branches = [lambda ps, k=k: grad(ps[k]) for k in range(len(alike))]
  switch = jax.jit(lambda index, ps: lax.switch(index, branches, ps))
  stacked_params = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *params)
  stacked = jax.jit(lambda index, sp: grad(jax.tree_util.tree_map(
      lambda leaf: lax.dynamic_index_in_dim(leaf, index, keepdims=False), sp)))
  index = jnp.int32(0)
  calls = {'plain': lambda: plain(params[0]), 'switch': lambda: switch(index, params),
           'stacked': lambda: stacked(index, stacked_params)}
  expected = calls['plain']()
  for name in ('switch', 'stacked'):  # The three compute the same gradient.
    for got, want in zip(jax.tree_util.tree_leaves(calls[name]()),
                         jax.tree_util.tree_leaves(expected)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=name)
  seconds = {name: [] for name in calls}
  for name, call in calls.items():  # Compile and settle.
    harness.time_calls(call, repeats=1, warmup=2)
  load = []
  for _ in range(steps):  # Interleaved rounds: a shared machine's load hits all three alike.
    for name, call in calls.items():
      timing = harness.time_calls(call, repeats=1, warmup=0)
      seconds[name].append(timing.median_seconds)
      load.append(timing.load_avg_1m)
  results = {f'{name}_ms': round(float(np.median(s)) * 1e3, 3) for name, s in seconds.items()}
  results['load_avg_1m'] = max(load)
  results['switch_over_plain'] = round(results['switch_ms'] / results['plain_ms'], 3)
  results['stacked_over_plain'] = round(results['stacked_ms'] / results['plain_ms'], 3)
  return dict(arch=arch, width=width, num_blocks=num_blocks, batch_size=batch_size,
              block_input=list(x.shape), **results)


def main(argv):
  del argv
  print(json.dumps(measure(FLAGS.arch, FLAGS.width, FLAGS.num_blocks, FLAGS.batch_size,
                           FLAGS.image_size, FLAGS.steps)))


if __name__ == '__main__':
  _define_flags()
  command_line.run(main)
