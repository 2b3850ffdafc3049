r"""Tabulates finished runs: one markdown row per workdir, means over seeds.

    python -m experiments.summarize runs/*

Reads each workdir's results.json; runs that differ only in --seed share a row,
which reports the mean and the per-seed values of the output head's test error,
and per-seed wall time and throughput (which depend on how busy the machine was).
Runs that differ in any other setting (--parallel, --auglocal_depth, --split_by,
--remat, ...) get rows of their own.
"""

import collections
import json
import os
import sys

import numpy as np

from experiments import config as config_lib

# Fields that change nothing the run computes; every other config field separates rows.
_NOT_COMPUTED = ('seed', 'data_dir')


def _config(run) -> dict:
  """The run's full config, with today's defaults for fields an older results.json lacks."""
  return config_lib.config_from_json(json.dumps(run['config'])).to_dict()


def _seed_free(run) -> tuple:
  return tuple((k, json.dumps(v)) for k, v in sorted(_config(run).items())
               if k not in _NOT_COMPUTED)


def load(workdirs):
  runs = []
  for workdir in workdirs:
    path = os.path.join(workdir, 'results.json')
    if os.path.exists(path):
      with open(path) as f:
        runs.append(json.load(f))
  return runs


def _engine(run) -> str:
  """'none', 'data x8', or 'blocks x2, M=4': how the run was placed on devices."""
  name = run.get('parallel', 'none')
  if name == 'none':
    return name
  text = f'{name} x{run.get("num_devices", 1)}'
  return text + f', M={run["config"]["microbatches"]}' if name == 'blocks' else text


def table(runs) -> str:
  """One markdown row per configuration (seeds pooled), per-seed values in brackets."""
  groups = collections.OrderedDict()
  for run in sorted(runs, key=lambda r: (tuple(map(str, _seed_free(r))), _engine(r),
                                         r['config']['seed'])):
    groups.setdefault((_seed_free(run), _engine(run)), []).append(run)
  lines = ['| dataset | arch | mode | K | head | epochs | batch | engine | test error % (mean; per seed) '
           '| every head\'s test acc % (mean over seeds) | wall time s (per seed) '
           '| train img/s (per seed) |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for (_, engine), group in groups.items():
    config = _config(group[0])
    errors = [100 * (1 - r['test_accuracy']) for r in group]
    heads = np.mean([r['block_test_accuracy'] for r in group], axis=0) * 100
    per_seed = lambda name, fmt: ', '.join(fmt.format(r[name]) for r in group)
    head = config['aux_head'] + ('' if config['auglocal_depth'] == 2 or
                                 config['aux_head'] != 'auglocal' else
                                 f' depth {config["auglocal_depth"]}')
    head += '' if config['local_loss'] == 'xent' else f', {config["local_loss"]}'
    blocks = str(config['num_blocks']) + ('' if config['split_by'] == 'stages' else
                                          f' (by {config["split_by"]})')
    if group[0].get('aux_flop_fraction') is not None:
      head += f' ({100 * group[0]["aux_flop_fraction"]:.1f}% FLOPs)'
    lines.append(
        f'| {config["dataset"]} | {config["arch"]} x{config["width"]} | {config["mode"]} | '
        f'{blocks} | {head} | {config["epochs"]} | '
        f'{config["batch_size"]} | {engine} | '
        f'{np.mean(errors):.2f} ({", ".join(f"{e:.2f}" for e in errors)}) | '
        f'{" / ".join(f"{h:.1f}" for h in heads)} | {per_seed("wall_time_s", "{:.0f}")} | '
        f'{per_seed("images_per_sec", "{:.0f}")} |')
  return '\n'.join(lines)


def main(argv):
  runs = load(argv[1:])
  if not runs:
    print('error: no results.json under the given folders', file=sys.stderr)
    return 2
  print(table(runs))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
