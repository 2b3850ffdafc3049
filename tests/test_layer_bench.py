"""The per-convolution benchmark finds the network's convolutions and times the same math."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import layer_bench

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_vgg11_shapes_follow_the_stages():
  shapes = layer_bench.conv_shapes('vgg11', width=0.25, batch_size=2, image_size=32)
  assert sum(s.count for s in shapes) == 8
  assert [(s.input[1], s.kernel[2], s.kernel[3], s.count) for s in shapes] == [
      (32, 3, 16, 1), (16, 16, 32, 1), (8, 32, 64, 1), (8, 64, 64, 1),
      (4, 64, 128, 1), (4, 128, 128, 1), (2, 128, 128, 2)]


def test_resnet18_counts_strided_and_projection_convolutions():
  shapes = layer_bench.conv_shapes('resnet18', width=0.25, batch_size=2, image_size=32)
  assert sum(s.count for s in shapes) == 20  # Stem, 16 in residual units, 3 projections.
  assert sum(s.count for s in shapes if s.kernel[:2] == (1, 1)) == 3
  assert sum(s.count for s in shapes if s.stride == (2, 2)) == 6


@pytest.mark.slow
def test_jax_and_torch_compute_the_same_kernel_gradient():
  pytest.importorskip('torch')
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.layer_bench', '--arch=vgg11', '--width=0.125',
       '--batch_size=2', '--repeats=1', '--compare_torch'],
      capture_output=True, text=True, cwd=_ROOT, check=True)
  lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith('{')]
  per_shape, summary = lines[:-1], lines[-1]
  assert len(per_shape) == 7
  for line in per_shape:
    assert line['weight_grad_max_rel_diff'] < 1e-4, line
  assert set(summary['total_ms']) == {'jax', 'torch'}
  assert summary['jax_over_torch_time'] > 0
