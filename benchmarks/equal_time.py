r"""Test accuracy at an equal wall-clock budget: which way to use P cores trains best.

    python -m benchmarks.equal_time --data_dir=DIR --arch=resnet18 --width=0.25 \
        --num_blocks=2 --split_points=3 --budget_seconds=240

Images per second (benchmarks/parallel_bench.py) do not say which run a user
should choose: the stage pipeline makes M small updates per batch where the
other runs make one, and data parallelism trains backprop, which learns more
per update than isolated blocks. This program asks the question a user has,
on this machine: given P cores and a training-time budget, which run ends with
the best test accuracy?

Each configuration is the project's own command line, `experiments.main`,
started in fresh processes pinned to their cores (CPU affinity set before
JAX starts, as parallel_bench's workers are):

- `bwbpf_one_core`: the plain bwbpf run (fused step, whole batch) on 1 core.
- `bwbpf_all_cores` / `bp_all_cores`: the plain run in one process pinned to
  all P cores (XLA's and oneDNN's threads spread each kernel over them), bwbpf
  and backprop: what a user runs without any parallelism.
- `blocks`: `--parallel=blocks` on P processes of one core each, joined by
  `jax.distributed` on 127.0.0.1 (K blocks in --pipeline_stages stages,
  default P; M = --microbatches).
- `data_bwbpf` / `data_bp`: `--parallel=data` on the same P processes.

Every configuration runs twice. A calibration run (`--stop_at_step`, the
first --calibration_steps steps of a long schedule) measures its training
images/s (compilation and evaluation excluded, as every engine reports it);
the measured run then gets `--max_steps` = budget x images/s / batch, so its
cosine schedule ends when the budget does. Its own images/s decides the
training time it really took (`train_seconds`, printed beside the budget).

One JSON line per configuration: `images_per_sec` (calibration and measured
run), `steps`, `epochs`, `train_seconds`, `wall_seconds` (the whole command:
start-up, compilation, evaluation included), `test_accuracy` (output head)
and every block's, and the measured run's workdir. Runs go one after another;
nothing else should run on the machine meanwhile.
"""

import dataclasses
import json
import os
import sys
import tempfile
import time

from absl import flags

from benchmarks import command_line
from benchmarks import harness
from benchmarks import processes

FLAGS = flags.FLAGS
# name: (spans the P processes, pinned to all P cores, mode, --parallel). A configuration
# that spans processes gives each one core; one that does not is a single process on
# one core or, pinned to all, on every core.
_LAYOUTS = {
    'bwbpf_one_core': (False, False, 'bwbpf', 'none'),
    'bwbpf_all_cores': (False, True, 'bwbpf', 'none'),
    'bp_all_cores': (False, True, 'bp', 'none'),
    'blocks': (True, False, 'bwbpf', 'blocks'),
    'data_bwbpf': (True, False, 'bwbpf', 'data'),
    'data_bp': (True, False, 'bp', 'data'),
}
CONFIGS = tuple(_LAYOUTS)


@dataclasses.dataclass(frozen=True)
class Configuration:
  """How a configuration runs: its processes, each one's cores, and its own flags."""
  name: str
  processes: int
  cores_per_process: int
  flags: tuple


def configuration(name: str, num_processes: int) -> Configuration:
  """The named configuration for P = `num_processes` cores."""
  if name not in _LAYOUTS:
    raise ValueError(f'unknown configuration {name!r}; choose from {", ".join(CONFIGS)}')
  spans_processes, all_cores, mode, parallel = _LAYOUTS[name]
  return Configuration(name, num_processes if spans_processes else 1,
                       num_processes if all_cores else 1,
                       (f'--mode={mode}', f'--parallel={parallel}'))


def steps_for_budget(budget_seconds: float, images_per_sec: float, batch_size: int) -> int:
  """Steps of `batch_size` images that `images_per_sec` trains in `budget_seconds` (>= 1)."""
  return max(1, int(budget_seconds * images_per_sec / batch_size))


def workers(config: Configuration, run_flags: list, workdir: str, port: int, cores: list, *,
            microbatches: int = 4, pipeline_stages=None) -> list:
  """The processes of one run: `experiments.main`, each pinned to its share of `cores`."""
  argv = [sys.executable, '-m', 'experiments.main', *config.flags, *run_flags,
          f'--workdir={workdir}', '--overwrite', '--progress_seconds=60']
  if config.name == 'blocks':
    argv.append(f'--microbatches={microbatches}')
    if pipeline_stages:
      argv.append(f'--pipeline_stages={pipeline_stages}')
  # oneDNN's OpenMP team sized to the process's cores (it would otherwise size it
  # from the machine); XLA sizes its own pools from the affinity.
  env = {'OMP_NUM_THREADS': str(config.cores_per_process)}
  if config.processes == 1:
    return [processes.Worker(argv, cores=cores[:config.cores_per_process], env=env)]
  distributed = [f'--num_processes={config.processes}',
                 f'--coordinator_address=127.0.0.1:{port}']
  return [processes.Worker(argv + distributed + [f'--process_id={i}'],
                           cores=cores[i * config.cores_per_process:
                                       (i + 1) * config.cores_per_process], env=env)
          for i in range(config.processes)]


def _common_flags() -> list:
  common = [f'--dataset={FLAGS.dataset}', f'--arch={FLAGS.arch}', f'--width={FLAGS.width}',
            f'--batch_size={FLAGS.batch_size}', f'--num_blocks={FLAGS.num_blocks}']
  if FLAGS.data_dir:
    common.append(f'--data_dir={FLAGS.data_dir}')
  if FLAGS.split_points:
    common.append(f'--split_points={",".join(FLAGS.split_points)}')
  return common + list(FLAGS.train_flags)


def _run(config: Configuration, run_flags: list, workdir: str) -> tuple:
  """Runs `experiments.main` once; returns (results.json, wall seconds)."""
  os.makedirs(workdir, exist_ok=True)
  start = time.monotonic()
  cores = sorted(os.sched_getaffinity(0))
  processes.run(workers(config, run_flags, workdir, processes.free_port(), cores,
                        microbatches=FLAGS.microbatches, pipeline_stages=FLAGS.pipeline_stages),
                FLAGS.timeout_s,
                log_dir=workdir, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f), time.monotonic() - start


def measure(config: Configuration, root: str) -> dict:
  """Calibrates, then trains for the budget; returns the configuration's line."""
  common = _common_flags()
  # The calibration's schedule only needs to outlast its steps.
  calibration, _ = _run(config, common + [
      f'--max_steps={10 * FLAGS.calibration_steps}',
      f'--stop_at_step={FLAGS.calibration_steps}'], os.path.join(root, config.name, 'calibration'))
  steps = steps_for_budget(FLAGS.budget_seconds, calibration['images_per_sec'],
                           FLAGS.batch_size)
  workdir = os.path.join(root, config.name, 'run')
  results, wall_seconds = _run(config, common + [f'--max_steps={steps}'], workdir)
  return {
      'config': config.name, 'processes': config.processes,
      'cores': config.processes * config.cores_per_process,
      'arch': FLAGS.arch, 'width': FLAGS.width, 'batch_size': FLAGS.batch_size,
      'num_blocks': results['num_blocks'], 'split_points': results['split_points'],
      'mesh': results['mesh'],
      'microbatches': results['config']['microbatches'] if config.name == 'blocks' else None,
      'budget_seconds': FLAGS.budget_seconds,
      'calibration_images_per_sec': calibration['images_per_sec'],
      'images_per_sec': round(results['images_per_sec'], 2),
      'steps': results['steps'], 'epochs': round(results['epochs_completed'], 3),
      'train_seconds': round(results['steps'] * FLAGS.batch_size / results['images_per_sec'], 1),
      'wall_seconds': round(wall_seconds, 1),
      'test_accuracy': round(results['test_accuracy'], 4),
      'block_test_accuracy': [round(a, 4) for a in results['block_test_accuracy']],
      'workdir': workdir if FLAGS.workdir else None,
  }


_usage_error = command_line.usage_error


def main(argv):
  del argv  # command_line.run refuses extra arguments.
  try:
    chosen = [configuration(name, FLAGS.processes) for name in FLAGS.configs]
  except ValueError as error:
    _usage_error(str(error))
  cores = len(os.sched_getaffinity(0))
  if FLAGS.processes > cores:
    _usage_error(f'--processes={FLAGS.processes} needs as many cores; this process may use '
                 f'{cores}')
  if not FLAGS.budget_seconds > 0:
    _usage_error(f'--budget_seconds must be positive, got {FLAGS.budget_seconds}')
  failures = 0
  with tempfile.TemporaryDirectory() as scratch:
    root = FLAGS.workdir or scratch
    for config in chosen:
      try:
        line = measure(config, root)
      except processes.WorkerFailure as failure:
        print(f'error: configuration {config.name} failed: {failure}', file=sys.stderr,
              flush=True)
        failures += 1
        continue
      line['load_avg_1m'] = os.getloadavg()[0]
      print(json.dumps(harness.warn_if_loaded(line)), flush=True)
  sys.exit(1 if failures else 0)


def define_flags():
  """The command's flags, defined when it runs (tests import this module beside other
  benchmarks that define flags of the same names)."""
  flags.DEFINE_string('data_dir', None, 'Image folder (or tfds data_dir) of the dataset.')
  flags.DEFINE_string('dataset', 'imagefolder', 'experiments.main --dataset.')
  flags.DEFINE_string('arch', 'resnet18', 'Architecture.')
  flags.DEFINE_float('width', 0.25, 'Channel multiplier.')
  flags.DEFINE_integer('batch_size', 128, 'Global batch size.')
  flags.DEFINE_integer('num_blocks', 2, 'K (every configuration; bp trains probes on K-1 cuts).')
  flags.DEFINE_list('split_points', None, 'K-1 split points (default: the library\'s).')
  flags.DEFINE_integer('processes', 2, 'P: processes of the parallel configurations, and '
                       'the cores of the all-cores ones.')
  flags.DEFINE_integer('pipeline_stages', None, 'Stages of `blocks` (default P).')
  flags.DEFINE_integer('microbatches', 4, 'M of `blocks`.')
  flags.DEFINE_float('budget_seconds', 240, 'Training seconds each configuration gets.')
  flags.DEFINE_integer('calibration_steps', 50, 'Steps of the calibration run (20 misjudged '
                       'some runs\' speed by up to 30%: docs/results.md).')
  flags.DEFINE_list('configs', list(CONFIGS), f'Configurations to run, of {", ".join(CONFIGS)}.')
  flags.DEFINE_list('train_flags', [], 'More experiments.main flags for every run, e.g. '
                    '--train_flags=--lr=0.05,--seed=1.')
  flags.DEFINE_string('workdir', None, 'Folder for the runs (default: a temporary one, deleted).')
  flags.DEFINE_integer('timeout_s', 3600, 'Wall seconds one run may take.')

if __name__ == '__main__':
  define_flags()
  command_line.run(main)
