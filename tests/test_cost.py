"""Activation memory per unit, and the cut that balances it (cost.py; FLOPs are in test_heads)."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import optax
import pytest

import bwbpf_jax as bw
from bwbpf_jax import cost
from bwbpf_jax import partition
from bwbpf_jax import step as step_lib


def _largest(counts, split_points):
  bounds = (0,) + tuple(split_points) + (len(counts),)
  return max(sum(counts[a:b]) for a, b in zip(bounds, bounds[1:]))


class UnitActivationBytesTest(absltest.TestCase):

  def test_vgg_unit_by_hand(self):
    # vgg11 unit 1 at width 0.25 on 16x16x16 inputs: conv 16 -> 32, BatchNorm, ReLU, max-pool.
    # What grows with the batch is the activations: at least the conv input (16x16x16) and
    # the conv, BatchNorm and ReLU outputs (3 x 16x16x32) in float32; weights and batch
    # statistics do not grow. (JAX keeps a few more tensors: 5.75 outputs' worth in all.)
    per_batch = [cost.unit_activation_bytes('vgg11', (32, 32, 3), batch_size=b, width=0.25)
                 for b in (2, 4, 6)]
    per_example = (per_batch[1][1] - per_batch[0][1]) / 2
    self.assertEqual(per_batch[2][1] - per_batch[1][1], 2 * per_example)
    self.assertBetween(per_example, 4 * (16 * 16 * 16 + 3 * 16 * 16 * 32),
                       4 * (16 * 16 * 16 + 8 * 16 * 16 * 32))

  def test_resnet50_full_resolution_units_dominate(self):
    counts = cost.unit_activation_bytes('resnet50', (32, 32, 3), batch_size=128)
    self.assertLen(counts, 16)
    # Stage 1 (32x32, 256 channels out) against stage 4 (4x4, 2048 channels out).
    self.assertGreater(min(counts[:3]), 3 * max(counts[13:]))


class ActivationBalancedSplitTest(absltest.TestCase):

  def test_resnet50_k8_cuts_the_full_resolution_stage_finer(self):
    counts = cost.unit_activation_bytes('resnet50', (32, 32, 3), batch_size=128)
    balanced = cost.activation_balanced_split_points('resnet50', 8, (32, 32, 3),
                                                     batch_size=128)
    stages = partition.default_split_points((0,) * 3 + (1,) * 4 + (2,) * 6 + (3,) * 3, 8)
    self.assertEqual(balanced[:2], (1, 2))  # The stem and unit 1 alone, then unit 2 alone.
    self.assertLess(_largest(counts, balanced), 0.6 * _largest(counts, stages))

  @pytest.mark.slow
  def test_compiled_block_steps_need_less_memory(self):
    """XLA's own account: the largest block-wise call is smaller with the balanced cut."""
    shape = (16, 32, 32, 3)
    tx = optax.sgd(0.1)
    points = {'stages': None, 'activations': cost.activation_balanced_split_points(
        'resnet18', 4, shape[1:], batch_size=shape[0], width=0.25)}
    peak = {}
    for name, split_points in points.items():
      model = bw.build_model('resnet18', num_classes=10, num_blocks=4, width=0.25,
                             split_points=split_points)
      states = bw.abstract_block_states(model, tx, shape[1:])
      x = jax.ShapeDtypeStruct(shape, jnp.float32)
      labels = {'label': jax.ShapeDtypeStruct(shape[:1], jnp.int32)}
      temps = []
      for block, state in zip(model.blocks, states):
        fn = lambda s, x, l, b=block: step_lib.block_train_step(b, tx, s, x, l)
        analysis = jax.jit(fn).lower(state, x, labels).compile().memory_analysis()
        temps.append(analysis.temp_size_in_bytes)
        x = jax.eval_shape(fn, state, x, labels)[1]
      peak[name] = max(temps)
    self.assertNotEqual(points['activations'], bw.default_split_points((0, 0, 1, 1, 2, 2, 3, 3),
                                                                       4))
    self.assertLess(peak['activations'], 0.8 * peak['stages'])


if __name__ == '__main__':
  absltest.main()
