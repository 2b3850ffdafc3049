"""The training step: gradient isolation per mode, equivalences, tracing and learning."""

import math
from unittest import mock

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bwbpf_jax as bw
from bwbpf_jax import parallel
from bwbpf_jax import step as step_lib
from bwbpf_jax.errors import UsageError
import eval_cases

IMAGE = (16, 16, 3)


def _batch(size=8, seed=0, num_classes=10):
  rng = np.random.default_rng(seed)
  return {'image': jnp.asarray(rng.normal(size=(size,) + IMAGE), jnp.float32),
          'label': jnp.asarray(rng.integers(0, num_classes, size), jnp.int32)}


def _setup(arch, num_blocks, mode, width=0.125, aux_head='linear', seed=0):
  model = bw.build_model(arch, num_classes=10, num_blocks=num_blocks, mode=mode, width=width,
                         aux_head=aux_head)
  tx = bw.make_optimizer('sgd', learning_rate=0.05, total_steps=100)
  states = bw.init_block_states(model, tx, jax.random.key(seed), IMAGE)
  return model, tx, states


def _per_loss_grads(model, states, batch):
  """grads[k][j]: gradient of block k's head loss w.r.t. block j's parameters."""
  params = tuple(s.params for s in states)
  stats = tuple(s.batch_stats for s in states)

  @jax.jit
  def jacobian(params):
    losses_fn = lambda p: step_lib.network_loss(model, p, stats, batch['image'],
                                                batch['label'])[1][0]
    return jax.jacrev(losses_fn)(params)

  per_block = jacobian(params)  # Each leaf has a leading [K] axis: one row per loss.
  return [[jax.tree_util.tree_map(lambda g, k=k: g[k], per_block[j])
           for j in range(model.num_blocks)] for k in range(model.num_blocks)]


def _is_zero(tree):
  return all(bool(jnp.all(leaf == 0)) for leaf in jax.tree_util.tree_leaves(tree))


class GradientIsolationTest(parameterized.TestCase):
  """Which block each loss reaches, on the smallest cut of each family.

  DeepCutIsolationTest (slow tier) repeats the checks on deeper cuts.
  """

  @parameterized.parameters(('vgg11', 2), ('resnet18', 3))
  def test_bwbpf_local_loss_reaches_only_its_own_block(self, arch, num_blocks):
    check_bwbpf_isolation(self, _setup(arch, num_blocks, 'bwbpf'))

  @parameterized.parameters(('vgg11', 4))
  def test_deep_supervision_sends_later_losses_into_earlier_blocks(self, arch, num_blocks):
    check_deep_supervision(self, _setup(arch, num_blocks, 'deep_supervision'))

  @parameterized.parameters(('vgg11', 4))
  def test_bp_backbone_gradient_is_plain_backprop(self, arch, num_blocks):
    check_plain_backprop(self, arch, num_blocks)


@pytest.mark.slow
class DeepCutIsolationTest(parameterized.TestCase):
  """GradientIsolationTest's checks on more blocks, deeper networks and MLP heads."""

  # resnet18 at K=8 (cuts inside its stages) with MLP heads: one jacobian for both, each
  # the most compiling case of its kind (the linear heads' deep cuts: vgg11, resnet50).
  @parameterized.parameters(('vgg11', 4, 'linear'), ('resnet18', 8, 'mlp'),
                            ('resnet50', 4, 'linear'))
  def test_bwbpf_local_loss_reaches_only_its_own_block(self, arch, num_blocks, aux_head):
    check_bwbpf_isolation(self, _setup(arch, num_blocks, 'bwbpf', aux_head=aux_head))

  @parameterized.parameters(('resnet18', 3))
  def test_deep_supervision_sends_later_losses_into_earlier_blocks(self, arch, num_blocks):
    check_deep_supervision(self, _setup(arch, num_blocks, 'deep_supervision'))

  @parameterized.parameters(('resnet18', 3))
  def test_bp_backbone_gradient_is_plain_backprop(self, arch, num_blocks):
    check_plain_backprop(self, arch, num_blocks)


def check_bwbpf_isolation(test, setup):
  """Loss k's gradient is non-zero on block k and exactly zero on every other block."""
  model, _, states = setup
  grads = _per_loss_grads(model, states, _batch())
  for k in range(model.num_blocks):
    for j in range(model.num_blocks):
      if j == k:
        test.assertFalse(_is_zero(grads[k][j]), f'block {k} gets no gradient from its loss')
      else:
        chex.assert_trees_all_equal(grads[k][j],
                                    jax.tree_util.tree_map(jnp.zeros_like, grads[k][j]))


def check_blockwise_equals_fused(setup, rtol=1e-6, atol=1e-7):
  """Two block-wise steps (one jitted program a block) equal two fused steps, metrics too."""
  model, tx, states = setup
  copy = jax.tree_util.tree_map(jnp.copy, states)
  fused = bw.make_train_step(model, tx)
  blockwise = bw.make_blockwise_train_step(model, tx)
  for seed in range(2):
    states, fused_metrics = fused(states, _batch(seed=seed))
    copy, blockwise_metrics = blockwise(copy, _batch(seed=seed))
  chex.assert_trees_all_close(states, copy, rtol=rtol, atol=atol)
  chex.assert_trees_all_close(fused_metrics, blockwise_metrics, rtol=rtol)


def check_deep_supervision(test, setup):
  """Loss k reaches blocks 1..k (the reference code's behaviour) and no later block."""
  model, _, states = setup
  grads = _per_loss_grads(model, states, _batch())
  for k in range(model.num_blocks):
    for j in range(model.num_blocks):
      test.assertEqual(_is_zero(grads[k][j]), j > k, f'loss {k}, block {j}')


def check_plain_backprop(test, arch, num_blocks, width=0.125):
  """bp mode's backbone gradient equals jax.grad of the unpartitioned network's loss.

  `arch`: a built-in name or a `bw.Network` (then `width` must be 1).
  """
  model, _, states = _setup(arch, num_blocks, 'bp', width=width)
  whole = bw.build_model(arch, num_classes=10, num_blocks=1, mode='bp', width=width)
  whole_params = _merge_blocks(model, [s.params for s in states])
  whole_stats = _merge_blocks(model, [s.batch_stats for s in states])
  batch = _batch()

  grads = jax.jit(jax.grad(lambda p: step_lib.network_loss(
      model, p, tuple(s.batch_stats for s in states), batch['image'], batch['label'])[0]))(
          tuple(s.params for s in states))
  expected = jax.jit(jax.grad(lambda p: step_lib.local_loss(
      whole.blocks[0], p, whole_stats, batch['image'], batch['label'])[0]))(whole_params)
  chex.assert_trees_all_close(_merge_blocks(model, grads), expected, rtol=1e-5, atol=1e-6)
  # The auxiliary probes still learn, from their own losses only.
  test.assertFalse(_is_zero(grads[0]['head']))


def _merge_blocks(model, trees):
  """Renames per-block trees to the single-block layout ('units_i' numbered globally)."""
  merged, offset = {}, 0
  for k, (block, tree) in enumerate(zip(model.blocks, trees)):
    for name, value in tree.items():
      if name.startswith('units_'):
        merged[f'units_{offset + int(name.split("_")[1])}'] = value
      elif name == 'stem':
        merged['stem'] = value
      elif name == 'head' and k == model.num_blocks - 1:
        merged['head'] = value
    offset += len(block.units)
  return merged


def _counting(step_fn, traced):
  """`step_fn(model_or_block, ...)` that appends its first argument to `traced` when traced."""
  def counted(module, *args, **kwargs):
    traced.append(module)
    return step_fn(module, *args, **kwargs)
  return counted


class TrainStepTest(parameterized.TestCase):

  @pytest.mark.slow
  def test_every_step_maker_traces_once_over_several_calls(self):
    """The fused, block-wise and data-parallel makers trace their step once, not per call.

    The makers look the step functions up when called, so counting wrappers put
    in their place see every trace of the real makers' jitted functions.
    """
    model, tx, states = _setup('vgg11', 2, 'bwbpf')
    mesh = parallel.make_mesh(1)
    makers = {
        'fused': lambda: bw.make_train_step(model, tx),
        'blockwise': lambda: bw.make_blockwise_train_step(model, tx),
        'data_parallel': lambda: parallel.make_data_parallel_train_step(model, tx, mesh),
        'data_parallel_blockwise':
            lambda: parallel.make_data_parallel_blockwise_train_step(model, tx, mesh),
    }
    for name, make in makers.items():
      traced = []
      with mock.patch.object(step_lib, 'train_step', _counting(step_lib.train_step, traced)), \
           mock.patch.object(step_lib, 'block_train_step',
                             _counting(step_lib.block_train_step, traced)):
        train_step = make()
        current = jax.tree_util.tree_map(jnp.copy, states)
        if name.startswith('data_parallel'):
          current = parallel.replicate(current, mesh)
        for seed in range(3):
          batch = _batch(seed=seed)
          if name.startswith('data_parallel'):
            batch = parallel.shard_batch(batch, mesh)
          current, metrics = train_step(current, batch)
      # One trace of the whole model (fused), or one per block (block-wise).
      expected = [model] if 'blockwise' not in name else list(model.blocks)
      self.assertEqual([id(m) for m in traced], [id(m) for m in expected], name)
      chex.assert_shape([metrics['loss'], metrics['accuracy'], metrics['skipped']], (2,))

  @parameterized.parameters(*bw.MODES)
  def test_a_few_steps_on_one_batch_lower_every_local_loss(self, mode):
    model, tx, states = _setup('vgg11', 4, mode, width=0.25)
    train_step = bw.make_train_step(model, tx)
    batch = _batch(size=16)
    states, first = train_step(states, batch)
    for _ in range(15):
      states, metrics = train_step(states, batch)
    self.assertTrue(np.all(np.asarray(metrics['loss']) < np.asarray(first['loss'])),
                    f'{first["loss"]} -> {metrics["loss"]}')

  def test_blockwise_step_equals_fused_step(self):
    check_blockwise_equals_fused(_setup('resnet18', 4, 'bwbpf'))

  def test_blockwise_step_refuses_modes_with_cross_block_gradients(self):
    model, tx, _ = _setup('vgg11', 2, 'deep_supervision')
    with self.assertRaisesRegex(UsageError, 'isolated blocks'):
      bw.make_blockwise_train_step(model, tx)

  @parameterized.named_parameters(('fused', bw.make_train_step),
                                  ('blockwise', bw.make_blockwise_train_step))
  def test_skip_nonfinite_leaves_only_the_bad_block_unchanged(self, make_step):
    model, tx, states = _setup('vgg11', 3, 'bwbpf')
    batch = _batch()
    train_step = make_step(model, tx, skip_nonfinite=True, donate=False)
    clean_states, clean_metrics = train_step(states, batch)
    np.testing.assert_array_equal(clean_metrics['skipped'], [0, 0, 0])
    # A NaN in block 1's head only: blocks 0 and 2 must still update.
    bad = list(states)
    bad[1] = bad[1].replace(params={**bad[1].params, 'head': jax.tree_util.tree_map(
        lambda x: x * jnp.nan, bad[1].params['head'])})
    new_states, metrics = train_step(tuple(bad), batch)
    np.testing.assert_array_equal(metrics['skipped'], [0, 1, 0])
    # Block 1 keeps everything: parameters, batch statistics, momentum buffers.
    chex.assert_trees_all_equal(new_states[1], bad[1])
    # Blocks 0 and 2 make exactly the update they make without the NaN (block 2's
    # input is block 1's features, which its head does not touch).
    for k in (0, 2):
      chex.assert_trees_all_equal(new_states[k], clean_states[k])
      self.assertFalse(np.allclose(new_states[k].params['units_0']['Conv_0']['kernel'],
                                   states[k].params['units_0']['Conv_0']['kernel']), k)


@pytest.mark.slow
class RematTest(parameterized.TestCase):
  """Gradient checkpointing (`build_model(remat=True)`) changes memory, never the update."""

  @parameterized.parameters(('bp', False), ('bwbpf', True))
  def test_same_update_as_without_remat(self, mode, blockwise):
    make_step = bw.make_blockwise_train_step if blockwise else bw.make_train_step
    results = []
    for remat in (False, True):
      model = bw.build_model('vgg11', num_classes=10, num_blocks=2, mode=mode, width=0.125,
                             remat=remat)
      tx = bw.make_optimizer('sgd', learning_rate=0.05, total_steps=100)
      states = bw.init_block_states(model, tx, jax.random.key(0), IMAGE)
      results.append(make_step(model, tx)(states, _batch()))
    chex.assert_trees_all_close(results[0], results[1], rtol=1e-6, atol=1e-7)

  def test_units_are_checkpointed_and_xla_keeps_the_recomputation(self):
    batch = _batch(size=16)
    temp_bytes = {}
    for remat in (False, True):
      model = bw.build_model('vgg11', num_classes=10, num_blocks=1, mode='bp', width=0.125,
                             remat=remat)
      tx = bw.make_optimizer('sgd', learning_rate=0.05, total_steps=100)
      states = bw.abstract_block_states(model, tx, IMAGE)
      jaxpr = str(jax.make_jaxpr(lambda s, b: bw.train_step(model, tx, s, b))(states, batch))
      # Each of the eight convolution units under jax.checkpoint.
      self.assertEqual(jaxpr.count('remat'), 8 if remat else 0)
      compiled = bw.make_train_step(model, tx).lower(states, batch).compile()
      temp_bytes[remat] = compiled.memory_analysis().temp_size_in_bytes
    # Only unit inputs are kept for the backward pass: XLA's temporaries shrink.
    self.assertLess(temp_bytes[True], 0.6 * temp_bytes[False], temp_bytes)


class EvalStepTest(parameterized.TestCase):

  def test_masked_examples_do_not_count(self):
    """Padded rows each head would get right, with clearly non-zero losses, add nothing.

    Random padded labels would be misclassified by the untrained heads anyway, so the
    padding is labelled with the heads' own predictions (tests/eval_cases.py).
    """
    model, _, states = _setup('vgg11', 2, 'bwbpf')
    eval_step = bw.make_eval_step(model)
    case = eval_cases.masked_eval_case(lambda batch: eval_step(states, batch), model,
                                       _batch(size=5), num_padded=3)
    masked = eval_step(states, case.batch)
    chex.assert_shape([masked['correct'], masked['loss']], (2,))
    self.assertEqual(float(masked['count']), 5)
    chex.assert_trees_all_close(masked, case.expected, rtol=1e-5)


class OptimizerTest(parameterized.TestCase):

  def test_sgd_matches_pytorch_coupled_weight_decay(self):
    """Two steps of PyTorch's SGD(lr, momentum, weight_decay), computed by hand.

    PyTorch adds the decay to the gradient before momentum (g += wd * p;
    buf = mu * buf + g; p -= lr * buf). One step from an empty buffer cannot
    tell that from decoupled decay or from no momentum; the second step can.
    """
    lr, total_steps, mu, wd = 0.1, 10, 0.9, 0.5
    tx = bw.make_optimizer('sgd', learning_rate=lr, total_steps=total_steps, momentum=mu,
                           weight_decay=wd)
    # The cosine schedule's rate at steps 0 and 1 (no warm-up).
    rates = [lr * 0.5 * (1 + math.cos(math.pi * t / total_steps)) for t in (0, 1)]
    params, grad = {'w': jnp.array([2.0])}, {'w': jnp.array([1.0])}
    state = tx.init(params)
    p, buf, expected = 2.0, 0.0, []
    for rate in rates:
      g = 1.0 + wd * p
      buf = mu * buf + g
      p -= rate * buf
      expected.append(p)
    got = []
    for _ in rates:
      updates, state = tx.update(grad, state, params)
      params = optax.apply_updates(params, updates)
      got.append(float(params['w'][0]))
    np.testing.assert_allclose(got, expected, rtol=1e-6)  # [1.8, 1.4390546]

  def test_nesterov_matches_pytorch(self):
    """PyTorch's SGD(nesterov=True): v = mu v + g; p -= lr (g + mu v)."""
    tx = bw.make_optimizer('sgd', learning_rate=0.1, total_steps=10, weight_decay=0.0,
                           momentum=0.9, nesterov=True)
    params = {'w': jnp.array([0.0])}
    state, steps = tx.init(params), []
    for grad in (1.0, 2.0):
      updates, state = tx.update({'w': jnp.array([grad])}, state, params)
      steps.append(-float(updates['w'][0]) / 0.1)
    # v1 = 1, step 1 + 0.9; v2 = 0.9 + 2 = 2.9, step 2 + 0.9 * 2.9 (constant lr: 10-step cosine
    # at step 1 is 0.1 * 0.97553).
    np.testing.assert_allclose(steps, [1.9, (2 + 0.9 * 2.9) * 0.975528], rtol=1e-5)

  def test_cosine_schedule_reaches_zero(self):
    tx = bw.make_optimizer('sgd', learning_rate=0.1, total_steps=4, weight_decay=0.0,
                           momentum=0.0)
    params, state, lrs = {'w': jnp.array([0.0])}, None, []
    state = tx.init(params)
    for _ in range(5):
      updates, state = tx.update({'w': jnp.array([1.0])}, state, params)
      lrs.append(-float(updates['w'][0]))
    np.testing.assert_allclose(lrs, [0.1, 0.085355, 0.05, 0.014645, 0.0], atol=1e-6)

  def test_a_given_schedule_is_the_rate_that_trains(self):
    """A schedule passed in is used as it is, so the loop logs the rate it trains with."""
    schedule = lambda count: 0.1 / (count + 1.0)  # Not a cosine: a rebuilt schedule would differ.
    tx = bw.make_optimizer('sgd', learning_rate=schedule, weight_decay=0.0, momentum=0.0)
    params = {'w': jnp.array([0.0])}
    state, lrs = tx.init(params), []
    for _ in range(3):
      updates, state = tx.update({'w': jnp.array([1.0])}, state, params)
      lrs.append(-float(updates['w'][0]))
    np.testing.assert_allclose(lrs, [schedule(t) for t in range(3)], rtol=1e-6)
    with self.assertRaisesRegex(ValueError, 'fixes its own steps'):
      bw.make_optimizer('sgd', learning_rate=schedule, total_steps=10)
    with self.assertRaisesRegex(ValueError, 'needs total_steps'):
      bw.make_optimizer('sgd', learning_rate=0.1)

  def test_unknown_optimizer(self):
    with self.assertRaisesRegex(UsageError, 'unknown optimizer'):
      bw.make_optimizer('lion', total_steps=10)


if __name__ == '__main__':
  from absl.testing import absltest
  absltest.main()
