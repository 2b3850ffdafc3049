"""Where a run's numbers go: the console, JSON lines, TensorBoard, a plot and results.json.

Only the chief process (index 0) writes; the others get a writer that does nothing.

Blocks are numbered 1..K everywhere a person reads them: console lines, error
messages, the plot's legend and TensorBoard tags (`train/loss/block1` is the
first block). In metrics.jsonl and results.json a per-block value is a list in
block order, so block k is element k - 1 and the last element is the output head.
"""

import datetime
import json
import math
import os
import sys
import threading
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
      for k, v in enumerate(values, start=1):
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


def run_title(results: dict) -> str:
  """What a run was, for the plot: e.g. 'vgg11 x0.25 on digits, bwbpf, K=4'."""
  config = results['config']
  width = f' x{config["width"]:g}' if config.get('width', 1.0) != 1.0 else ''
  num_blocks = len(results['split_points']) + 1
  return f'{config["arch"]}{width} on {config["dataset"]}, {config["mode"]}, K={num_blocks}'


def draw_block_curves(records: list, title: str = None):
  """The figure of `plot_block_curves` from metrics.jsonl's records."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

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
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def plot_block_curves(workdir: str, title: str = None) -> str:
  """Draws every block's test accuracy and train/test loss against the epoch; returns the path.

  `title` names the run (`run_title(results)`); without it the plot has none.
  """
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig = draw_block_curves(read_metrics(workdir), title)
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


# Seconds between progress lines in a log file (stdout not a terminal).
PROGRESS_SECONDS = 30.0


def _duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=round(seconds)))


class Progress:
  """Where the run is, while it trains.

  On a terminal (stderr), a one-line bar redrawn in place, with the time left.
  When stdout is not a
  terminal (a cluster job's log file), a line every `interval_s` seconds:
  `progress: step 120/440 (epoch 2.73), 912 img/s, 0:00:17 elapsed, about 0:00:35 left`.
  The lines come from a background thread, so they keep coming while a step
  compiles or the test set is evaluated; images/s and time left count only the
  steps timed since this process began training.
  """

  def __init__(self, total_steps: int, steps_per_epoch: int, batch_size: int,
               enabled: bool = True, stream=None, log_stream=None,
               interval_s: float = PROGRESS_SECONDS, log=None):
    self.stream = stream or sys.stderr
    self.log_stream = log_stream or sys.stdout
    # Prints one log line; the training loop's guards against a closed output pipe.
    self.log = log or (lambda line: print(line, file=self.log_stream, flush=True))
    self.enabled = enabled and self.stream.isatty()
    self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
    self.batch_size = batch_size
    self._last_draw = 0.0
    self._start = time.monotonic()
    self._step, self._step_time = None, None
    self._timed = None  # (first timed step, its time): the rate counts from there.
    self._stop = threading.Event()
    self._thread = None
    if enabled and not self.log_stream.isatty() and interval_s > 0:
      self._thread = threading.Thread(target=self._log_every, args=(interval_s,), daemon=True,
                                      name='progress')
      self._thread.start()

  def update(self, step: int, epoch: int, images_per_sec: float):
    """Called after each step is dispatched; `images_per_sec` is the segment's rate."""
    now = time.monotonic()
    self._step, self._step_time = step, now
    if self._timed is None and images_per_sec:
      self._timed = (step, now)
    if not self.enabled or (now - self._last_draw < 0.2 and step < self.total_steps):
      return
    self._last_draw = now
    done = int(30 * step / max(1, self.total_steps))
    left = self.seconds_left()
    self.stream.write(f'\r epoch {epoch + 1} [{"#" * done}{"." * (30 - done)}] '
                      f'step {step}/{self.total_steps}  {images_per_sec:7.1f} img/s  '
                      f'{"?" if left is None else _duration(left)} left ')
    self.stream.flush()

  def steps_per_sec(self):
    """Steps a second since the first timed step (None before two timed steps)."""
    step = self._step or 0
    if self._timed is None or step <= self._timed[0] or self._step_time <= self._timed[1]:
      return None
    return (step - self._timed[0]) / (self._step_time - self._timed[1])

  def seconds_left(self):
    """The time the remaining steps take at the rate so far (None: no rate yet)."""
    steps_per_sec = self.steps_per_sec()
    if steps_per_sec is None:
      return None
    return (self.total_steps - (self._step or 0)) / steps_per_sec

  def line(self) -> str:
    """The log line for now."""
    now = time.monotonic()
    step = self._step or 0
    text = (f'progress: step {step}/{self.total_steps} '
            f'(epoch {step / self.steps_per_epoch:.2f})')
    steps_per_sec = self.steps_per_sec()
    if steps_per_sec is not None:
      text += (f', {steps_per_sec * self.batch_size:.0f} img/s, '
               f'{_duration(now - self._start)} elapsed, about '
               f'{_duration(self.seconds_left())} left')
    else:
      text += f', {_duration(now - self._start)} elapsed'
    return text

  def _log_every(self, interval_s: float):
    while not self._stop.wait(interval_s):
      self.log(self.line())

  def clear(self):
    if self.enabled:
      self.stream.write('\r' + ' ' * 100 + '\r')
      self.stream.flush()

  def close(self):
    """Clears the bar and stops the log lines."""
    self.clear()
    self._stop.set()
    if self._thread is not None:
      self._thread.join()


def format_blocks(values, fmt='{:.3f}') -> str:
  return '[' + ' '.join(fmt.format(float(v)) for v in values) + ']'
