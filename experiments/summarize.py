r"""Tabulates finished runs: one markdown row per workdir, means over seeds.

    python -m experiments.summarize runs/*

Reads each workdir's results.json; runs that differ only in --seed share a row,
which reports the mean and the per-seed values of the output head's test error.
"""

import collections
import json
import os
import sys

import numpy as np

_SEED_FREE = ('dataset', 'arch', 'width', 'mode', 'num_blocks', 'aux_head', 'epochs', 'batch_size',
              'lr')


def load(workdirs):
  runs = []
  for workdir in workdirs:
    path = os.path.join(workdir, 'results.json')
    if os.path.exists(path):
      with open(path) as f:
        runs.append(json.load(f))
  return runs


def table(runs) -> str:
  groups = collections.OrderedDict()
  for run in sorted(runs, key=lambda r: tuple(str(r['config'][k]) for k in _SEED_FREE)):
    groups.setdefault(tuple(run['config'][k] for k in _SEED_FREE), []).append(run)
  lines = ['| dataset | arch | mode | K | head | epochs | test error % (mean; per seed) | every head\'s test acc % '
           '(mean over seeds) | wall time s (mean) | train img/s (mean) |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for key, group in groups.items():
    config = dict(zip(_SEED_FREE, key))
    errors = [100 * (1 - r['test_accuracy']) for r in group]
    heads = np.mean([r['block_test_accuracy'] for r in group], axis=0) * 100
    lines.append(
        f'| {config["dataset"]} | {config["arch"]} x{config["width"]} | {config["mode"]} | '
        f'{config["num_blocks"]} | {config["aux_head"]} | {config["epochs"]} | {np.mean(errors):.2f} ({", ".join(f"{e:.2f}" for e in errors)}) | '
        f'{" / ".join(f"{h:.1f}" for h in heads)} | '
        f'{np.mean([r["wall_time_s"] for r in group]):.0f} | '
        f'{np.mean([r["images_per_sec"] for r in group]):.0f} |')
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
