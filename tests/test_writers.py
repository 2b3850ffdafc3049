"""Where a run's numbers go: metrics.jsonl, TensorBoard tags, the plot and progress lines."""

import glob
import io
import json
import os
import struct
import time

import numpy as np
import pytest

from experiments import writers


def tensorboard_scalars(workdir):
  """{tag: {step: value}} read back from the TensorBoard event files (TFRecord framing)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars = {}
  for path in glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*')):
    with open(path, 'rb') as f:
      content = f.read()
    offset = 0
    while offset < len(content):
      (length,) = struct.unpack('<Q', content[offset:offset + 8])
      event = event_pb2.Event.FromString(content[offset + 12:offset + 12 + length])
      offset += 12 + length + 4  # Length, its CRC, the record, its CRC.
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def test_metric_writer_numbers_blocks_from_one_and_logs_rate_and_time(tmp_path):
  workdir = str(tmp_path)
  writer = writers.MetricWriter(workdir)
  writer.write({'split': 'train', 'step': 10, 'epoch': 0.5,
                'loss': np.array([2.0, 1.5, 1.0]), 'accuracy': np.array([0.1, 0.2, 0.3]),
                'learning_rate': 0.05, 'images_per_sec': 480.0, 'elapsed_s': 3.5})
  writer.write({'split': 'test', 'step': 10, 'epoch': 0.5, 'loss': [1.9, 1.4, float('nan')],
                'accuracy': [0.15, 0.25, 0.35], 'elapsed_s': 4.0})
  writer.close()

  records = writers.read_metrics(workdir)
  assert records[0]['loss'] == [2.0, 1.5, 1.0]  # Block k is element k - 1.
  assert (records[0]['learning_rate'], records[0]['images_per_sec'],
          records[0]['elapsed_s']) == (0.05, 480.0, 3.5)
  assert records[1]['loss'][2] == 'nan'  # JSON has no NaN; it is kept as a string.

  scalars = tensorboard_scalars(workdir)
  assert {'train/loss/block1', 'train/loss/block2', 'train/loss/block3'} <= set(scalars)
  assert 'train/loss/block0' not in scalars and 'train/loss/block4' not in scalars
  assert scalars['train/loss/block1'] == {10: 2.0}
  assert scalars['train/loss/block3'] == {10: 1.0}
  assert scalars['test/accuracy/block2'] == {10: pytest.approx(0.25)}
  assert scalars['train/learning_rate'] == {10: pytest.approx(0.05)}
  assert scalars['train/images_per_sec'] == {10: 480.0}
  assert scalars['train/elapsed_s'] == {10: 3.5}
  assert 'train/epoch' not in scalars and 'test/loss/block3' not in scalars  # NaN skipped.


def test_plot_is_titled_and_labels_blocks_from_one(tmp_path):
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  results = {'config': {'arch': 'vgg11', 'width': 0.25, 'dataset': 'digits', 'mode': 'bwbpf'},
             'split_points': [2, 4, 6]}
  assert writers.run_title(results) == 'vgg11 x0.25 on digits, bwbpf, K=4'
  results['config']['width'] = 1.0
  assert writers.run_title(results) == 'vgg11 on digits, bwbpf, K=4'

  records = [{'split': split, 'step': step, 'epoch': step / 10, 'loss': [1.0, 0.5],
              'accuracy': [0.5, 0.7]} for step in (10, 20) for split in ('train', 'test')]
  fig = writers.draw_block_curves(records, 'resnet18 on cifar10, bp, K=2')
  assert fig.get_suptitle() == 'resnet18 on cifar10, bp, K=2'
  labels = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
  assert labels == ['block 1', 'block 2 (output)']
  plt.close(fig)

  with open(os.path.join(tmp_path, writers.METRICS_FILE), 'w') as f:
    f.writelines(json.dumps(record) + '\n' for record in records)
  path = writers.plot_block_curves(str(tmp_path), 'a title')
  assert path == os.path.join(tmp_path, writers.PLOT_FILE) and os.path.getsize(path) > 0


class _FakeTerminal(io.StringIO):

  def isatty(self):
    return True


def test_progress_lines_in_a_log_file_keep_coming_between_steps():
  log = io.StringIO()  # Not a terminal, as a job's log file.
  bar = io.StringIO()
  progress = writers.Progress(100, steps_per_epoch=40, batch_size=8, stream=bar, log_stream=log,
                              interval_s=0.01)
  progress.update(10, 0, images_per_sec=100.0)
  progress.update(20, 0, images_per_sec=100.0)
  # No step for a while (a compile, an evaluation): the lines still come.
  deadline = time.monotonic() + 10
  while log.getvalue().count('\n') < 3 and time.monotonic() < deadline:
    time.sleep(0.01)
  progress.close()
  lines = log.getvalue().splitlines()
  assert len(lines) >= 3
  assert lines[-1].startswith('progress: step 20/100 (epoch 0.50), ')
  assert ' img/s, ' in lines[-1] and ' elapsed, about ' in lines[-1] and lines[-1].endswith(' left')
  assert bar.getvalue() == ''  # No bar drawn into a file.
  count = len(log.getvalue().splitlines())
  time.sleep(0.05)
  assert len(log.getvalue().splitlines()) == count  # close() stopped them.


def test_progress_on_a_terminal_draws_the_bar_and_prints_no_lines():
  terminal = _FakeTerminal()
  progress = writers.Progress(100, steps_per_epoch=40, batch_size=8, stream=terminal,
                              log_stream=_FakeTerminal(), interval_s=0.01)
  assert progress._thread is None  # pylint: disable=protected-access
  progress.update(100, 2, images_per_sec=123.4)
  progress.close()
  assert 'step 100/100' in terminal.getvalue() and '123.4 img/s' in terminal.getvalue()


def test_progress_bar_shows_the_time_left(monkeypatch):
  now = [1000.0]
  monkeypatch.setattr(writers.time, 'monotonic', lambda: now[0])
  terminal = _FakeTerminal()
  progress = writers.Progress(100, steps_per_epoch=40, batch_size=8, stream=terminal,
                              log_stream=_FakeTerminal())
  progress.update(10, 0, images_per_sec=0.0)  # The first step compiled: no rate yet.
  assert terminal.getvalue().endswith(' ? left ')
  progress.update(20, 0, images_per_sec=80.0)
  now[0] += 10.0  # 10 steps in 10 s: the 70 steps left take 70 s.
  progress.update(30, 0, images_per_sec=80.0)
  assert terminal.getvalue().endswith('step 30/100     80.0 img/s  0:01:10 left ')
  assert progress.seconds_left() == 70.0


def test_format_blocks():
  assert writers.format_blocks([0.5, 0.25]) == '[0.500 0.250]'
  assert writers.format_blocks(np.array([50.0, 75.0]), '{:.1f}') == '[50.0 75.0]'
