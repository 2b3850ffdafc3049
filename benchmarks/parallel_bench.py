r"""Block-parallel throughput on D CPU devices with one core each, against one device.

    python -m benchmarks.parallel_bench --arch=resnet18 --width=0.25 --batch_size=64 \
        --num_blocks=2 --microbatches=4 --steps=5

prints one JSON line. Each measurement runs in a fresh process pinned to as many
cores as it has devices (CPU affinity, set before JAX starts, so XLA's thread
pools are sized to it too), with XLA's multi-threaded Eigen kernels off
(`--xla_cpu_multi_thread_eigen=false`; XLA has no per-device thread count, and
`intra_op_parallelism_threads` is not an XLA flag). D devices can then use at
most D cores, and the speed-up of the pipeline over one device is what block
parallelism buys on D accelerators, measured on a CPU.

- The `sync` process (1 core, 1 device) balances the split points by
  measurement: every unit is timed as its own block on the micro-batch
  (`parallel.per_block_step_times`, auxiliary head included) and
  `parallel.balanced_split_points` groups units into K blocks of similar cost.
  It then times the synchronous block-wise step fed the M micro-batches in
  turn (`sync_microbatch`: exactly what the pipeline computes) and on the whole
  batch at once (`sync_full_batch`: one optimizer step per batch instead of M,
  a different computation given for scale).
- The `pipeline` process (D cores, D devices) times the host-dispatched
  pipeline (`parallel.make_block_parallel_train_step`), the SPMD stage
  pipeline (`parallel.StagePipeline`, K stages x D / K data rows; its XLA
  memory analysis, packed state per device against all blocks', padding
  overhead and bubble fractions) and, again, the synchronous micro-batch step
  on one of its devices (`sync_microbatch_on_pipeline_cores`).
  If that one is faster than on one core, one device used more than one core,
  and `speedup` is an upper bound, not the pipeline's own gain. On jax 0.10.2
  this is what happens: XLA:CPU runs every device's kernels on one shared
  intra-op thread pool, so a single device's step keeps both pinned cores busy
  (cpu_per_wall about 1.9) and is as fast as the pipeline. The honest CPU
  figure is then pipeline / sync_microbatch_on_pipeline_cores (about 1: block
  parallelism buys nothing where one device already has every core); the
  gain on D accelerators is what `--project` estimates.

    python -m benchmarks.parallel_bench --arch=resnet50 --width=0.25 --batch_size=64 \
        --microbatches=4 --project=4,8

times every unit alone on one core and prints, for each K, the projected
speed-up (fill and drain of the M micro-batches included, transfers not) of
the default split points and of `parallel.balanced_split_points`.

Throughputs are images per second, each the median over `--steps` timed global
batches after compilation; `speedup` = pipeline / sync_microbatch and
`parallel_efficiency` = speedup / D. `cpu_per_wall` (process CPU seconds over
wall seconds) shows how many cores were busy; `load_avg_1m` how shared the
machine was.
"""

import json
import os
import subprocess
import sys

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string('arch', 'resnet18', 'Architecture.')
flags.DEFINE_float('width', 0.25, 'Channel multiplier.')
flags.DEFINE_integer('image_size', 32, 'Image side.')
flags.DEFINE_integer('batch_size', 64, 'Global batch size.')
flags.DEFINE_integer('num_blocks', 2, 'K.')
flags.DEFINE_integer('num_devices', 2, 'CPU devices D, one core each.')
flags.DEFINE_integer('microbatches', 4, 'Micro-batches M per global batch.')
flags.DEFINE_integer('steps', 5, 'Timed global batches per configuration.')
flags.DEFINE_integer('unit_repeats', 5, 'Timed calls per unit when balancing the split.')
flags.DEFINE_list('project', None, 'Only project: time every unit on one core and print, for '
                  'each K listed (e.g. 4,8), the pipeline speed-up of the default and of the '
                  'balanced split points.')
flags.DEFINE_enum('worker', None, ('sync', 'pipeline', 'project'),
                  'Internal: measure in this process.')
flags.DEFINE_list('split_points', None, 'Internal: split points for the pipeline worker.')

_SHARED_FLAGS = ('arch', 'width', 'image_size', 'batch_size', 'num_blocks', 'num_devices',
                 'microbatches', 'steps', 'unit_repeats', 'project')


def _pin_and_configure(num_cores: int, num_devices: int) -> list:
  """Pins this process to `num_cores` cores and sets XLA's flags; must run before JAX starts."""
  cores = sorted(os.sched_getaffinity(0))[:num_cores]
  os.sched_setaffinity(0, cores)
  from experiments import xla_defaults  # pylint: disable=g-import-not-at-top
  xla_defaults.apply()
  os.environ['XLA_FLAGS'] = ' '.join([
      os.environ.get('XLA_FLAGS', ''), '--xla_cpu_multi_thread_eigen=false',
      f'--xla_force_host_platform_device_count={num_devices}']).strip()
  os.environ['JAX_PLATFORMS'] = 'cpu'
  return cores


def _time_steps(step, states, batch, steps):
  """(states, median seconds per call, CPU seconds per wall second) after one compiling call."""
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  timing, (states, _) = harness.time_steps(lambda carry: step(carry[0], batch), (states, None),
                                           steps=steps)
  return states, timing.median_seconds, timing.cpu_per_wall


def _measure(worker: str, split_points) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  import bwbpf_jax as bw  # pylint: disable=g-import-not-at-top
  from bwbpf_jax import parallel  # pylint: disable=g-import-not-at-top

  micro_size = FLAGS.batch_size // FLAGS.microbatches
  image = (FLAGS.image_size, FLAGS.image_size, 3)
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(FLAGS.batch_size,) + image).astype(np.float32),
           'label': rng.integers(0, 10, FLAGS.batch_size).astype(np.int32)}
  microbatch = {name: value[:micro_size] for name, value in batch.items()}
  tx = bw.make_optimizer('sgd', learning_rate=0.01, total_steps=1000)
  build = lambda **kw: bw.build_model(FLAGS.arch, num_classes=10, width=FLAGS.width, **kw)
  result = {}

  if split_points is None:
    # Per-unit costs: the network cut at every unit, each block timed alone.
    num_units = len(bw.models.architecture_units(FLAGS.arch, width=FLAGS.width)[1])
    per_unit = build(split_points=tuple(range(1, num_units)))
    unit_states = bw.init_block_states(per_unit, tx, jax.random.key(0), image)
    unit_costs = parallel.per_block_step_times(per_unit, tx, unit_states, microbatch,
                                               repeats=FLAGS.unit_repeats)
    result['unit_seconds'] = [round(t, 5) for t in unit_costs]
    if worker == 'project':
      result['projections'] = [_projection(build, unit_costs, int(k))
                               for k in FLAGS.project]
      result['load_avg_1m'] = os.getloadavg()[0]
      return result
    split_points = parallel.balanced_split_points(unit_costs, FLAGS.num_blocks)

  model = build(split_points=tuple(split_points))
  states = bw.init_block_states(model, tx, jax.random.key(0), image)
  blockwise = bw.make_blockwise_train_step(model, tx)

  def sync_microbatch_step(states, batch):
    for part in parallel.split_microbatches(batch, FLAGS.microbatches):
      states, metrics = blockwise(states, part)
    return states, metrics

  if worker == 'sync':
    block_times = parallel.per_block_step_times(model, tx, states, microbatch,
                                                repeats=FLAGS.unit_repeats)
    states, sync_micro_s, sync_micro_cpu = _time_steps(sync_microbatch_step, states, batch,
                                                       FLAGS.steps)
    _, sync_full_s, sync_full_cpu = _time_steps(blockwise, states, batch, FLAGS.steps)
    result.update(
        split_points=list(split_points),
        block_seconds=[round(t, 5) for t in block_times],
        projected_speedup=parallel.projected_pipeline_speedup(block_times,
                                                              FLAGS.microbatches),
        sync_microbatch_images_per_sec=FLAGS.batch_size / sync_micro_s,
        sync_full_batch_images_per_sec=FLAGS.batch_size / sync_full_s,
        cpu_per_wall={'sync_microbatch': sync_micro_cpu, 'sync_full_batch': sync_full_cpu})
  else:
    devices = jax.devices()[:FLAGS.num_devices]
    pipeline = parallel.make_block_parallel_train_step(model, tx, devices,
                                                       num_microbatches=FLAGS.microbatches)
    host_states = jax.device_get(states)
    placed = parallel.place_block_states(states, parallel.placement(model, devices))
    states, pipeline_s, pipeline_cpu = _time_steps(pipeline, placed, batch, FLAGS.steps)
    _, sync_micro_s, sync_micro_cpu = _time_steps(
        sync_microbatch_step, parallel.gather_block_states(states), batch, FLAGS.steps)
    # The SPMD stage pipeline: K stages x (D / K) data rows, full from step to step.
    mesh = parallel.make_pipeline_mesh(FLAGS.num_blocks, devices)
    plan = parallel.make_stage_plan(model, tx, image)
    spmd = parallel.StagePipeline(model, tx, plan, mesh, num_microbatches=FLAGS.microbatches,
                                  global_batch_size=FLAGS.batch_size)
    pipeline_state, sharded = spmd.init(host_states), spmd.shard_batch(batch)
    memory = spmd.step.lower(pipeline_state, sharded).compile().memory_analysis()
    _, spmd_s, spmd_cpu = _time_steps(spmd.step, pipeline_state, sharded, FLAGS.steps)
    all_states_bytes = sum(4 * packing.size for packing in plan.state_packings)
    result.update(
        pipeline_images_per_sec=FLAGS.batch_size / pipeline_s,
        spmd_pipeline_images_per_sec=FLAGS.batch_size / spmd_s,
        sync_microbatch_on_pipeline_cores_images_per_sec=FLAGS.batch_size / sync_micro_s,
        spmd_mesh=dict(mesh.shape),
        spmd_state_bytes_per_device=4 * plan.state_length,
        replicated_state_bytes_per_device=all_states_bytes,
        spmd_padding_overhead=round(plan.padding_overhead(), 4),
        spmd_xla_argument_bytes_per_device=getattr(memory, 'argument_size_in_bytes', None),
        spmd_xla_temp_bytes_per_device=getattr(memory, 'temp_size_in_bytes', None),
        # Bubble slots: the host pipeline fills and drains every step; the SPMD one once
        # per segment (here the --steps timed steps plus the compiling one).
        bubble_fraction_host_pipeline=round(
            (FLAGS.num_blocks - 1) / (FLAGS.microbatches + FLAGS.num_blocks - 1), 4),
        bubble_fraction_spmd_pipeline=round(
            (FLAGS.num_blocks - 1) / ((FLAGS.steps + 1) * FLAGS.microbatches
                                      + FLAGS.num_blocks - 1), 4),
        cpu_per_wall={'pipeline': pipeline_cpu, 'spmd_pipeline': spmd_cpu,
                      'sync_microbatch_on_pipeline_cores': sync_micro_cpu})
  result['load_avg_1m'] = os.getloadavg()[0]
  return result


def _projection(build, unit_costs, num_blocks: int) -> dict:
  """Projected pipeline speed-up on K devices for the default and the balanced split points.

  A block's time is the sum of its units' measured times (each unit was timed
  with an auxiliary head of its own, so blocks of many units are overestimated
  a little); the speed-up counts the fill and drain of --microbatches.
  """
  from bwbpf_jax import parallel  # pylint: disable=g-import-not-at-top

  def block_times(points):
    bounds = [0, *points, len(unit_costs)]
    return [sum(unit_costs[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

  projection = {'num_blocks': num_blocks}
  candidates = (('default', build(num_blocks=num_blocks).split_points),
                ('balanced', parallel.balanced_split_points(unit_costs, num_blocks)))
  for name, points in candidates:
    times = block_times(points)
    speedup = parallel.projected_pipeline_speedup(times, FLAGS.microbatches)
    projection[name] = {
        'split_points': list(points), 'block_seconds': [round(t, 5) for t in times],
        'speedup': round(speedup, 3), 'efficiency': round(speedup / num_blocks, 3),
        'steady_state_speedup': round(parallel.projected_pipeline_speedup(times), 3)}
  return projection


def _run_worker(worker: str, split_points=None) -> dict:
  argv = [sys.executable, '-m', 'benchmarks.parallel_bench', f'--worker={worker}']
  for name in _SHARED_FLAGS:
    value = getattr(FLAGS, name)
    if value is not None:
      argv.append(f'--{name}={",".join(value) if isinstance(value, list) else value}')
  if split_points is not None:
    argv.append(f'--split_points={",".join(str(p) for p in split_points)}')
  proc = subprocess.run(argv, capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  lines = [line for line in proc.stdout.splitlines() if line.startswith('{')]
  if proc.returncode or not lines:
    raise SystemExit(f'error: {worker} worker failed: '
                     f'{(proc.stderr.strip().splitlines() or ["no output"])[-1]}')
  return json.loads(lines[-1])


def main(argv):
  del argv
  if FLAGS.worker:
    num = FLAGS.num_devices if FLAGS.worker == 'pipeline' else 1
    cores = _pin_and_configure(num, num)
    split_points = None if FLAGS.split_points is None else [int(p) for p in FLAGS.split_points]
    result = _measure(FLAGS.worker, split_points)
    result['cores'] = cores
    print(json.dumps(result), flush=True)
    return
  if FLAGS.project:
    projected = _run_worker('project')
    import jax  # pylint: disable=g-import-not-at-top
    print(json.dumps({
        'arch': FLAGS.arch, 'width': FLAGS.width, 'image_size': FLAGS.image_size,
        'microbatch_size': FLAGS.batch_size // FLAGS.microbatches,
        'microbatches': FLAGS.microbatches, **projected, 'jax': jax.__version__}), flush=True)
    return
  sync = _run_worker('sync')
  pipeline = _run_worker('pipeline', sync['split_points'])
  speedup = pipeline['pipeline_images_per_sec'] / sync['sync_microbatch_images_per_sec']
  import jax  # pylint: disable=g-import-not-at-top
  print(json.dumps({
      'arch': FLAGS.arch, 'width': FLAGS.width, 'image_size': FLAGS.image_size,
      'batch_size': FLAGS.batch_size, 'microbatches': FLAGS.microbatches,
      'num_blocks': FLAGS.num_blocks, 'num_devices': FLAGS.num_devices,
      'split_points': sync['split_points'], 'unit_seconds': sync['unit_seconds'],
      'block_seconds': sync['block_seconds'], 'projected_speedup': sync['projected_speedup'],
      'sync_microbatch_images_per_sec': sync['sync_microbatch_images_per_sec'],
      'sync_full_batch_images_per_sec': sync['sync_full_batch_images_per_sec'],
      'pipeline_images_per_sec': pipeline['pipeline_images_per_sec'],
      'spmd_pipeline_images_per_sec': pipeline['spmd_pipeline_images_per_sec'],
      **{name: pipeline[name] for name in pipeline
         if name.startswith(('spmd_', 'bubble_', 'replicated_'))
         and name != 'spmd_pipeline_images_per_sec'},
      'sync_microbatch_on_pipeline_cores_images_per_sec':
          pipeline['sync_microbatch_on_pipeline_cores_images_per_sec'],
      'speedup': speedup, 'parallel_efficiency': speedup / FLAGS.num_devices,
      'cpu_per_wall': {**sync['cpu_per_wall'], **pipeline['cpu_per_wall']},
      'cores': {'sync': sync['cores'], 'pipeline': pipeline['cores']},
      'load_avg_1m': [sync['load_avg_1m'], pipeline['load_avg_1m']],
      'steps': FLAGS.steps, 'jax': jax.__version__}), flush=True)


if __name__ == '__main__':
  app.run(main)
