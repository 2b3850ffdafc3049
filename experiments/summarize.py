r"""Tabulates finished runs: one markdown row per workdir, means over seeds.

    python -m experiments.summarize runs/*

Reads each workdir's results.json; runs that differ only in --seed share a row,
which reports the mean and the per-seed values of the output head's test error,
and per-seed wall time and throughput (which depend on how busy the machine was).
Runs placed differently on devices (--parallel) get rows of their own.
"""

import collections
import json
import os
import sys

import numpy as np

_SEED_FREE = ('dataset', 'arch', 'width', 'mode', 'num_blocks', 'aux_head', 'local_loss', 'epochs',
              'batch_size', 'lr')
_DEFAULTS = {'local_loss': 'xent'}  # Fields that results.json of older runs lack.


def _seed_free(run) -> tuple:
  return tuple(run['config'].get(k, _DEFAULTS.get(k)) for k in _SEED_FREE)


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
  for (key, engine), group in groups.items():
    config = dict(zip(_SEED_FREE, key))
    errors = [100 * (1 - r['test_accuracy']) for r in group]
    heads = np.mean([r['block_test_accuracy'] for r in group], axis=0) * 100
    per_seed = lambda name, fmt: ', '.join(fmt.format(r[name]) for r in group)
    head = config['aux_head'] + ('' if config['local_loss'] == 'xent' else
                                 f', {config["local_loss"]}')
    if group[0].get('aux_flop_fraction') is not None:
      head += f' ({100 * group[0]["aux_flop_fraction"]:.1f}% FLOPs)'
    lines.append(
        f'| {config["dataset"]} | {config["arch"]} x{config["width"]} | {config["mode"]} | '
        f'{config["num_blocks"]} | {head} | {config["epochs"]} | '
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
