"""A user's own network through the front door: `bwbpf_jax.Network` and `--arch=module:function`.

The networks are written with `flax.linen` only, in tests/user_networks.py:
a 4-unit CNN (nn.Conv, nn.BatchNorm, a residual and a strided unit) and a
4-unit token network (patch-embedding stem, attention and MLP on [B, T, D]),
plus an MLP whose features are vectors [B, D].
"""

import functools
import os

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bwbpf_jax as bw
from bwbpf_jax import parallel
from bwbpf_jax import step as step_lib
from bwbpf_jax.errors import UsageError
from bwbpf_jax.models import layers
from bwbpf_jax.models import onednn_conv
from fake_devices import NUM_DEVICES, run_on_fake_devices
import test_step
import user_networks

IMAGE = test_step.IMAGE  # (16, 16, 3)
NETWORKS = {'small_cnn': user_networks.small_cnn, 'tiny_token_net': user_networks.tiny_token_net}


def _setup(name, num_blocks, mode='bwbpf', aux_head='linear', seed=0):
  model = bw.build_model(NETWORKS[name](), num_classes=10, num_blocks=num_blocks, mode=mode,
                         aux_head=aux_head)
  tx = bw.make_optimizer('sgd', learning_rate=0.05, total_steps=100)
  return model, tx, bw.init_block_states(model, tx, jax.random.key(seed), IMAGE)


class FrontDoorTest(parameterized.TestCase):

  @parameterized.product(name=tuple(NETWORKS), aux_head=('linear', 'mlp', 'auglocal'))
  def test_bwbpf_every_head_is_isolated(self, name, aux_head):
    # auglocal at K=2: its copies are the block's 2 later units, none skipped, which a
    # network that says nothing of its resolution allows (see the auglocal refusal below).
    num_blocks = 2 if aux_head == 'auglocal' else 4
    test_step.check_bwbpf_isolation(self, _setup(name, num_blocks, aux_head=aux_head))

  @parameterized.parameters(*NETWORKS)
  def test_deep_supervision_reaches_earlier_blocks(self, name):
    test_step.check_deep_supervision(self, _setup(name, 2, mode='deep_supervision'))

  @parameterized.parameters(*NETWORKS)
  def test_bp_equals_jax_grad_of_the_plain_network(self, name):
    test_step.check_plain_backprop(self, NETWORKS[name](), 2, width=1.0)

  @parameterized.parameters(*NETWORKS)
  def test_blockwise_step_equals_fused_step(self, name):
    model, tx, states = _setup(name, 4)
    copy = jax.tree_util.tree_map(jnp.copy, states)
    fused, blockwise = bw.make_train_step(model, tx), bw.make_blockwise_train_step(model, tx)
    for seed in range(2):
      states, fused_metrics = fused(states, test_step._batch(seed=seed))
      copy, blockwise_metrics = blockwise(copy, test_step._batch(seed=seed))
    chex.assert_trees_all_close(states, copy, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(fused_metrics, blockwise_metrics, rtol=1e-5)

  def test_default_cut_without_stages_is_even_and_stages_are_respected(self):
    model = bw.build_model(user_networks.small_cnn(), num_classes=10, num_blocks=2)
    self.assertEqual(model.split_points, (2,))
    self.assertEqual(model.arch, 'small_cnn')
    staged = bw.Network(units=user_networks.small_cnn().units, stage_of_unit=(0, 0, 0, 1))
    self.assertEqual(bw.build_model(staged, num_classes=10, num_blocks=2).split_points, (3,))

  def test_checkpoint_restores_bitwise_and_training_goes_on_as_uninterrupted(self):
    model, tx, states = _setup('small_cnn', 2)
    step = bw.make_train_step(model, tx, donate=False)
    batches = [test_step._batch(seed=seed) for seed in range(3)]
    states, _ = step(states, batches[0])
    manager = bw.checkpoint.make_manager(self.create_tempdir().full_path)
    bw.checkpoint.save(manager, 1, states)
    restored, _ = bw.checkpoint.restore(manager, 1, bw.abstract_block_states(model, tx, IMAGE))
    chex.assert_trees_all_equal(restored, jax.device_get(states))
    for batch in batches[1:]:
      states, _ = step(states, batch)
      restored, _ = step(restored, batch)
    self.assertEqual(bw.checkpoint.params_digest(restored), bw.checkpoint.params_digest(states))

  def test_heads_read_vectors_tokens_and_maps(self):
    pooled = {(2, 5): (2, 5), (2, 3, 5): (2, 5), (2, 3, 4, 5): (2, 5)}
    for shape, expected in pooled.items():
      self.assertEqual(bw.pool_features(jnp.ones(shape)).shape, expected)
      np.testing.assert_allclose(bw.pool_features(jnp.arange(np.prod(shape), dtype=jnp.float32)
                                                  .reshape(shape)).sum(),
                                 jnp.arange(np.prod(shape)).reshape(shape).mean(
                                     axis=tuple(range(1, len(shape) - 1))).sum(), rtol=1e-6)
    for aux_head in ('linear', 'mlp', 'auglocal'):  # An MLP's features are [B, D].
      model = bw.build_model(user_networks.mlp(), num_classes=10, num_blocks=3, aux_head=aux_head)
      tx = bw.make_optimizer('sgd', learning_rate=0.05, total_steps=100)
      states = bw.init_block_states(model, tx, jax.random.key(0), IMAGE)
      _, metrics = bw.make_train_step(model, tx)(states, test_step._batch())
      self.assertEqual(metrics['loss'].shape, (3,))

  def test_a_users_head_class(self):
    model = bw.build_model(user_networks.tiny_token_net(), num_classes=10, num_blocks=2,
                           aux_head=bw.LinearHead)
    self.assertIsInstance(model.blocks[0].head, bw.LinearHead)

  def test_flax_conv_runs_the_library_convolution_and_the_same_values(self):
    if not onednn_conv.available():
      self.skipTest(onednn_conv.unavailable_reason())
    model, _, states = _setup('small_cnn', 1)
    block, state = model.blocks[0], states[0]
    forward = jax.jit(lambda x: block.apply(
        {'params': state.params, 'batch_stats': state.batch_stats}, x, train=False)[0])
    x = test_step._batch()['image']
    self.assertTrue('bwbpf_onednn_conv_forward' in forward.lower(x).compile().as_text(),
                    'the user\'s nn.Conv kept XLA\'s convolution')
    plain = user_networks.small_cnn()
    expected = x
    for i, unit in enumerate(plain.units):
      expected = unit.apply({'params': state.params[f'units_{i}'],
                             'batch_stats': state.batch_stats[f'units_{i}']}, expected, train=False)
    chex.assert_trees_all_close(forward(x), expected, rtol=1e-5, atol=1e-5)
    # Outside a block nothing is intercepted: a plain flax network keeps XLA's convolution.
    plain_forward = jax.jit(lambda x: plain.units[0].apply(
        {'params': state.params['units_0'], 'batch_stats': state.batch_stats['units_0']}, x,
        train=False))
    self.assertFalse('bwbpf_onednn_conv_forward' in plain_forward.lower(x).compile().as_text())

  def test_flax_batch_norm_takes_the_pipelines_statistics_axis(self):
    # Each example on its own 'data' index (as a data row of the pipeline sees its share):
    # under batch_stats_over the user's nn.BatchNorm normalises with the whole batch's
    # statistics, as one call on the whole batch does; without it, with each example's own.
    model, _, states = _setup('small_cnn', 1)
    variables = {'params': states[0].params, 'batch_stats': states[0].batch_stats}
    x = test_step._batch()['image']
    apply = lambda x: model.blocks[0].apply(variables, x, train=True, mutable=['batch_stats'])
    whole, whole_stats = jax.jit(apply)(x)
    # A fresh jit each time: the statistics axis is read when the function is traced.
    per_example = lambda x: jax.jit(jax.vmap(lambda xi: apply(xi[None]), axis_name='data'))(x)
    with layers.batch_stats_over('data'):
      (features, logits), stats = per_example(x)
    chex.assert_trees_all_close((features[:, 0], logits['logits'][:, 0]),
                                (whole[0], whole[1]['logits']), rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda s: s[0], stats), whole_stats,
                                rtol=1e-4, atol=1e-5)
    (alone, _), _ = per_example(x)
    self.assertGreater(float(jnp.max(jnp.abs(alone[:, 0] - whole[0]))), 1e-2)


class BadNetworkTest(parameterized.TestCase):
  """Each mistake a user can make with a network: one UsageError naming the unit, block or index."""

  def _init(self, network, **kwargs):
    model = bw.build_model(network, num_classes=10, **kwargs)
    bw.abstract_block_states(model, bw.make_optimizer('sgd', learning_rate=0.1, total_steps=1),
                             IMAGE)

  def test_unit_without_train(self):
    with self.assertRaisesRegex(UsageError, r'^unit 1 \(NoTrainArgument\) does not accept train'):
      self._init(user_networks.without_train(), num_blocks=2)

  def test_units_that_do_not_chain_name_the_failing_unit(self):
    with self.assertRaisesRegex(UsageError, r'^unit 1 \(ConvBN\) fails on an input of shape '
                                r'\[1, 8\]'):
      self._init(user_networks.not_chaining(), num_blocks=1)

  @parameterized.parameters('dgl', 'infopro')
  def test_head_that_cannot_read_tokens(self, aux_head):
    with self.assertRaisesRegex(UsageError, rf"^block 1's head .* cannot read its features of "
                                rf"shape \[1, 16, 16\]: the {aux_head} head reads \[B, H, W, C\]"):
      self._init(user_networks.tiny_token_net(), num_blocks=2, aux_head=aux_head)

  def test_reconstruction_loss_on_tokens(self):
    with self.assertRaisesRegex(UsageError, 'reconstruction decoder head reads'):
      self._init(user_networks.tiny_token_net(), num_blocks=2, local_loss='xent_recon')

  def test_split_points_and_block_counts(self):
    with self.assertRaisesRegex(UsageError, r'between 1 and 3 \(the network has 4 units\)'):
      bw.build_model(user_networks.small_cnn(), num_classes=10, split_points=(2, 4))
    with self.assertRaisesRegex(UsageError, 'strictly increasing'):
      bw.build_model(user_networks.small_cnn(), num_classes=10, split_points=(3, 2))
    with self.assertRaisesRegex(UsageError, 'cannot cut 4 units into 5 blocks'):
      bw.build_model(user_networks.small_cnn(), num_classes=10, num_blocks=5)

  def test_width_of_a_users_network_is_refused(self):
    with self.assertRaisesRegex(UsageError, 'width=0.5 scales the built-in networks'):
      bw.build_model(user_networks.small_cnn(), num_classes=10, width=0.5)

  def test_import_specs(self):
    self.assertEqual(bw.network.import_network('user_networks:small_cnn').name, 'small_cnn')
    with self.assertRaisesRegex(UsageError, "cannot import 'no_such_module'"):
      bw.network.import_network('no_such_module:net')
    with self.assertRaisesRegex(UsageError, "has no function 'nothing'"):
      bw.network.import_network('user_networks:nothing')
    with self.assertRaisesRegex(UsageError, r'not_a_network\(\) returned a list, not a '):
      bw.network.import_network('user_networks:not_a_network')
    with self.assertRaisesRegex(UsageError, 'unknown architecture'):
      bw.build_model('vgg7', num_classes=10)

  def test_network_values_are_checked(self):
    with self.assertRaisesRegex(UsageError, 'at least one unit'):
      bw.Network(units=())
    with self.assertRaisesRegex(UsageError, 'unit 1 of the network is a function'):
      bw.Network(units=(user_networks.DenseUnit(4), lambda x, train: x))
    with self.assertRaisesRegex(UsageError, 'stage_of_unit has 1 entries for 2 units'):
      bw.Network(units=(user_networks.DenseUnit(4),) * 2, stage_of_unit=(0,))

  def test_auglocal_refuses_units_that_do_not_say_how_they_downsample(self):
    # 3 following units, depth 2: one is skipped, so its downsampling would have to move.
    network = bw.Network(units=tuple(user_networks.ConvBN(4) for _ in range(4)))
    with self.assertRaisesRegex(UsageError, 'no `downsamples` attribute'):
      bw.build_model(network, num_classes=10, num_blocks=2, split_points=(1,),
                     aux_head='auglocal')


class PipelineTest(parameterized.TestCase):

  def test_one_stage_pipeline_equals_synchronous_steps(self):
    model, tx, states = _setup('small_cnn', 2)
    batches = _batches(2)
    trained = _pipeline_train(model, tx, states, batches, num_stages=1, num_rows=1)
    chex.assert_trees_all_close(trained, _synchronous(model, tx, states, batches),
                                rtol=1e-4, atol=1e-5)

  def test_states_of_every_dtype_pack_exactly(self):
    tree = {'bf16': jnp.asarray([1.5, -2.25, 3e-3], jnp.bfloat16),
            'f16': jnp.asarray([65000.0, -1e-3], jnp.float16),
            'i8': jnp.asarray([-128, 127], jnp.int8),
            'u32': jnp.asarray([0, 2**32 - 1, 123456789], jnp.uint32),
            'count': jnp.asarray(2**24 - 1, jnp.int32), 'f32': jnp.asarray([np.pi], jnp.float32)}
    packing = parallel.pipeline._Packing.of(tree)
    vector = packing.pack(tree, packing.size + 3)
    for unpacked in (packing.unpack(vector), packing.unpack(np.asarray(vector))):
      for name, leaf in tree.items():
        self.assertEqual(unpacked[name].dtype, leaf.dtype, name)
        np.testing.assert_array_equal(np.asarray(unpacked[name]), np.asarray(leaf), name)
    with self.assertRaisesRegex(UsageError, 'cannot hold'):
      parallel.pipeline._Packing.of({'f64': np.zeros(2, np.float64)})

  def test_multi_device_tests_on_8_fake_cpu_devices(self):
    run_on_fake_devices(self, __file__, MultiDeviceTest)


def _batches(count, size=16, seed=0):
  rng = np.random.default_rng(seed)
  return [{'image': rng.normal(size=(size,) + IMAGE).astype(np.float32),
           'label': rng.integers(0, 10, size).astype(np.int32)} for _ in range(count)]


def _synchronous(model, tx, states, batches, num_microbatches=2):
  step = bw.make_blockwise_train_step(model, tx, donate=False)
  for batch in batches:
    for microbatch in parallel.split_microbatches(batch, num_microbatches):
      states, _ = step(states, microbatch)
  return jax.device_get(states)


def _pipeline_train(model, tx, states, batches, *, num_stages, num_rows, batch_norm='global'):
  from parallel_worker import same_microbatches_on_rows  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_pipeline_mesh(num_stages, jax.devices()[:num_stages * num_rows])
  plan = parallel.make_stage_plan(model, tx, IMAGE, num_stages)
  pipeline = parallel.StagePipeline(model, tx, plan, mesh, num_microbatches=2,
                                    global_batch_size=16, batch_norm=batch_norm)
  state = pipeline.init(states)
  for batch in batches:
    state, _ = pipeline.step(state, pipeline.shard_batch(
        same_microbatches_on_rows(batch, 2, num_rows)))
  state, _ = pipeline.drain(state)
  return pipeline.host_block_states(state.stages)


class MultiDeviceTest(parameterized.TestCase):
  """Needs 8 devices; see `PipelineTest.test_multi_device_tests_on_8_fake_cpu_devices`."""

  def setUp(self):
    super().setUp()
    if jax.device_count() < NUM_DEVICES:
      self.skipTest(f'needs {NUM_DEVICES} devices, found {jax.device_count()}')

  @parameterized.parameters(*NETWORKS)
  def test_data_parallel_step_equals_one_device(self, name):
    model, tx, states = _setup(name, 2)
    mesh = parallel.make_mesh(NUM_DEVICES)
    sharded = parallel.make_data_parallel_train_step(model, tx, mesh)
    single = bw.make_train_step(model, tx, donate=False)
    sharded_states = parallel.replicate(states, mesh)
    for seed in range(2):
      batch = test_step._batch(seed=seed)
      sharded_states, _ = sharded(sharded_states, parallel.shard_batch(batch, mesh))
      states, _ = single(states, batch)
    chex.assert_trees_all_close(sharded_states, states, rtol=1e-5, atol=1e-5)

  @parameterized.parameters(*NETWORKS)
  def test_stage_pipeline_equals_synchronous_steps(self, name):
    # Two data rows with global statistics: the user's nn.BatchNorm must average over rows.
    model, tx, states = _setup(name, 2)
    batches = _batches(2)
    expected = _synchronous(model, tx, states, batches)
    for rows in (1, 2):
      trained = _pipeline_train(model, tx, states, batches, num_stages=2, num_rows=rows)
      chex.assert_trees_all_close(trained, expected, rtol=1e-4, atol=1e-5)


if __name__ == '__main__':
  absltest.main()
