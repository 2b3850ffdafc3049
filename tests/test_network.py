"""A user's own network through the front door: `bwbpf_jax.Network` and `--arch=module:function`.

The networks are written with `flax.linen` only, in tests/user_networks.py:
a 4-unit CNN (nn.Conv, nn.BatchNorm, a residual and a strided unit) and a
4-unit token network (patch-embedding stem, attention and MLP on [B, T, D]),
plus an MLP whose features are vectors [B, D].
"""

import json
import os
import subprocess
import sys

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
import fake_devices
from fake_devices import NUM_DEVICES
import test_main
import test_step
import user_networks

IMAGE = test_step.IMAGE  # (16, 16, 3)
NETWORKS = {'small_cnn': user_networks.small_cnn, 'tiny_token_net': user_networks.tiny_token_net}


def _setup(name, num_blocks, mode='bwbpf', aux_head='linear', seed=0):
  model = bw.build_model(NETWORKS[name](), num_classes=10, num_blocks=num_blocks, mode=mode,
                         aux_head=aux_head)
  tx = bw.make_optimizer('sgd', learning_rate=0.05, total_steps=100)
  return model, tx, bw.init_block_states(model, tx, jax.random.key(seed), IMAGE)


def _check_isolation(test, name, aux_head, num_blocks=4):
  # auglocal at K=2: its copies are the block's 2 later units, none skipped, which a
  # network that says nothing of its resolution allows (see the auglocal refusal below).
  num_blocks = 2 if aux_head == 'auglocal' else num_blocks
  test_step.check_bwbpf_isolation(test, _setup(name, num_blocks, aux_head=aux_head))


class FrontDoorTest(parameterized.TestCase):
  """One case of each kind in the fast tier; the rest in `EveryHeadAndEngineTest` (slow)."""

  @parameterized.parameters(('small_cnn', 'linear'), ('tiny_token_net', 'mlp'))
  def test_bwbpf_heads_are_isolated(self, name, aux_head):
    _check_isolation(self, name, aux_head, num_blocks=2)

  def test_bp_equals_jax_grad_of_the_plain_network(self):
    test_step.check_plain_backprop(self, NETWORKS['small_cnn'](), 2, width=1.0)

  def test_default_cut_without_stages_is_even_and_stages_are_respected(self):
    model = bw.build_model(user_networks.small_cnn(), num_classes=10, num_blocks=2)
    self.assertEqual(model.split_points, (2,))
    self.assertEqual(model.arch, 'small_cnn')
    staged = bw.Network(units=user_networks.small_cnn().units, stage_of_unit=(0, 0, 0, 1))
    self.assertEqual(bw.build_model(staged, num_classes=10, num_blocks=2).split_points, (3,))

  def test_heads_read_vectors_tokens_and_maps(self):
    pooled = {(2, 5): (2, 5), (2, 3, 5): (2, 5), (2, 3, 4, 5): (2, 5)}
    for shape, expected in pooled.items():
      self.assertEqual(bw.pool_features(jnp.ones(shape)).shape, expected)
      np.testing.assert_allclose(bw.pool_features(jnp.arange(np.prod(shape), dtype=jnp.float32)
                                                  .reshape(shape)).sum(),
                                 jnp.arange(np.prod(shape)).reshape(shape).mean(
                                     axis=tuple(range(1, len(shape) - 1))).sum(), rtol=1e-6)
    for aux_head in ('mlp',):  # An MLP's features are [B, D] (all heads: the slow tier).
      model = bw.build_model(user_networks.mlp(), num_classes=10, num_blocks=2, aux_head=aux_head)
      tx = bw.make_optimizer('sgd', learning_rate=0.05, total_steps=100)
      states = bw.init_block_states(model, tx, jax.random.key(0), IMAGE)
      _, metrics = bw.make_train_step(model, tx)(states, test_step._batch())
      self.assertEqual(metrics['loss'].shape, (2,))

  def test_costs_and_both_cuts_read_the_network(self):
    network = user_networks.small_cnn()
    activations = bw.cost.unit_activation_bytes(network, IMAGE, batch_size=8)
    self.assertLen(activations, 4)
    self.assertGreater(activations[0], activations[3])  # 16x16 maps against 8x8 after the stride.
    points = bw.cost.activation_balanced_split_points(network, 2, IMAGE, batch_size=8)
    self.assertLen(points, 1)
    model = bw.build_model(network, num_classes=10, split_points=points)
    flops = bw.cost.flop_counts(model, IMAGE)
    self.assertTrue(all(f > 0 for f in flops['backbone'] + flops['head']))
    with self.assertRaisesRegex(UsageError, r'^unit 1 \(NoTrainArgument\) does not accept'):
      bw.cost.unit_activation_bytes(user_networks.without_train(), IMAGE, batch_size=8)

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


@pytest.mark.slow
class EveryHeadAndEngineTest(parameterized.TestCase):
  """FrontDoorTest's checks on both networks, every head that reads them, and every step."""

  @parameterized.product(name=tuple(NETWORKS), aux_head=('linear', 'mlp', 'auglocal'))
  def test_bwbpf_every_head_is_isolated(self, name, aux_head):
    _check_isolation(self, name, aux_head)

  @parameterized.parameters('linear', 'auglocal')
  def test_every_head_trains_on_vectors(self, aux_head):
    model = bw.build_model(user_networks.mlp(), num_classes=10, num_blocks=3, aux_head=aux_head)
    tx = bw.make_optimizer('sgd', learning_rate=0.05, total_steps=100)
    states = bw.init_block_states(model, tx, jax.random.key(0), IMAGE)
    _, metrics = bw.make_train_step(model, tx)(states, test_step._batch())
    self.assertTrue(np.all(np.isfinite(np.asarray(metrics['loss']))))

  @parameterized.parameters(*NETWORKS)
  def test_deep_supervision_reaches_earlier_blocks(self, name):
    test_step.check_deep_supervision(self, _setup(name, 2, mode='deep_supervision'))

  @parameterized.parameters(*NETWORKS)
  def test_bp_equals_jax_grad_of_the_plain_network(self, name):
    test_step.check_plain_backprop(self, NETWORKS[name](), 2, width=1.0)

  @parameterized.parameters(*NETWORKS)
  def test_blockwise_step_equals_fused_step(self, name):
    test_step.check_blockwise_equals_fused(_setup(name, 4), rtol=1e-5, atol=1e-6)

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

  @pytest.mark.slow
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


def check_data_parallel_equals_one_device(model, tx, states):
  """Two data-parallel steps over every device equal two one-device steps (float32 sums)."""
  mesh = parallel.make_mesh(NUM_DEVICES)
  sharded = parallel.make_data_parallel_train_step(model, tx, mesh)
  single = bw.make_train_step(model, tx, donate=False)
  # A copy: replicating may reuse a buffer of `states`, which the sharded step donates.
  sharded_states = parallel.replicate(jax.tree_util.tree_map(jnp.copy, states), mesh)
  for seed in range(2):
    batch = test_step._batch(seed=seed)
    sharded_states, _ = sharded(sharded_states, parallel.shard_batch(batch, mesh))
    states, _ = single(states, batch)
  chex.assert_trees_all_close(sharded_states, states, rtol=1e-5, atol=1e-5)


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
  """Needs 8 devices; tests/test_multi_device.py runs it on 8 fake CPU devices."""

  def setUp(self):
    super().setUp()
    if jax.device_count() < NUM_DEVICES:
      self.skipTest(f'needs {NUM_DEVICES} devices, found {jax.device_count()}')

  @parameterized.parameters(*NETWORKS)
  def test_data_parallel_step_equals_one_device(self, name):
    check_data_parallel_equals_one_device(*_setup(name, 2))

  @parameterized.parameters(*NETWORKS)
  def test_stage_pipeline_equals_synchronous_steps(self, name):
    # Two data rows with global statistics: the user's nn.BatchNorm must average over rows.
    # (One row is the pipeline's own case, tests/test_stage_pipeline.py; a mesh compiles anew.)
    model, tx, states = _setup(name, 2)
    batches = _batches(2)
    expected = _synchronous(model, tx, states, batches)
    trained = _pipeline_train(model, tx, states, batches, num_stages=2, num_rows=2)
    chex.assert_trees_all_close(trained, expected, rtol=1e-4, atol=1e-5)


def _user_env(**extra) -> dict:
  """The command line's environment with tests/ importable, where user_networks.py lives."""
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  return {'PYTHONPATH': os.pathsep.join([test_main.REPO, tests_dir]), **extra}


def _results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


# 1437 digits: 44 steps of 32 an epoch; no augmentation or warm-up, so a batch of 32 in
# 2 micro-batches is the same data at the same rates as two batches of 16.
SMALL = ('--dataset=digits', '--num_blocks=2', '--noaugment', '--warmup_epochs=0')


@pytest.mark.slow
class CommandLineTest(absltest.TestCase):
  """`--arch=module:function` through the runner: every engine, resume, errors."""

  def run_ok(self, *flags, env=None):
    proc = test_main.run_main(*SMALL, *flags, env=_user_env(**(env or {})))
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    return proc

  def test_users_cnn_trains_resumes_bitwise_and_runs_the_stage_pipeline(self):
    # One uninterrupted run is both the reference of the resumed run and the synchronous
    # block-wise updates the pipeline must compute: 6 steps of 16 examples, the 3 steps of
    # 2 micro-batches of 16 below.
    cnn = ('--arch=user_networks:small_cnn', '--batch_size=16', '--max_steps=6',
           '--checkpoint_every=0')
    reference = self.create_tempdir().full_path
    proc = self.run_ok(*cnn, f'--workdir={reference}')
    self.assertIn('small_cnn on digits', proc.stdout)
    resumed = self.create_tempdir().full_path
    self.run_ok(*cnn, '--stop_at_step=3', f'--workdir={resumed}')
    proc = self.run_ok(*cnn, f'--workdir={resumed}')
    self.assertIn('resuming at step 3 of 6', proc.stdout)
    self.assertEqual(_results(resumed)['params_digest'], _results(reference)['params_digest'])

    # The stage pipeline as two processes of one device each, on loopback (one process of
    # 2 fake devices is the same program: test_parallel_cli.py runs it for the built-ins).
    processes = self.create_tempdir().full_path
    port = fake_devices.free_port()
    environ = fake_devices.subprocess_env(PYTHONPATH=_user_env()['PYTHONPATH'])
    workers = [subprocess.Popen(
        [sys.executable, '-m', 'experiments.main', *SMALL, '--arch=user_networks:small_cnn',
         '--batch_size=32', '--max_steps=3', '--parallel=blocks', '--microbatches=2',
         '--checkpoint_every=0', f'--workdir={processes}',
         f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
        cwd=test_main.REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    for worker in workers:
      _, stderr = worker.communicate(timeout=fake_devices.SUBPROCESS_TIMEOUT_S)
      self.assertEqual(worker.returncode, 0, stderr[-3000:])
    self.assertEqual((_results(processes)['num_processes'], _results(processes)['mesh']),
                     (2, {'data': 1, 'stage': 2}))
    np.testing.assert_allclose(_results(processes)['block_train_loss'],
                               _results(reference)['block_train_loss'], rtol=1e-4)

  def test_python_runner_takes_a_network_object(self):
    from experiments import config as config_lib  # pylint: disable=g-import-not-at-top
    from experiments import train  # pylint: disable=g-import-not-at-top
    config = config_lib.make_config({'arch': 'user_networks:tiny_token_net', 'num_blocks': 2,
                                     'max_steps': 2, 'batch_size': 32, 'augment': 'none',
                                     'warmup_epochs': 0})
    workdir = self.create_tempdir().full_path
    lines = []
    results = train.train_and_evaluate(config, workdir, log=lines.append,
                                       network=user_networks.tiny_token_net())
    self.assertEqual(len(results['block_test_accuracy']), 2)
    self.assertTrue(any(line.startswith('tiny_token_net on digits') for line in lines), lines)
    self.assertTrue(os.path.exists(os.path.join(workdir, 'checkpoints', '2')))

  def test_token_network_trains_and_bad_networks_are_one_line(self):
    workdir = self.create_tempdir().full_path
    self.run_ok('--arch=user_networks:tiny_token_net', '--aux_head=mlp', '--batch_size=32',
                '--max_steps=2', f'--workdir={workdir}')
    self.assertEqual(len(_results(workdir)['block_test_accuracy']), 2)
    mistakes = {'--arch=no_such_module:net': "cannot import 'no_such_module'",
                '--arch=user_networks:not_a_network': 'returned a list, not a bwbpf_jax.Network',
                '--arch=user_networks:without_train': r'unit 1 \(NoTrainArgument\) does not '
                                                      r'accept train',
                '--arch=user_networks:small_cnn --aux_head=dgl --num_blocks=5':
                    'cannot cut 4 units into 5 blocks',
                '--arch=vgg7': 'unknown --arch=vgg7',
                '--arch=user_networks:small_cnn --width=0.5': '--width shapes the built-in'}
    workdirs = [os.path.join(self.create_tempdir().full_path, 'run') for _ in mistakes]
    procs = test_main.run_main_cases(
        [(*SMALL, *flags.split(), '--max_steps=1', f'--workdir={workdir}')
         for flags, workdir in zip(mistakes, workdirs)], env=_user_env())
    for (flags, message), proc, workdir in zip(mistakes.items(), procs, workdirs):
      self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
      lines = [line for line in proc.stderr.splitlines() if line.strip()]
      self.assertLen(lines, 1, proc.stderr)
      self.assertRegex(lines[0], message)
      self.assertFalse(os.path.exists(workdir), f'{flags} wrote {workdir}')


if __name__ == '__main__':
  absltest.main()
