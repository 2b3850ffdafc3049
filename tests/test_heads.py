"""Auxiliary networks and local losses: isolation, shapes, FLOPs, targets, the contrastive loss, learning."""

import functools

from absl.testing import parameterized
import chex
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bwbpf_jax as bw
from bwbpf_jax import cost
from bwbpf_jax import data
from bwbpf_jax import partition
from bwbpf_jax import step as step_lib
from bwbpf_jax.errors import UsageError
from bwbpf_jax.models import heads
import eval_cases

IMAGE = (16, 16, 3)
# Every head with cross-entropy, and every loss with InfoPro's head (and AugLocal's).
HEAD_AND_LOSS = tuple((head, 'xent') for head in bw.HEADS) + (
    ('infopro', 'xent_recon'), ('infopro', 'supcon'), ('infopro', 'supcon_recon'),
    ('auglocal', 'supcon_recon'))


def _batch(size=8, seed=0):
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (size,) + IMAGE, dtype=np.uint8)
  mean, std = data.normalization_stats(pixels)
  return {'image': jnp.asarray(data.normalize(pixels, mean, std)),
          'label': jnp.asarray(rng.integers(0, 4, size), jnp.int32),  # Few classes: positives.
          'pixels': jnp.asarray(pixels)}


@functools.lru_cache(maxsize=None)
def _setup(head, loss, num_blocks=2, mode='bwbpf'):
  model = bw.build_model('resnet20', num_classes=10, num_blocks=num_blocks, mode=mode,
                         width=0.25, aux_head=head, local_loss=loss)
  tx = bw.make_optimizer('sgd', learning_rate=0.05, total_steps=100)
  states = bw.init_block_states(model, tx, jax.random.key(0), IMAGE)
  return model, tx, states


def _is_zero(tree):
  return all(bool(jnp.all(leaf == 0)) for leaf in jax.tree_util.tree_leaves(tree))


@pytest.mark.slow
class IsolationTest(parameterized.TestCase):

  @parameterized.parameters(*HEAD_AND_LOSS)
  def test_each_local_loss_reaches_only_its_own_block(self, head, loss):
    model, _, states = _setup(head, loss)
    batch = _batch()
    params = tuple(s.params for s in states)
    stats = tuple(s.batch_stats for s in states)
    losses = lambda p: step_lib.network_loss(model, p, stats, batch['image'],
                                             step_lib.loss_targets(batch))[1][0]
    per_block = jax.jit(jax.jacrev(losses))(params)  # Leaves [K, ...]: row k is loss k.
    for k in range(model.num_blocks):
      for j in range(model.num_blocks):
        grads = jax.tree_util.tree_map(lambda g, k=k: g[k], per_block[j])
        if j == k:
          self.assertFalse(_is_zero(grads), f'block {k} gets no gradient from its loss')
        else:
          chex.assert_trees_all_equal(grads, jax.tree_util.tree_map(jnp.zeros_like, grads))


class ShapeAndFlopTest(parameterized.TestCase):

  @parameterized.parameters(*bw.HEADS)
  def test_logits_shape(self, head):
    following = bw.build_model('resnet20', num_classes=10, num_blocks=1,
                               width=0.5).blocks[0].units[4:]
    module = bw.models.make_head(head, 10, following_units=following)
    x = jnp.zeros((2, 16, 16, 8))
    logits = jax.eval_shape(lambda: module.init_with_output(jax.random.key(0), x, False)[0])
    self.assertEqual(logits.shape, (2, 10))
    self.assertEqual(logits.dtype, jnp.float32)

  def test_objective_outputs(self):
    objective = heads.Objective(heads.InfoProHead(128), num_classes=10, contrastive=True,
                                decoder=heads.Decoder())
    x = jnp.zeros((2, 4, 4, 8))
    outputs = jax.eval_shape(lambda: objective.init_with_output(
        jax.random.key(0), x, False, image_shape=(16, 16, 1))[0])
    self.assertEqual({k: v.shape for k, v in outputs.items()},
                     {'logits': (2, 10), 'embedding': (2, 128), 'reconstruction': (2, 16, 16, 1)})

  @parameterized.parameters(
      # Multiply-adds of each head on a [8, 8, 16] map, 10 classes: the leading terms;
      # pooling, BatchNorm and biases add a few percent. XLA counts a padded 3x3
      # convolution's in-bounds taps only: (3 * 8 - 2)**2 per channel pair on 8x8, not 9 * 64.
      ('linear', 2 * 16 * 10 + 8 * 8 * 16, 0.05),
      ('infopro', 2 * (16 * 16 * 22 * 22 + 16 * 128 + 128 * 10), 0.05),
      ('dgl', 2 * (3 * 16 * 16 * 2 * 2 + 3 * 64 * 64 + 64 * 10), 0.15),
  )
  def test_head_flops(self, head, expected, rtol):
    # Block 0: the stem and stage 1 of ResNet-20, 16 channels on an 8x8 input.
    model = bw.build_model('resnet20', num_classes=10, split_points=(4,), aux_head=head)
    counts = cost.flop_counts(model, (8, 8, 3))
    self.assertEqual(model.blocks[0].units[-1].features, 16)
    np.testing.assert_allclose(counts['head'][0], expected, rtol=rtol)

  @pytest.mark.slow
  def test_flop_fractions_order_the_heads(self):
    fractions = {head: cost.aux_flop_fractions(
        bw.build_model('resnet32', num_classes=10, num_blocks=4, aux_head=head), (32, 32, 3))
        ['total'] for head in ('linear', 'infopro', 'auglocal')}
    self.assertLess(fractions['linear'], 0.001)
    self.assertLess(fractions['linear'], fractions['infopro'])
    self.assertLess(fractions['infopro'], fractions['auglocal'])

  def test_auglocal_depth_and_sampled_units(self):
    # AugLocal's pyramid: max depth 2, coefficient 0.5 -> 2 for the first block, at least
    # (1 - 0.5) * 2 + 0.5 = 1.5 -> round(1.5) = 2 for the last; depth 3 -> 3 .. 2.
    self.assertEqual([heads.auglocal_depth(k, 15) for k in (0, 7, 14)], [2, 2, 2])
    self.assertEqual([heads.auglocal_depth(k, 15, max_depth=3) for k in (0, 14)], [3, 2])
    self.assertEqual([heads.auglocal_depth(k, 4, max_depth=5, coefficient=1.0)
                      for k in range(4)], [5, 4, 2, 1])
    _, units, _ = bw.models.architecture_units('resnet32')
    copies = heads.auglocal_units(units[1:], depth=2)  # After the stem: 15 units.
    # Uniform picks: units 1 + 7 and 1 + 14 (stage 2's third, stage 3's last); both
    # downsample, since the skipped stage boundaries halved the map twice.
    self.assertEqual([(u.features, u.stride) for u in copies], [(32, 2), (64, 2)])
    self.assertTrue(all(u.parent is None for u in copies))
    self.assertEqual(len(heads.auglocal_units(units[14:], depth=5)), 2)

  def test_auglocal_depth_reaches_the_model(self):
    model = bw.build_model('resnet32', num_classes=10, num_blocks=4, aux_head='auglocal',
                           auglocal_depth=3)
    self.assertEqual([len(b.head.units) for b in model.blocks[:-1]], [3, 2, 2])
    with self.assertRaisesRegex(UsageError, 'auglocal_depth must be at least 1'):
      bw.build_model('resnet32', num_classes=10, num_blocks=4, aux_head='auglocal',
                     auglocal_depth=0)


class PerBlockHeadTest(parameterized.TestCase):

  def test_one_head_per_auxiliary_block(self):
    model = bw.build_model('resnet20', num_classes=10, num_blocks=3, aux_head=['dgl', 'infopro'])
    self.assertEqual([type(b.head).__name__ for b in model.blocks],
                     ['DGLHead', 'InfoProHead', 'LinearHead'])

  def test_wrong_number_of_heads(self):
    with self.assertRaisesRegex(UsageError, '1 auxiliary heads given for 2'):
      bw.build_model('resnet20', num_classes=10, num_blocks=3, aux_head=['dgl'])

  def test_unknown_loss_and_bad_weights(self):
    with self.assertRaisesRegex(UsageError, 'unknown local loss'):
      bw.build_model('resnet20', num_classes=10, local_loss='hinge')
    with self.assertRaisesRegex(UsageError, 'loss weights must be 4'):
      bw.build_model('resnet20', num_classes=10, local_loss='xent_recon', loss_weights=(1, 2))

  def test_infopro_weights_are_linear_in_block_index(self):
    specs = partition.aux_loss_specs('supcon_recon', 3, (6.0, 0.0, 1.0, 2.0))
    self.assertEqual([(s.kind, s.reconstruction_weight, s.task_weight) for s in specs],
                     [('supcon', 6.0, 0.0), ('supcon', 3.5, 1.0), ('supcon', 1.0, 2.0)])
    model = bw.build_model('resnet20', num_classes=10, num_blocks=4, local_loss='xent_recon')
    self.assertEqual(model.blocks[-1].loss, partition.LossSpec())  # Output: plain xent.


class LossTest(parameterized.TestCase):

  def test_contrastive_loss_by_hand(self):
    embedding = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 2.0], [-3.0, 0.0]])
    labels = np.array([0, 0, 1, 0])
    temperature = 0.5
    z = embedding / np.linalg.norm(embedding, axis=1, keepdims=True)
    expected = []
    for i in range(4):
      others = [j for j in range(4) if j != i]
      log_denominator = np.log(sum(np.exp(z[i] @ z[j] / temperature) for j in others))
      positives = [j for j in others if labels[j] == labels[i]]
      expected.append(-np.mean([z[i] @ z[p] / temperature - log_denominator
                                for p in positives]) if positives else 0.0)
    got = step_lib.supervised_contrastive_loss(jnp.asarray(embedding), jnp.asarray(labels),
                                               temperature)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # A masked example is no one's partner: the others' losses are those of the batch without it.
    masked = step_lib.supervised_contrastive_loss(
        jnp.asarray(embedding), jnp.asarray(labels), temperature, jnp.array([1., 1., 1., 0.]))
    without = step_lib.supervised_contrastive_loss(
        jnp.asarray(embedding[:3]), jnp.asarray(labels[:3]), temperature)
    np.testing.assert_allclose(masked, list(without) + [0.0], rtol=1e-5, atol=1e-6)

  def test_reconstruction_target_is_the_unnormalised_image(self):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20,) + IMAGE, dtype=np.uint8)
    labels = np.zeros(20, np.int32)
    mean, std = data.normalization_stats(images)
    batch = next(data.train_batches(images, labels, batch_size=8, seed=0, epoch=0, mean=mean,
                                    std=std, with_pixels=True))
    target = step_lib.reconstruction_target(batch['pixels'])
    # The same augmented image as 'image', before normalisation, on [0, 1].
    np.testing.assert_allclose(batch['image'] * std + mean, target, atol=1e-5)
    self.assertBetween(float(target.min()), 0.0, 1.0)
    self.assertBetween(float(target.max()), 0.0, 1.0)
    eval_batch = next(data.eval_batches(images, labels, batch_size=8, mean=mean, std=std,
                                        with_pixels=True))
    np.testing.assert_array_equal(eval_batch['pixels'], images[:8])
    # The loss is binary cross-entropy of the decoder's sigmoid against that target.
    block = partition.Block(units=(), head=nn.Dense(1),
                            loss=partition.LossSpec(task_weight=0.0, reconstruction_weight=2.0))
    reconstruction = jnp.asarray(rng.normal(size=target.shape), jnp.float32)
    outputs = {'logits': jnp.zeros((8, 10)), 'reconstruction': reconstruction}
    got = step_lib.example_losses(block, outputs, {'label': batch['label'],
                                                   'pixels': batch['pixels']})
    sigmoid = 1 / (1 + np.exp(-np.asarray(reconstruction, np.float64)))
    bce = -(target * np.log(sigmoid) + (1 - target) * np.log(1 - sigmoid))
    np.testing.assert_allclose(got, 2.0 * bce.mean(axis=(1, 2, 3)), rtol=1e-5)

  def test_contrastive_probe_does_not_train_the_block(self):
    model, _, states = _setup('infopro', 'supcon')
    block, state, batch = model.blocks[0], states[0], _batch()

    def probe_xent(params):
      (_, outputs), _ = block.apply({'params': params, 'batch_stats': state.batch_stats},
                                    batch['image'], train=True, mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(outputs['logits'],
                                                             batch['label']).mean()

    grads = jax.jit(jax.grad(probe_xent))(state.params)
    self.assertFalse(_is_zero(grads['head']['probe']))
    self.assertTrue(_is_zero({k: v for k, v in grads.items() if k != 'head'}))
    self.assertTrue(_is_zero(grads['head']['network']))

  def test_reconstruction_without_pixels_is_a_usage_error(self):
    model, _, states = _setup('infopro', 'xent_recon')
    batch = _batch()
    del batch['pixels']
    with self.assertRaisesRegex(UsageError, "need the unnormalised images under 'pixels'"):
      bw.eval_step(model, states, batch)

  @pytest.mark.slow
  def test_eval_step_uses_the_local_loss_and_masks_padding(self):
    model, _, states = _setup('infopro', 'supcon_recon')
    eval_step = bw.make_eval_step(model)
    # Padding each head gets right (tests/eval_cases.py): counted, it would change 'correct';
    # as contrastive partners (block 0's loss is supcon + reconstruction), the losses of
    # the real rows with positives (labels 2 1 3 2 2: three rows of class 2).
    case = eval_cases.masked_eval_case(lambda b: eval_step(states, b), model, _batch(size=5),
                                       num_padded=3)
    chex.assert_trees_all_close(eval_step(states, case.batch), case.expected, rtol=1e-5,
                                atol=1e-5)
    batch = _batch()
    # The auxiliary blocks' eval loss is their training objective, not cross-entropy alone.
    x, expected = batch['image'], []
    for block, state in zip(model.blocks, states):
      x, outputs = block.apply({'params': state.params, 'batch_stats': state.batch_stats}, x,
                               train=False, image_shape=IMAGE)
      expected.append(jnp.sum(step_lib.example_losses(block, outputs,
                                                      step_lib.loss_targets(batch))))
    full = bw.make_eval_step(model)(states, batch)
    np.testing.assert_allclose(full['loss'], expected, rtol=1e-5)


@pytest.mark.slow
class LearningTest(parameterized.TestCase):

  @parameterized.parameters(*HEAD_AND_LOSS)
  def test_a_few_steps_lower_every_local_loss(self, head, loss):
    model, tx, states = _setup(head, loss)
    train_step = bw.make_train_step(model, tx, donate=False)
    batch = _batch(size=16, seed=1)
    states, first = train_step(states, batch)
    for _ in range(8):
      states, metrics = train_step(states, batch)
    self.assertTrue(np.all(np.asarray(metrics['loss']) < np.asarray(first['loss'])),
                    f'{first["loss"]} -> {metrics["loss"]}')


if __name__ == '__main__':
  from absl.testing import absltest
  absltest.main()
