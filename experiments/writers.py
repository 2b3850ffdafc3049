"""Where a run's numbers go: the console, JSON lines, TensorBoard, a plot and results.json.

Only the chief process (index 0) writes; the others get a writer that does nothing.
"""

import json
import math
import os
import sys
import time

import numpy as np

METRICS_FILE = 'metrics.jsonl'
RESULTS_FILE = 'results.json'
PLOT_FILE = 'block_curves.png'


def _plain(value):
  """numpy scalars and arrays as JSON values (NaN and infinities as strings)."""
  if isinstance(value, np.ndarray):
    return [_plain(v) for v in value.tolist()]
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, (np.floating, float)):
    value = float(value)
    return value if math.isfinite(value) else str(value)
  if isinstance(value, np.integer):
    return int(value)
  return value


class MetricWriter:
  """Appends records to metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.workdir = workdir
    self._tensorboard = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, record: dict):
    """`record` has 'split' and 'step'; list values become one scalar per block."""
    if not self.enabled:
      return
    record = {key: _plain(value) for key, value in record.items()}
    with open(os.path.join(self.workdir, METRICS_FILE), 'a') as f:
      f.write(json.dumps(record) + '\n')
    for key, value in record.items():
      if key in ('split', 'step', 'epoch'):
        continue
      values = value if isinstance(value, list) else [value]
      for k, v in enumerate(values):
        if isinstance(v, (int, float)):
          name = f'{record["split"]}/{key}' + (f'/block{k}' if isinstance(value, list) else '')
          self._tensorboard.add_scalar(name, v, record['step'])

  def close(self):
    if self._tensorboard is not None:
      self._tensorboard.close()


def read_metrics(workdir: str) -> list:
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_block_curves(workdir: str) -> str:
  """Draws every block's test accuracy and train/test loss against the epoch."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  records = read_metrics(workdir)
  fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
  for split, style in (('test', '-'), ('train', ':')):
    rows = [r for r in records if r['split'] == split]
    if not rows:
      continue
    epochs = [r['epoch'] for r in rows]
    num_blocks = len(rows[0]['accuracy'])
    for k in range(num_blocks):
      color = plt.cm.viridis(k / max(1, num_blocks - 1))
      label = f'block {k + 1}' + (' (output)' if k == num_blocks - 1 else '')
      if split == 'test':
        acc_ax.plot(epochs, [100 * float(r['accuracy'][k]) for r in rows], style, color=color,
                    label=label, marker='o', markersize=3)
      loss_ax.plot(epochs, [float(r['loss'][k]) for r in rows], style, color=color,
                   label=f'{label}, {split}')
  acc_ax.set(xlabel='epoch', ylabel='test accuracy (%)', title='Accuracy of every head')
  loss_ax.set(xlabel='epoch', ylabel='cross-entropy', title='Loss of every head',
              yscale='log')
  acc_ax.legend(fontsize=7)
  loss_ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  path = os.path.join(workdir, PLOT_FILE)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_results(workdir: str, results: dict):
  """results.json, written atomically so a reader never sees half a file."""
  path = os.path.join(workdir, RESULTS_FILE)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump({key: _plain(value) for key, value in results.items()}, f, indent=2)
  os.replace(tmp, path)


class Progress:
  """A one-line progress bar with images/s on a terminal; silent when output is a file."""

  def __init__(self, total_steps: int, enabled: bool = True, stream=None):
    self.stream = stream or sys.stderr
    self.enabled = enabled and self.stream.isatty()
    self.total_steps = total_steps
    self._last_draw = 0.0

  def update(self, step: int, epoch: int, images_per_sec: float):
    now = time.monotonic()
    if not self.enabled or (now - self._last_draw < 0.2 and step < self.total_steps):
      return
    self._last_draw = now
    done = int(30 * step / max(1, self.total_steps))
    self.stream.write(f'\r epoch {epoch + 1} [{"#" * done}{"." * (30 - done)}] '
                      f'step {step}/{self.total_steps}  {images_per_sec:7.1f} img/s ')
    self.stream.flush()

  def clear(self):
    if self.enabled:
      self.stream.write('\r' + ' ' * 90 + '\r')
      self.stream.flush()


def format_blocks(values, fmt='{:.3f}') -> str:
  return '[' + ' '.join(fmt.format(float(v)) for v in values) + ']'
