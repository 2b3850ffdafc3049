r"""Tabulates finished runs: one row per configuration, means over seeds.

    python -m experiments.summarize runs            # every results.json under runs/, any depth
    python -m experiments.summarize runs/a runs/b/seed*
    python -m experiments.summarize --format=csv runs > runs.csv     # or json, for plotting

Reads every results.json found at any depth under the folders given (or the
files themselves). Runs share a row only when everything that decides their
result is equal but the seed: every config field (but --eval_every and
--log_every, which change nothing computed), the placement and the data. The
data is results.json's 'data' (the dataset, its resolved folder, class names
and image counts; older results: the dataset and --data_dir), so runs of two
image folders never pool, whatever their flags. A row reports the mean and the
per-run values of the output head's test error, and per-run wall time and
throughput (which depend on how busy the machine was).

What a row shows is what ran, read from results.json rather than from the
flags: K is the number of blocks that trained, the length column is the steps
of a --max_steps (or --stop_at_step) run and the epochs otherwise, and the seeds
column lists each run's seed, so two runs of one seed read `0, 0` (or
`0 (2 identical runs)` when their parameters are bitwise equal), never as two
seeds. Beyond the fixed columns, a 'data' column and one column per setting
(lr, optimizer, ...) appear when they differ between rows. Percentages of
FLOPs keep two significant digits in every row. --format=csv and =json give the
same rows with numbers as numbers (lists: one value per run, or per block).

Exit codes: 0 a table printed (also --help), 2 no results.json found.
"""

import argparse
import collections
import csv
import io
import json
import os
import sys

import numpy as np

from . import config as config_lib

RESULTS_FILE = 'results.json'
# Config fields that do not separate rows: the seed (pooled), what changes nothing the run
# computes, and the data folder (results.json's 'data', the dataset's identity, does).
_NOT_COMPUTED = ('seed', 'data_dir', 'eval_every', 'log_every')
# Config fields the fixed columns show; any other field that differs gets a column.
_SHOWN = ('dataset', 'arch', 'width', 'mode', 'num_blocks', 'split_by', 'aux_head',
          'auglocal_depth', 'local_loss', 'batch_size', 'microbatches')
# rows()' keys that the markdown table shows in columns of their own.
_MARKDOWN = ('dataset', 'data', 'arch', 'mode', 'K', 'head', 'length', 'batch', 'engine')
_RUN_VALUES = ('seeds', 'seeds_text', 'test_error_pct_mean', 'test_error_pct',
               'head_test_acc_pct_mean', 'wall_time_s', 'images_per_sec')


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


def _data_key(run) -> str:
  """The data a run used, as results.json records it (older results: the dataset and folder)."""
  if run.get('data') is not None:
    return json.dumps(run['data'], sort_keys=True)
  config = run['config']
  folder = config.get('data_dir') and os.path.normpath(os.path.expanduser(config['data_dir']))
  return json.dumps({'name': config['dataset'], 'data_dir': folder or None}, sort_keys=True)


def _describe_data(key: str, full_path: bool = False) -> str:
  """'cats (2 classes, 8 / 4 images)': the folder and what the run found in it."""
  data = json.loads(key)
  folder = data.get('data_dir')
  text = (folder if full_path else os.path.basename(folder)) if folder else data['name']
  if data.get('num_classes') is not None:
    text += (f' ({data["num_classes"]} classes, {data["train_images"]} / '
             f'{data["test_images"]} images)')
  return text


def _value(value) -> str:
  if value is None:
    return '-'
  if isinstance(value, (list, tuple)):
    return ','.join(map(str, value))
  return f'{value:g}' if isinstance(value, float) else str(value)


def _groups(runs) -> list:
  """Runs that computed the same thing on the same data, seeds pooled: a list of lists."""
  groups = collections.OrderedDict()
  for run in sorted(runs, key=lambda r: (tuple(map(str, _seed_free(r))), _data_key(r),
                                         _engine(r), r['config']['seed'])):
    key = (_seed_free(run), _data_key(run), _engine(run), _length(run))
    groups.setdefault(key, []).append(run)
  return list(groups.values())


def rows(runs) -> list:
  """One dict per configuration, columns in table order: what a row shows, as plain values.

  Lists hold one value per run (seeds, test errors, wall times, images/s) or per
  block (head accuracies). A 'data' key and one key per other setting appear only
  when they differ between rows.
  """
  groups = _groups(runs)
  data_keys = [_data_key(group[0]) for group in groups]
  show_data = len(set(data_keys)) > 1
  full_path = len({_describe_data(k) for k in set(data_keys)}) < len(set(data_keys))
  configs = [_config(group[0]) for group in groups]
  differing = [name for name in config_lib.FIELD_NAMES
               if name not in _NOT_COMPUTED + _SHOWN
               and len({json.dumps(config[name]) for config in configs}) > 1]
  records = []
  for group, config, data_key in zip(groups, configs, data_keys):
    errors = [100 * (1 - r['test_accuracy']) for r in group]
    head = config['aux_head'] + ('' if config['auglocal_depth'] == 2 or
                                 config['aux_head'] != 'auglocal' else
                                 f' depth {config["auglocal_depth"]}')
    head += '' if config['local_loss'] == 'xent' else f', {config["local_loss"]}'
    blocks = str(num_blocks(group[0])) + ('' if config['split_by'] == 'stages' else
                                          f' (by {config["split_by"]})')
    if group[0].get('aux_flop_fraction') is not None:
      head += f' ({percent(100 * group[0]["aux_flop_fraction"])}% FLOPs)'
    record = {'dataset': config['dataset']}
    if show_data:
      record['data'] = _describe_data(data_key, full_path)
    record.update({
        'arch': f'{config["arch"]} x{config["width"]:g}', 'mode': config['mode'], 'K': blocks,
        'head': head, 'length': _length(group[0]), 'batch': config['batch_size'],
        'engine': _engine(group[0])})
    record.update({name: config[name] for name in differing})
    record.update({
        'seeds': [r['config']['seed'] for r in group],
        'seeds_text': _seeds(group),
        'test_error_pct_mean': float(np.mean(errors)),
        'test_error_pct': errors,
        'head_test_acc_pct_mean': [float(h) for h in np.mean(
            [r['block_test_accuracy'] for r in group], axis=0) * 100],
        'wall_time_s': [r.get('wall_time_s') for r in group],
        'images_per_sec': [r.get('images_per_sec') for r in group]})
    records.append(record)
  return records


def table(runs) -> str:
  """One markdown row per configuration (seeds pooled), per-run values in brackets."""
  records = rows(runs)
  settings = [key for key in (records[0] if records else {})
              if key not in _MARKDOWN and key not in _RUN_VALUES]
  columns = ['dataset', *(['data'] if records and 'data' in records[0] else []), 'arch',
             'mode', 'K', 'head', 'length', 'batch', 'engine', *settings]
  headers = [*columns, 'seeds',
             'test error % (mean; per run)', 'every head\'s test acc % (mean over runs)',
             'wall time s (per run)', 'train img/s (per run)']
  per_run = lambda values, fmt: ', '.join('-' if v is None else fmt.format(v) for v in values)
  lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
  for record in records:
    cells = [_value(record[name]) for name in columns] + [
        record['seeds_text'],
        f'{record["test_error_pct_mean"]:.2f} '
        f'({", ".join(f"{e:.2f}" for e in record["test_error_pct"])})',
        ' / '.join(f'{h:.1f}' for h in record['head_test_acc_pct_mean']),
        per_run(record['wall_time_s'], '{:.0f}'), per_run(record['images_per_sec'], '{:.0f}')]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def as_csv(runs) -> str:
  """rows() as CSV: one line per configuration; a list's values are separated by spaces."""
  records = [{key: value for key, value in record.items() if key != 'seeds_text'}
             for record in rows(runs)]
  out = io.StringIO()
  if records:
    writer = csv.DictWriter(out, fieldnames=list(records[0]), lineterminator='\n')
    writer.writeheader()
    for record in records:
      writer.writerow({key: ' '.join('' if v is None else str(v) for v in value)
                       if isinstance(value, list) else ('' if value is None else value)
                       for key, value in record.items()})
  return out.getvalue().rstrip('\n')


def as_json(runs) -> str:
  """rows() as a JSON list, one object per configuration."""
  return json.dumps([{key: value for key, value in record.items() if key != 'seeds_text'}
                     for record in rows(runs)], indent=1)


FORMATS = {'markdown': table, 'csv': as_csv, 'json': as_json}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m experiments.summarize',
      description='A table of finished runs: one row per configuration, seeds '
                  'pooled. Reads every results.json at any depth under the folders given.',
      epilog='Exit codes: 0 a table printed, 2 no results.json found (or a bad argument).')
  parser.add_argument('paths', nargs='+', metavar='FOLDER',
                      help='run folders, or folders holding them at any depth (e.g. runs)')
  parser.add_argument('--format', choices=tuple(FORMATS), default='markdown',
                      help='markdown (default), or csv or json for plotting')
  return parser


def main(argv) -> int:
  args = _parser().parse_args(argv[1:])  # --help exits 0, a bad argument 2.
  runs = load(args.paths)
  if not runs:
    print(f'error: no {RESULTS_FILE} at any depth under {", ".join(args.paths)}',
          file=sys.stderr)
    return 2
  print(FORMATS[args.format](runs))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
