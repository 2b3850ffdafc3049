"""The benchmark's FLOP count, which its MFU figures rest on, and its command line."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import bwbpf_jax as bw
from benchmarks import bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _vgg11_forward_flops(width: float, size: int, batch: int, model) -> int:
  """2 x multiply-adds of VGG-11's forward at `size`x`size`, counted by hand.

  Every 3x3 convolution counts 9 taps at every output position, padding
  included; every head (average pool + dense) counts its dense layer.
  """
  channels = [64, 128, 256, 256, 512, 512, 512, 512]
  pool_after = [True, True, False, True, False, True, False, True]
  flops, c_in, block_ends = 0, 3, [p - 1 for p in model.split_points] + [len(channels) - 1]
  for unit, (c, pool) in enumerate(zip(channels, pool_after)):
    c_out = bw.models.layers.scaled(c, width)
    flops += 2 * (size * size * 9) * c_in * c_out
    if unit in block_ends:
      flops += 2 * c_out * model.num_classes  # The head reading this block's output.
    c_in, size = c_out, size // 2 if pool else size
  return batch * flops


def test_forward_flops_match_a_hand_count():
  model = bw.build_model('vgg11', num_classes=10, num_blocks=4, width=0.25)
  tx = bw.make_optimizer('sgd', total_steps=10)
  states = bw.abstract_block_states(model, tx, (2, 32, 32, 3))
  batch = {'image': jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32),
           'label': jax.ShapeDtypeStruct((2,), jnp.int32)}
  counted = bench.forward_flops(model, states, batch)
  by_hand = _vgg11_forward_flops(0.25, 32, 2, model)
  # One convention counted two ways (the traced network, the architecture table): equal.
  assert counted == by_hand, (counted, by_hand)


def _bench(*flags, env=None):
  return subprocess.run([sys.executable, '-m', 'benchmarks.bench', '--arch=vgg11', '--width=0.125',
                         '--batch_size=4', '--num_blocks=3', '--modes=bwbpf', '--steps=1',
                         *flags], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, **(env or {})})


def _one_line_error(proc) -> str:
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  return lines[0]


def test_modes_are_the_librarys_and_a_typo_lists_them_all():
  assert sorted(bench.BASE_MODES) == sorted(bw.MODES)
  proc = _bench('--modes=bwbpf,bpp')
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert _one_line_error(proc) == (
      'error: unknown mode bpp in --modes; choose from bp, deep_supervision, bwbpf, bp_remat, '
      'deep_supervision_remat, bwbpf_remat')
  assert not proc.stdout  # Nothing was timed.


def test_compare_torch_without_torch_fails_before_timing(tmp_path):
  # A torch package that cannot be imported, ahead of any installed one.
  (tmp_path / 'torch').mkdir()
  (tmp_path / 'torch' / '__init__.py').write_text(
      "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
  proc = _bench('--compare_torch', env={'PYTHONPATH': f'{tmp_path}{os.pathsep}{REPO}'})
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'pip install -r requirements-bench.txt' in _one_line_error(proc)
  assert not proc.stdout  # The JAX step was not timed first.


@pytest.mark.slow
def test_activation_split_is_measured_with_its_cut():
  proc = _bench('--split_by=activations')
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads([l for l in proc.stdout.splitlines() if l.startswith('{')][0])
  expected = bw.activation_balanced_split_points('vgg11', 3, (32, 32, 3), batch_size=4,
                                                 width=0.125)
  assert result['split_points'] == list(expected) and result['split_by'] == 'activations'
  assert expected != bw.build_model('vgg11', num_classes=10, num_blocks=3).split_points
  assert result['step'] == 'blockwise' and result['step_memory_bytes'] > result['state_bytes']
  assert result['images_per_sec'] > 0
  assert (result['baseline_rss_bytes'] < result['ready_rss_bytes']
          <= result['peak_rss_bytes']), result


def test_the_pytorch_peer_refuses_a_cut_it_does_not_have():
  proc = _bench('--split_by=activations', '--compare_torch')
  assert proc.returncode == 2
  assert 'cuts at stages only' in _one_line_error(proc)
  assert not proc.stdout
