r"""Tabulates finished runs: one markdown row per configuration, means over seeds.

    python -m experiments.summarize runs            # every results.json under runs/, any depth
    python -m experiments.summarize runs/a runs/b/seed*

Reads every results.json found at any depth under the folders given (or the
files themselves). Runs that differ only in --seed share a row, which reports
the mean and the per-run values of the output head's test error, and per-run
wall time and throughput (which depend on how busy the machine was). Runs that
differ in any other setting (--parallel, --auglocal_depth, --split_by, --remat,
...) get rows of their own.

What a row shows is what ran, read from results.json rather than from the
flags: K is the number of blocks that trained, the length column is the steps
of a --max_steps (or --stop_at_step) run and the epochs otherwise, and the seeds
column lists each run's seed, so two runs of one seed read `0, 0` (or
`0 (2 identical runs)` when their parameters are bitwise equal), never as two
seeds. Percentages of FLOPs keep two significant digits in every row.

Exit codes: 0 a table printed (also --help), 2 no results.json found.
"""

import argparse
import collections
import json
import os
import sys

import numpy as np

from . import config as config_lib

RESULTS_FILE = 'results.json'
# Fields that change nothing the run computes; every other config field separates rows.
_NOT_COMPUTED = ('seed', 'data_dir')


def _config(run) -> dict:
  """The run's full config, with today's defaults for fields an older results.json lacks."""
  return config_lib.config_from_json(json.dumps(run['config'])).to_dict()


def _seed_free(run) -> tuple:
  config = _config(run)
  config['num_blocks'] = num_blocks(run)  # What trained, also for runs from before the check.
  return tuple((k, json.dumps(v)) for k, v in sorted(config.items()) if k not in _NOT_COMPUTED)


def find_results(paths) -> list:
  """Every results.json under `paths` (folders searched at any depth, or the files), sorted."""
  found = set()
  for path in paths:
    if os.path.isfile(path) and os.path.basename(path) == RESULTS_FILE:
      found.add(os.path.realpath(path))
    for parent, folders, files in os.walk(path):
      folders[:] = sorted(name for name in folders if not name.startswith('.'))
      if RESULTS_FILE in files:
        found.add(os.path.realpath(os.path.join(parent, RESULTS_FILE)))
  return sorted(found)


def load(paths) -> list:
  """The results of every run under `paths`, each read once however it was reached."""
  runs = []
  for path in find_results(paths):
    with open(path) as f:
      runs.append(json.load(f))
  return runs


def num_blocks(run) -> int:
  """K that trained: from the split points the model used, not the --num_blocks flag."""
  if run.get('num_blocks') is not None:
    return run['num_blocks']
  if run.get('split_points') is not None:
    return len(run['split_points']) + 1
  return run['config']['num_blocks']


def _length(run) -> str:
  """'3 steps' for a run cut short or sized in steps, else its epochs."""
  config = run['config']
  steps = run.get('steps')
  if config.get('max_steps') is not None or config.get('stop_at_step') is not None:
    return f'{steps if steps is not None else config.get("max_steps")} steps'
  epochs = run.get('epochs_completed', config['epochs'])
  return f'{epochs:g} epochs'


def _engine(run) -> str:
  """'1 device', 'data x8', or 'blocks x2, M=4': how the run was placed on devices."""
  name = run.get('parallel', 'none')
  if name == 'none':
    return '1 device'
  text = f'{name} x{run.get("num_devices", 1)}'
  return text + f', M={run["config"]["microbatches"]}' if name == 'blocks' else text


def percent(value: float) -> str:
  """A percentage with two significant digits: 0.034, 2.4, 32, 329."""
  if value == 0:
    return '0'
  if abs(value) >= 10:
    return f'{value:.0f}'
  return f'{float(f"{value:.2g}"):g}'


def _seeds(group) -> str:
  """Each run's seed; repeats of one seed are named as such, not counted as seeds."""
  by_seed = collections.OrderedDict()
  for run in group:
    by_seed.setdefault(run['config']['seed'], []).append(run)
  parts = []
  for seed, runs in by_seed.items():
    digests = {run.get('params_digest') for run in runs}
    if len(runs) > 1 and len(digests) == 1 and None not in digests:
      parts.append(f'{seed} ({len(runs)} identical runs)')
    else:
      parts.extend([str(seed)] * len(runs))
  return ', '.join(parts)


def table(runs) -> str:
  """One markdown row per configuration (seeds pooled), per-run values in brackets."""
  groups = collections.OrderedDict()
  for run in sorted(runs, key=lambda r: (tuple(map(str, _seed_free(r))), _engine(r),
                                         r['config']['seed'])):
    groups.setdefault((_seed_free(run), _engine(run), _length(run)), []).append(run)
  lines = ['| dataset | arch | mode | K | head | length | batch | engine | seeds '
           '| test error % (mean; per run) | every head\'s test acc % (mean over runs) '
           '| wall time s (per run) | train img/s (per run) |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for (_, engine, length), group in groups.items():
    config = _config(group[0])
    errors = [100 * (1 - r['test_accuracy']) for r in group]
    heads = np.mean([r['block_test_accuracy'] for r in group], axis=0) * 100
    per_run = lambda name, fmt: ', '.join('-' if r.get(name) is None else fmt.format(r[name])
                                          for r in group)
    head = config['aux_head'] + ('' if config['auglocal_depth'] == 2 or
                                 config['aux_head'] != 'auglocal' else
                                 f' depth {config["auglocal_depth"]}')
    head += '' if config['local_loss'] == 'xent' else f', {config["local_loss"]}'
    blocks = str(num_blocks(group[0])) + ('' if config['split_by'] == 'stages' else
                                          f' (by {config["split_by"]})')
    if group[0].get('aux_flop_fraction') is not None:
      head += f' ({percent(100 * group[0]["aux_flop_fraction"])}% FLOPs)'
    lines.append(
        f'| {config["dataset"]} | {config["arch"]} x{config["width"]} | {config["mode"]} | '
        f'{blocks} | {head} | {length} | {config["batch_size"]} | {engine} | '
        f'{_seeds(group)} | '
        f'{np.mean(errors):.2f} ({", ".join(f"{e:.2f}" for e in errors)}) | '
        f'{" / ".join(f"{h:.1f}" for h in heads)} | {per_run("wall_time_s", "{:.0f}")} | '
        f'{per_run("images_per_sec", "{:.0f}")} |')
  return '\n'.join(lines)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m experiments.summarize',
      description='A markdown table of finished runs: one row per configuration, seeds '
                  'pooled. Reads every results.json at any depth under the folders given.',
      epilog='Exit codes: 0 a table printed, 2 no results.json found (or a bad argument).')
  parser.add_argument('paths', nargs='+', metavar='FOLDER',
                      help='run folders, or folders holding them at any depth (e.g. runs)')
  return parser


def main(argv) -> int:
  args = _parser().parse_args(argv[1:])  # --help exits 0, a bad argument 2.
  runs = load(args.paths)
  if not runs:
    print(f'error: no {RESULTS_FILE} at any depth under {", ".join(args.paths)}',
          file=sys.stderr)
    return 2
  print(table(runs))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
