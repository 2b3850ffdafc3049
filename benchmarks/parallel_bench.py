r"""Parallel training speed measured with real parallel workers: processes, one core each.

    python -m benchmarks.parallel_bench --processes=2 --arch=resnet18 --width=0.25 \
        --batch_size=128 --num_blocks=2 --microbatches=4 --steps=5

prints one JSON line per configuration. The configurations run one after
another, never two at once, each in fresh processes. Every process is pinned
to its own CPU core before JAX starts (CPU affinity: XLA and oneDNN size their
thread pools from it), so one process keeps at most one core busy;
`cpu_per_wall` shows that it did. Affinity alone is what caps a process at
its core: XLA:CPU on jax 0.10.2 starts 13 threads in a process pinned to one
core and 17 on two, with or without `--xla_cpu_multi_thread_eigen=false`;
that flag is set as well, so Eigen's kernels do not cut their work into tasks
for threads that would only take turns on the one core.

Why processes and not fake devices: fake CPU devices in one process
(`--xla_force_host_platform_device_count`) share XLA:CPU's one intra-op thread
pool, so a single device's step already spreads over every pinned core and
D fake devices show no parallel speed-up however well the work is split.
Processes joined by `jax.distributed.initialize` (loopback, gloo collectives,
JAX's default for CPU) each own one device and one core, and exchange
activations and gradients through real collectives, as accelerators on a
network would, only slower.

- `sync` (1 process, 1 core): the synchronous block-wise step
  (`bw.make_blockwise_train_step`) fed the M micro-batches of each batch in
  turn: exactly the updates the stage pipeline computes, the baseline of every
  `speedup`. `sync_full_batch`: the same step on the whole batch (one update
  per batch instead of M, a different computation), given for scale; the
  `data_*` configurations also do one update per batch, so their like-for-like
  single-core figure is this one (`speedup_over_sync_full_batch`).
- `blocks` (P processes): the SPMD stage pipeline (`parallel.StagePipeline`)
  over a (P / S data rows x S stages) mesh, M micro-batches per batch, each
  process feeding its slice of the batch (`parallel.process_feed_slice`).
  The pipeline stays full from step to step (no drain while timing).
- `data_bwbpf` / `data_bp` (P processes): data parallelism over the same P
  processes, the global batch split over them: the block-wise bwbpf step
  (`parallel.make_data_parallel_blockwise_train_step`) and the fused step of
  a mode='bp' model (`parallel.make_data_parallel_train_step`).
- `all_cores_bwbpf` / `all_cores_bp` (1 process pinned to P cores): the
  fused step (`bw.make_train_step`) on the whole batch, Eigen's kernels and
  oneDNN's threads spread over the P cores: what a plain run on this machine
  does with the same cores, the alternative a user has to any parallelism.
- `host_dispatch` (1 process, P fake devices pinned to P cores): the earlier
  host-dispatched pipeline (`benchmarks/host_dispatch.py`), for
  comparison with that design only; its devices share one thread pool (above).

The split points are balanced by measurement unless `--split_points` gives
them: a first process (1 core) times every unit as its own block on the
micro-batch (`parallel.per_block_step_times`, auxiliary head included) and
`parallel.balanced_split_points` groups the units into K blocks of similar cost.
Units timed alone do not add up to the blocks they form, so for K = 2 every cut
is timed as two blocks (`cut_seconds`) and the cut whose slower block is
fastest is taken (ResNet-18 x0.25, micro-batch 32: the unit sums chose the cut
at unit 4, whose blocks took 0.200 and 0.076 s; the cut at unit 3 takes 0.136
and 0.126 s).

Fields of each line: `images_per_sec` = global batch / median step seconds
(after compilation and one warm-up step; for several processes the slowest
process's median), `speedup` = images_per_sec / sync's, `parallel_efficiency`
= speedup / `cores` (the cores the configuration's processes were pinned
to; `processes` counts the processes). `per_process`: each process's `cores`
(the affinity actually set), `cpu_per_wall` (CPU seconds per wall second
over the timed steps: ~1 for one busy core), `peak_rss_bytes`. `xla_memory_per_device`: XLA's
`memory_analysis()` of the compiled step (one device per process; for a
block-wise step, K programs, aggregated as its `aggregation` says).
`collective_bytes`: from the compiled HLO, the result bytes of every
collective (all-reduce, all-gather, reduce-scatter, all-to-all,
collective-permute) on one device, a proxy for what it sends; `per_tick` sums
those inside a loop body (the pipeline's scan over micro-batches: run M
times a step), `per_step` the rest, `total_per_step` = M x per_tick +
per_step (XLA turns a loop of one iteration into straight code; then every
tick's collectives are in `per_step`, and the total is still right).
Collectives within groups of one device move nothing and are left out. `convolutions`: which convolutions the step runs (`onednn` custom calls
or XLA's own; XLA:CPU's are slower, and data-parallel programs keep XLA's so
the partitioner can shard them: part of any data-vs-sync difference on CPU).
`compile_seconds` (blocks): lowering and compiling the pipeline's step, in process
0 (a load from the persistent compilation cache where one is set).
`bubble_fraction` (blocks): idle stage slots over all slots since the
pipeline was filled, (S - 1) / (steps_run x M + S - 1), since the pipeline
stays full between drains and pays its S - 1 ticks of fill and drain once
(steps_run: every step run, warm-up included); for host_dispatch, which fills
and drains every step, (K - 1) / (M + K - 1). `load_avg_1m` says how shared
the machine was; above one per core, the line gets a `warning` and stderr a
`warning:` line. A bad flag is one line on stderr and exit 2. A worker that
fails gives one line on stderr naming the configuration and its last stderr
line; the other workers are killed.

    python -m benchmarks.parallel_bench --arch=resnet50 --width=0.25 --batch_size=64 \
        --microbatches=4 --project=4,8

times every unit alone on one core and prints, for each K, the projected
speed-up (fill and drain of the M micro-batches included, transfers not) of
the default split points and of `parallel.balanced_split_points`.
"""

import inspect
import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags

from benchmarks import command_line
from benchmarks import harness
from benchmarks import hlo
from benchmarks import processes
from benchmarks.processes import WorkerFailure

FLAGS = flags.FLAGS
CONFIGS = ('sync', 'blocks', 'data_bwbpf', 'data_bp', 'all_cores_bwbpf', 'all_cores_bp',
           'host_dispatch')
MULTI_PROCESS_CONFIGS = ('blocks', 'data_bwbpf', 'data_bp')
ALL_CORES_CONFIGS = ('all_cores_bwbpf', 'all_cores_bp')  # 'all_cores_<mode>'.
WARMUP_STEPS = 2  # The first call compiles (or runs a compiled step first); one more warms up.

flags.DEFINE_string('arch', 'resnet18', 'Network: a built-in name or package.module:function '
                    'returning a bwbpf_jax.Network (a user\'s own).')
flags.DEFINE_float('width', 0.25, 'Channel multiplier (built-in networks).')
flags.DEFINE_integer('image_size', 32, 'Image side.')
flags.DEFINE_integer('batch_size', 128, 'Global batch size B.')
flags.DEFINE_integer('num_blocks', 2, 'K.')
flags.DEFINE_integer('processes', 2, 'P: processes (one core, one device each).')
flags.DEFINE_integer('microbatches', 4, 'Micro-batches M per global batch.')
flags.DEFINE_integer('pipeline_stages', None, 'S: stages of the blocks pipeline (default K); '
                     'the mesh is P / S data rows x S stages.')
flags.DEFINE_integer('steps', 5, 'Timed global batches per configuration.')
flags.DEFINE_integer('unit_repeats', 5, 'Timed calls per unit when balancing the split.')
flags.DEFINE_list('configs', list(CONFIGS), f'Configurations to run, of {", ".join(CONFIGS)}.')
flags.DEFINE_list('split_points', None, 'K-1 split points; default: balanced by measurement.')
flags.DEFINE_integer('timeout_s', 1800, 'Wall seconds a configuration may take; then its '
                     'workers are killed.')
flags.DEFINE_list('project', None, 'Only project: time every unit on one core and print, for '
                  'each K listed (e.g. 4,8), the pipeline speed-up of the default and of the '
                  'balanced split points.')
flags.DEFINE_enum('worker', None, ('split', 'sync', 'project', 'host_dispatch')
                  + ALL_CORES_CONFIGS + MULTI_PROCESS_CONFIGS, 'Internal: measure in this process.')
flags.DEFINE_list('cores', None, 'Internal: the worker\'s CPU cores.')
flags.DEFINE_integer('process_id', 0, 'Internal: this worker\'s index among --processes.')
flags.DEFINE_string('coordinator', None, 'Internal: host:port of process 0.')
flags.DEFINE_integer('fail_process', None, 'Internal, for tests: this process index exits '
                     'with an error before joining the others.')

_SHARED_FLAGS = ('arch', 'width', 'image_size', 'batch_size', 'num_blocks', 'processes',
                 'microbatches', 'pipeline_stages', 'steps', 'unit_repeats', 'project',
                 'fail_process')


# ---------------------------------------------------------------- compiled HLO text

def _pin_and_configure(cores: list, num_devices: int = 1, *, eigen_threads: bool = False) -> list:
  """Pins this process to `cores` and sets XLA's flags; must run before JAX starts.

  `eigen_threads`: let Eigen's kernels split their work over the cores, as a
  plain run on several cores does (the `all_cores_*` configurations).
  """
  os.sched_setaffinity(0, cores)
  from experiments import xla_defaults  # pylint: disable=g-import-not-at-top
  xla_defaults.apply()
  device_flag = (f'--xla_force_host_platform_device_count={num_devices}'
                 if num_devices > 1 else '')
  eigen_flag = '' if eigen_threads else '--xla_cpu_multi_thread_eigen=false'
  os.environ['XLA_FLAGS'] = ' '.join([
      os.environ.get('XLA_FLAGS', ''), eigen_flag, device_flag]).strip()
  os.environ['OMP_NUM_THREADS'] = str(len(cores))  # oneDNN's threads (GNU OpenMP).
  os.environ['JAX_PLATFORMS'] = 'cpu'
  return sorted(os.sched_getaffinity(0))


def _network():
  """The --arch network: a built-in one at --width, or a user's (which sets its own width)."""
  import bwbpf_jax as bw  # pylint: disable=g-import-not-at-top
  if FLAGS.arch in bw.ARCHITECTURES:
    return bw.models.network(FLAGS.arch, width=FLAGS.width)
  return bw.models.resolve(FLAGS.arch)


def _experiment(split_points, mode: str = 'bwbpf'):
  """(model, tx, initial block states, global batch): the same in every process."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import bwbpf_jax as bw  # pylint: disable=g-import-not-at-top
  image = (FLAGS.image_size, FLAGS.image_size, 3)
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(FLAGS.batch_size,) + image).astype(np.float32),
           'label': rng.integers(0, 10, FLAGS.batch_size).astype(np.int32)}
  tx = bw.make_optimizer('sgd', learning_rate=0.01, total_steps=1000)
  model = bw.build_model(_network(), num_classes=10, mode=mode,
                         **({} if split_points is None
                            else {'split_points': tuple(split_points)}))
  states = bw.init_block_states(model, tx, jax.random.key(0), image)
  return model, tx, states, batch


def _time(step, carry):
  """(Timing, last carry) of `carry = step(carry)` over --steps, after WARMUP_STEPS."""
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  return harness.time_steps(step, carry, steps=FLAGS.steps, warmup=WARMUP_STEPS)


def _memory(compiled):
  """XLA's memory analysis of one compiled program, in bytes (None where not given)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return {'argument_bytes': int(stats.argument_size_in_bytes),
          'output_bytes': int(stats.output_size_in_bytes),
          'alias_bytes': int(stats.alias_size_in_bytes),
          'temp_bytes': int(stats.temp_size_in_bytes)}


def _programs_fields(compiled_programs, *, blockwise: bool) -> dict:
  """Memory, collective bytes and convolution kind of a step's compiled programs.

  A block-wise step is K programs run one after another: every block's state
  stays resident, but only one program's temporaries exist at a time, so
  argument, output and alias bytes are summed over the programs (an upper
  bound: block k's output is block k+1's argument) and temp bytes are the
  largest program's. Its collectives run once per step each.
  """
  memories = [_memory(c) for c in compiled_programs]
  texts = [c.as_text() for c in compiled_programs]
  collectives = [hlo.collective_bytes(text) for text in texts]
  if blockwise:
    memory = None
    if all(memories):
      memory = {name: sum(m[name] for m in memories)
                for name in ('argument_bytes', 'output_bytes', 'alias_bytes')}
      memory.update(
          temp_bytes=max(m['temp_bytes'] for m in memories), per_block=memories,
          aggregation='argument, output and alias bytes summed over the K block programs '
                      '(all states stay resident), temp bytes the largest block program\'s '
                      '(one runs at a time)')
  else:
    memory = memories[0]
  kinds = {hlo.convolution_kinds(text) for text in texts} - {'none'}
  return {'xla_memory_per_device': memory,
          'collectives': {name: sum(c[name] for c in collectives) for name in collectives[0]},
          'convolutions': kinds.pop() if len(kinds) == 1 else ('mixed' if kinds else 'none')}


def _closure_value(fn, name: str):
  """A variable the library's step closes over (its per-block jitted programs).

  The block-wise steps are chains of K jitted per-block calls; their compiled
  programs (for memory and HLO) are only reachable through the chain's closure.
  """
  fn = getattr(fn, 'jitted', fn)
  value = inspect.getclosurevars(fn).nonlocals.get(name)
  if value is None:
    raise RuntimeError(f'{fn.__qualname__} no longer closes over {name!r}; update '
                       f'benchmarks/parallel_bench.py')
  return value


def _compile_block_chain(block_steps, states, batch, put=lambda k, x: x):
  """Compiles each block's jitted step on its real input and runs it once, in order.

  Returns (compiled programs, states after one step). Later calls of the same
  jitted functions reuse these compilations.
  """
  from bwbpf_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  x, targets = batch['image'], step_lib.loss_targets(batch)
  compiled, new_states = [], []
  for k, (block_step, state) in enumerate(zip(block_steps, states)):
    x, block_targets = put(k, x), put(k, targets)
    compiled.append(block_step.lower(state, x, block_targets).compile())
    state, x, _ = block_step(state, x, block_targets)
    new_states.append(state)
  return compiled, tuple(new_states)


def _process_fields(timing, cores) -> dict:
  return {'process': FLAGS.process_id, 'cores': cores,
          'median_step_seconds': timing.median_seconds,
          'cpu_per_wall': round(timing.cpu_per_wall, 3),
          'peak_rss_bytes': timing.peak_rss_bytes, 'load_avg_1m': timing.load_avg_1m}


def _split_worker() -> dict:
  """Balances the split points by timing units alone on the micro-batch, and two-block cuts."""
  import bwbpf_jax as bw  # pylint: disable=g-import-not-at-top
  from bwbpf_jax import parallel  # pylint: disable=g-import-not-at-top
  num_units = _network().num_units
  per_unit, tx, unit_states, batch = _experiment(tuple(range(1, num_units)))
  microbatch = parallel.split_microbatches(batch, FLAGS.microbatches)[0]
  unit_costs = parallel.per_block_step_times(per_unit, tx, unit_states, microbatch,
                                             repeats=FLAGS.unit_repeats)
  result = {'unit_seconds': [round(t, 5) for t in unit_costs]}
  if FLAGS.project:
    build = lambda **kw: bw.build_model(_network(), num_classes=10, **kw)
    result['projections'] = [_projection(build, unit_costs, int(k)) for k in FLAGS.project]
    return result
  split_points = parallel.balanced_split_points(unit_costs, FLAGS.num_blocks)
  # Units timed alone do not add up to the block they form (each had a head of its own,
  # and the kernels differ with the shapes around them): for two blocks, every cut is
  # timed as it would run and the one whose slower block is fastest wins.
  candidates = ([(p,) for p in range(1, num_units)] if FLAGS.num_blocks == 2
                else [tuple(split_points)])
  timed = {}
  for points in candidates:
    model, tx, states, _ = _experiment(points)
    timed[points] = parallel.per_block_step_times(model, tx, states, microbatch,
                                                  repeats=FLAGS.unit_repeats)
  split_points = min(timed, key=lambda points: (max(timed[points]), points))
  block_times = timed[split_points]
  result['cut_seconds'] = {','.join(map(str, points)): [round(t, 5) for t in times]
                           for points, times in timed.items()}
  return {**result, 'split_points': list(split_points),
          'block_seconds': [round(t, 5) for t in block_times],
          'projected_speedup': round(parallel.projected_pipeline_speedup(
              block_times, FLAGS.microbatches), 3)}


def _sync_worker(split_points, cores) -> dict:
  """The block-wise step on one core: fed M micro-batches in turn, and on the whole batch."""
  import jax  # pylint: disable=g-import-not-at-top
  import bwbpf_jax as bw  # pylint: disable=g-import-not-at-top
  from bwbpf_jax import parallel  # pylint: disable=g-import-not-at-top
  model, tx, states, batch = _experiment(split_points)
  batch = jax.device_put(batch)
  microbatches = parallel.split_microbatches(batch, FLAGS.microbatches)
  blockwise = bw.make_blockwise_train_step(model, tx)
  compiled, states = _compile_block_chain(_closure_value(blockwise, 'block_steps'), states,
                                          microbatches[0])

  def sync_step(states):
    for part in microbatches:
      states, _ = blockwise(states, part)
    return states

  timing, states = _time(sync_step, states)
  sync = {**_programs_fields(compiled, blockwise=True),
          'median_step_seconds': timing.median_seconds,
          'per_process': [_process_fields(timing, cores)]}
  compiled, states = _compile_block_chain(_closure_value(blockwise, 'block_steps'), states,
                                          batch)
  timing, _ = _time(lambda states: blockwise(states, batch)[0], states)
  full = {**_programs_fields(compiled, blockwise=True),
          'median_step_seconds': timing.median_seconds,
          'per_process': [_process_fields(timing, cores)]}
  return {'sync': sync, 'sync_full_batch': full}


def _all_cores_worker(config: str, split_points, cores) -> dict:
  """The fused step on the whole batch, one process on every core: a plain run of this machine."""
  import jax  # pylint: disable=g-import-not-at-top
  import bwbpf_jax as bw  # pylint: disable=g-import-not-at-top
  model, tx, states, batch = _experiment(split_points, mode=config.rsplit('_', 1)[1])
  batch = jax.device_put(batch)
  step = bw.make_train_step(model, tx)
  compiled = step.lower(states, batch).compile()
  timing, _ = _time(lambda states: step(states, batch)[0], states)
  return {**_programs_fields([compiled], blockwise=False),
          'median_step_seconds': timing.median_seconds,
          'per_process': [_process_fields(timing, cores)]}


def _distributed_worker(config: str, split_points, cores) -> dict:
  """One of P processes: joins the others, then times the `config` step over all of them."""
  import jax  # pylint: disable=g-import-not-at-top
  from bwbpf_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed(FLAGS.coordinator, FLAGS.processes, FLAGS.process_id,
                                  initialization_timeout=120)
  result = {}
  if config == 'blocks':
    model, tx, states, batch = _experiment(split_points)
    num_stages = FLAGS.pipeline_stages or FLAGS.num_blocks
    image = (FLAGS.image_size, FLAGS.image_size, 3)
    plan = parallel.make_stage_plan(model, tx, image, num_stages)
    mesh = parallel.make_pipeline_mesh(num_stages)
    pipeline = parallel.StagePipeline(model, tx, plan, mesh,
                                      num_microbatches=FLAGS.microbatches,
                                      global_batch_size=FLAGS.batch_size)
    index, count = parallel.process_feed_slice(mesh)
    local = FLAGS.batch_size // count
    carry = pipeline.init(states)
    sharded = pipeline.shard_batch({name: value[index * local:(index + 1) * local]
                                    for name, value in batch.items()})
    started = time.perf_counter()
    compiled = pipeline.step.lower(carry, sharded).compile()
    compile_seconds = time.perf_counter() - started
    timing, carry = _time(lambda state: pipeline.step(state, sharded)[0], carry)
    fields = _programs_fields([compiled], blockwise=False)
    steps_run = WARMUP_STEPS + FLAGS.steps
    result.update(
        mesh=dict(mesh.shape), stage_blocks=[list(b) for b in plan.stage_blocks],
        stage_state_bytes=[4 * p.size for p in plan.state_packings],
        activation_bytes_per_example=4 * plan.activation_length,
        bubble_fraction=round((num_stages - 1)
                              / (steps_run * FLAGS.microbatches + num_stages - 1), 4),
        steps_run=steps_run, compile_seconds=round(compile_seconds, 3))
  else:
    mode = 'bwbpf' if config == 'data_bwbpf' else 'bp'
    model, tx, states, batch = _experiment(split_points, mode=mode)
    mesh = parallel.make_mesh()
    local = FLAGS.batch_size // jax.process_count()
    sharded = parallel.shard_batch(
        {name: value[jax.process_index() * local:(jax.process_index() + 1) * local]
         for name, value in batch.items()}, mesh)
    states = parallel.replicate(states, mesh)
    if config == 'data_bwbpf':
      step = parallel.make_data_parallel_blockwise_train_step(model, tx, mesh)
      compiled, states = _compile_block_chain(_closure_value(step, 'block_steps'), states,
                                              sharded)
      fields = _programs_fields(compiled, blockwise=True)
    else:
      step = parallel.make_data_parallel_train_step(model, tx, mesh)
      fields = _programs_fields([step.jitted.lower(states, sharded).compile()],
                                blockwise=False)
    timing, states = _time(lambda states: step(states, sharded)[0], states)
    result['mesh'] = dict(mesh.shape)
  result.update(fields, median_step_seconds=timing.median_seconds,
                per_process=[_process_fields(timing, cores)])
  jax.distributed.shutdown()
  return result


def _host_dispatch_worker(split_points, cores) -> dict:
  """The earlier design, for comparison: one process, P fake devices, host-dispatched blocks.

  Self-contained, with benchmarks/host_dispatch.py, the program it times.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import host_dispatch  # pylint: disable=g-import-not-at-top
  from bwbpf_jax import parallel  # pylint: disable=g-import-not-at-top
  model, tx, states, batch = _experiment(split_points)
  devices = jax.devices()[:FLAGS.processes]
  step = host_dispatch.make_block_parallel_train_step(model, tx, devices,
                                                 num_microbatches=FLAGS.microbatches)
  block_devices = host_dispatch.placement(model, devices)
  states = host_dispatch.place_block_states(states, block_devices)
  microbatch = parallel.split_microbatches(batch, FLAGS.microbatches)[0]
  compiled, states = _compile_block_chain(
      _closure_value(step, 'block_steps'), states, microbatch,
      put=lambda k, x: jax.device_put(x, block_devices[k]))
  timing, _ = _time(lambda states: step(states, batch)[0], states)
  fields = _programs_fields(compiled, blockwise=True)
  if fields['xla_memory_per_device']:
    # Block k runs on device k mod P: a device needs its blocks' programs, not the sums.
    fields['xla_memory_per_device']['aggregation'] = (
        'block k runs on device k mod P; per_block gives each program; the sums are what '
        'one device would need for all blocks')
  return {**fields, 'median_step_seconds': timing.median_seconds,
          'bubble_fraction': round((FLAGS.num_blocks - 1)
                                   / (FLAGS.microbatches + FLAGS.num_blocks - 1), 4),
          'per_process': [_process_fields(timing, cores)]}


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


def _worker_main():
  cores = [int(c) for c in FLAGS.cores]
  if FLAGS.fail_process == FLAGS.process_id:
    raise SystemExit(f'error: process {FLAGS.process_id} failed on purpose (--fail_process)')
  num_devices = FLAGS.processes if FLAGS.worker == 'host_dispatch' else 1
  cores = _pin_and_configure(cores, num_devices,
                             eigen_threads=FLAGS.worker in ALL_CORES_CONFIGS)
  split_points = None if FLAGS.split_points is None else [int(p) for p in FLAGS.split_points]
  if FLAGS.worker in ('split', 'project'):
    result = _split_worker()
  elif FLAGS.worker == 'sync':
    result = _sync_worker(split_points, cores)
  elif FLAGS.worker == 'host_dispatch':
    result = _host_dispatch_worker(split_points, cores)
  elif FLAGS.worker in ALL_CORES_CONFIGS:
    result = _all_cores_worker(FLAGS.worker, split_points, cores)
  else:
    result = _distributed_worker(FLAGS.worker, split_points, cores)
  print(json.dumps(result), flush=True)


# ---------------------------------------------------------------- the driver


def _worker_argv(worker: str, cores, split_points=None, **extra) -> list:
  argv = [sys.executable, '-m', 'benchmarks.parallel_bench', f'--worker={worker}',
          f'--cores={",".join(map(str, cores))}']
  for name in _SHARED_FLAGS:
    value = getattr(FLAGS, name)
    if value is not None:
      argv.append(f'--{name}={",".join(value) if isinstance(value, list) else value}')
  if split_points is not None:
    argv.append(f'--split_points={",".join(str(p) for p in split_points)}')
  return argv + [f'--{name}={value}' for name, value in extra.items()]


def run_workers(argvs: list, timeout_s: float) -> list:
  """Runs worker processes together; returns each one's last JSON line, in order.

  Raises:
    WorkerFailure: naming the first worker that failed (the others are killed
      at once: one waiting for a dead peer in a collective would wait for ever).
  """
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory() as scratch:
    logs = processes.run([processes.Worker(argv) for argv in argvs], timeout_s, scratch,
                         cwd=repo)
    results = []
    for i, (out, err) in enumerate(logs):
      with open(out) as f:
        lines = [line for line in f if line.startswith('{')]
      if not lines:
        raise WorkerFailure(f'worker {i} printed no result: {processes.last_line(err)}')
      results.append(json.loads(lines[-1]))
    return results


def _config_line(config: str, measured: dict, split_points, sync_ips, sync_full_ips) -> dict:
  import jax  # pylint: disable=g-import-not-at-top  (the version only; JAX does no work here)
  processes = len(measured['per_process'])
  cores = sum(len(process['cores']) for process in measured['per_process'])
  images_per_sec = FLAGS.batch_size / measured.pop('median_step_seconds')
  line = {'config': config, 'arch': FLAGS.arch, 'width': FLAGS.width,
          'image_size': FLAGS.image_size, 'batch_size': FLAGS.batch_size,
          'microbatches': FLAGS.microbatches, 'num_blocks': FLAGS.num_blocks,
          'pipeline_stages': FLAGS.pipeline_stages or FLAGS.num_blocks,
          'processes': processes, 'cores': cores, 'split_points': split_points,
          'steps': FLAGS.steps,
          'images_per_sec': round(images_per_sec, 3)}
  if not config.startswith('sync'):
    speedup = images_per_sec / sync_ips if sync_ips else None
    line.update(speedup=speedup and round(speedup, 4),
                parallel_efficiency=speedup and round(speedup / cores, 4),
                speedup_over_sync_full_batch=(round(images_per_sec / sync_full_ips, 4)
                                              if sync_full_ips else None))
  collectives = measured.pop('collectives')
  ticks = FLAGS.microbatches if config == 'blocks' else 0
  line['collective_bytes'] = {
      'per_tick': collectives['in_loop_bytes'], 'per_step': collectives['outside_loop_bytes'],
      'total_per_step': ticks * collectives['in_loop_bytes']
                        + collectives['outside_loop_bytes'],
      'ticks_per_step': ticks, 'ops_per_tick': collectives['in_loop_ops'],
      'ops_per_step': collectives['outside_loop_ops']}
  line.update(measured)
  line['load_avg_1m'] = max(p['load_avg_1m'] for p in line['per_process'])
  line['jax'] = jax.__version__
  return line


def _run_config(config: str, split_points, cores: list) -> dict:
  """Measures one configuration in fresh processes; returns its measured fields."""
  if config == 'sync':
    (result,) = run_workers([_worker_argv('sync', cores[:1], split_points)], FLAGS.timeout_s)
    return result
  if config in ('host_dispatch',) + ALL_CORES_CONFIGS:
    (result,) = run_workers([_worker_argv(config, cores[:FLAGS.processes], split_points)],
                            FLAGS.timeout_s)
    return result
  port = processes.free_port()
  results = run_workers(
      [_worker_argv(config, [cores[i % len(cores)]], split_points, process_id=i,
                    coordinator=f'127.0.0.1:{port}') for i in range(FLAGS.processes)],
      FLAGS.timeout_s)
  merged = results[0]  # One SPMD program: the same memory and collectives on every device.
  merged['per_process'] = [r['per_process'][0] for r in results]
  merged['median_step_seconds'] = max(r['median_step_seconds'] for r in results)
  return merged


def main(argv):
  del argv
  if FLAGS.worker:
    _worker_main()
    return
  cores = sorted(os.sched_getaffinity(0))
  if FLAGS.project:
    (projected,) = run_workers([_worker_argv('project', cores[:1])], FLAGS.timeout_s)
    import jax  # pylint: disable=g-import-not-at-top
    print(json.dumps({
        'arch': FLAGS.arch, 'width': FLAGS.width, 'image_size': FLAGS.image_size,
        'microbatch_size': FLAGS.batch_size // FLAGS.microbatches,
        'microbatches': FLAGS.microbatches, **projected, 'jax': jax.__version__}), flush=True)
    return
  unknown = set(FLAGS.configs) - set(CONFIGS)
  if unknown:
    raise app.UsageError(f'unknown --configs {sorted(unknown)}; choose from {CONFIGS}')
  num_stages = FLAGS.pipeline_stages or FLAGS.num_blocks
  if 'blocks' in FLAGS.configs and FLAGS.processes % num_stages:
    raise app.UsageError(f'--processes={FLAGS.processes} is not a multiple of the '
                         f'{num_stages} pipeline stages')
  if FLAGS.processes > len(cores):
    print(f'warning: {FLAGS.processes} processes share {len(cores)} cores: speed-ups '
          f'measure sharing, not parallelism', file=sys.stderr)
  failures, split = 0, {}
  if FLAGS.split_points is not None:
    split_points = [int(p) for p in FLAGS.split_points]
  else:
    try:
      (split,) = run_workers([_worker_argv('split', cores[:1])], FLAGS.timeout_s)
    except WorkerFailure as failure:
      print(f'error: split-point balancing failed: {failure}', file=sys.stderr)
      sys.exit(1)
    split_points = split.pop('split_points')
  sync_ips = sync_full_ips = None
  for config in [c for c in CONFIGS if c in FLAGS.configs]:
    try:
      measured = _run_config(config, split_points, cores)
    except WorkerFailure as failure:
      print(f'error: configuration {config} failed: {failure}', file=sys.stderr, flush=True)
      failures += 1
      continue
    if config == 'sync':
      lines = [_config_line('sync', {**measured['sync'], **split}, split_points, None, None),
               _config_line('sync_full_batch', measured['sync_full_batch'], split_points,
                            None, None)]
      sync_ips, sync_full_ips = (line['images_per_sec'] for line in lines)
    else:
      lines = [_config_line(config, measured, split_points, sync_ips, sync_full_ips)]
    for line in lines:
      print(json.dumps(harness.warn_if_loaded(line)), flush=True)
  sys.exit(1 if failures else 0)


if __name__ == '__main__':
  command_line.run(main)
