"""parallel.py: data-parallel and block-parallel steps equal the single-device ones.

Multi-device tests need 8 devices. JAX fixes its device count when it starts,
and this session started it with one CPU device (tests/conftest.py), so
tests/test_multi_device.py runs `MultiDeviceTest` in a pytest process of its
own with 8 fake CPU devices; where 8 devices exist already (a TPU host, or that
process), `MultiDeviceTest` runs directly. The
multi-host test starts two worker processes (tests/parallel_worker.py) that
talk over loopback only.
"""

import functools
import importlib.util
import itertools
import subprocess
import sys
import tempfile

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bwbpf_jax as bw
from benchmarks import host_dispatch
from bwbpf_jax import parallel
from bwbpf_jax import step as step_lib
from bwbpf_jax.errors import UsageError
import eval_cases
from fake_devices import (NUM_DEVICES, REPO, SUBPROCESS_TIMEOUT_S, WORKER,
                          run_workers, subprocess_env)

IMAGE = (16, 16, 3)


def _batch(size=16, seed=0):
  """A host (numpy) batch, as the data pipeline yields it."""
  rng = np.random.default_rng(seed)
  return {'image': rng.normal(size=(size,) + IMAGE).astype(np.float32),
          'label': rng.integers(0, 10, size).astype(np.int32)}


def _setup(num_blocks, mode='bwbpf'):
  """(model, tx, fresh copy of the initial block states); each configuration is built once."""
  model, tx, states = _built(num_blocks, mode)
  return model, tx, _copy(states)


@functools.lru_cache(maxsize=None)
def _model(num_blocks, mode='bwbpf'):
  model = bw.build_model('vgg11', num_classes=10, num_blocks=num_blocks, mode=mode, width=0.125)
  return model, bw.make_optimizer('sgd', learning_rate=0.05, total_steps=100)


@functools.lru_cache(maxsize=None)
def _built(num_blocks, mode):
  model, tx = _model(num_blocks, mode)
  return model, tx, bw.init_block_states(model, tx, jax.random.key(0), IMAGE)


def _copy(tree):
  return jax.tree_util.tree_map(jnp.copy, tree)


class SplitPointsTest(parameterized.TestCase):

  @parameterized.parameters(
      ([1, 2, 3, 4, 5], 2, (3,)),        # [1 2 3 | 4 5]: 6, 9; the other cuts give 10 or more.
      ([1, 2, 3, 4, 5], 3, (3, 4)),      # 6, 4, 5.
      ([5, 1, 1, 1, 1, 1], 2, (1,)),     # 5, 5.
      ([1, 1, 1, 1], 3, (1, 2)),         # Max 2 three ways; the earliest cuts win.
      ([4, 1, 1, 1, 1], 4, (1, 2, 3)),   # The 4 bounds it; then earliest cuts.
      ([7, 3], 1, ()),
      ([2, 2, 2], 3, (1, 2)))
  def test_balanced_split_points(self, costs, num_blocks, expected):
    self.assertEqual(parallel.balanced_split_points(costs, num_blocks), expected)

  def test_balanced_split_points_minimise_the_largest_block_by_brute_force(self):
    costs = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    for num_blocks in range(1, 6):
      points = parallel.balanced_split_points(costs, num_blocks)
      best = min(_largest_block(costs, cuts)
                 for cuts in itertools.combinations(range(1, len(costs)), num_blocks - 1))
      self.assertLen(points, num_blocks - 1)
      self.assertEqual(_largest_block(costs, points), best)

  def test_balanced_split_points_rejects_impossible_requests(self):
    with self.assertRaisesRegex(UsageError, 'cannot cut 2 units into 3 blocks'):
      parallel.balanced_split_points([1, 1], 3)
    with self.assertRaisesRegex(UsageError, 'non-negative'):
      parallel.balanced_split_points([1, -1], 2)

  def test_projected_pipeline_speedup(self):
    self.assertEqual(parallel.projected_pipeline_speedup([1.0, 2.0, 3.0]), 2.0)  # 6 / 3.
    self.assertEqual(parallel.projected_pipeline_speedup([2.0, 2.0, 2.0, 2.0]), 4.0)
    # M = 4: 4 * 6 / (6 + 3 * 3) = 1.6, the fill and drain of the pipeline included.
    self.assertAlmostEqual(parallel.projected_pipeline_speedup([1.0, 2.0, 3.0], 4), 1.6)
    with self.assertRaisesRegex(UsageError, 'not all zero'):
      parallel.projected_pipeline_speedup([0.0, 0.0])


def _largest_block(costs, cuts):
  bounds = (0,) + tuple(cuts) + (len(costs),)
  return max(sum(costs[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))


class SingleProcessTest(parameterized.TestCase):

  def test_placement_is_round_robin(self):
    model, _ = _model(3)
    self.assertEqual(host_dispatch.placement(model, ['a', 'b']), ('a', 'b', 'a'))
    self.assertEqual(host_dispatch.placement(model, ['a', 'b', 'c', 'd']), ('a', 'b', 'c'))
    local = jax.local_devices()
    self.assertEqual(host_dispatch.placement(model), tuple(local[k % len(local)] for k in range(3)))

  def test_mesh_larger_than_the_devices_is_a_usage_error(self):
    self.assertEqual(parallel.make_mesh().shape, {'data': jax.device_count()})
    with self.assertRaisesRegex(UsageError, 'available'):
      parallel.make_mesh(jax.device_count() + 1)

  @parameterized.parameters('deep_supervision', 'bp')
  def test_block_parallel_refuses_modes_with_cross_block_gradients(self, mode):
    model, tx = _model(2, mode)
    with self.assertRaisesRegex(UsageError, 'isolated blocks'):
      host_dispatch.make_block_parallel_train_step(model, tx)

  def test_block_parallel_refuses_uneven_microbatches(self):
    model, tx, states = _setup(2)
    step = host_dispatch.make_block_parallel_train_step(model, tx, num_microbatches=3)
    with self.assertRaisesRegex(UsageError, '16 examples cannot be split into 3'):
      step(states, _batch())

  def test_per_block_step_times_are_medians_of_the_clock(self):
    model, tx, states = _setup(2)
    # Per block, three timed calls of (end - start): 3, 1, 2 for block 0 and 5, 7, 6 for block 1.
    ticks = iter([0, 3, 10, 11, 20, 22, 30, 35, 40, 47, 50, 56])
    times = parallel.per_block_step_times(model, tx, states, _batch(size=4), repeats=3,
                                          clock=lambda: next(ticks))
    self.assertEqual(times, (2, 6))

  def test_initialize_distributed_is_a_no_op_for_one_process(self):
    self.assertEqual(parallel.initialize_distributed(num_processes=1), (0, 1))
    self.assertEqual(parallel.process_info(), (0, 1))
    # JAX runs in this process already: it stays one process (a second run in a notebook).
    self.assertEqual(parallel.initialize_distributed(), (0, 1))
    # With no arguments and no cluster around, JAX must not be touched (fresh process).
    code = ('from bwbpf_jax import parallel; import jax; '
            'print(parallel.initialize_distributed(), jax.distributed.is_initialized())')
    result = subprocess.run([sys.executable, '-c', code], env=subprocess_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertEqual(result.stdout.strip().splitlines()[-1], '(0, 1) False')

  @pytest.mark.slow
  def test_two_processes_train_as_one_on_the_global_batch(self):
    spec = importlib.util.spec_from_file_location('parallel_worker', WORKER)
    parallel_worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parallel_worker)
    with tempfile.TemporaryDirectory() as out_dir:
      reports = run_workers(out_dir, num_processes=2, local_devices=2)
    self.assertEqual([r['process_index'] for r in reports], [0, 1])
    self.assertEqual({(r['process_count'], r['global_devices']) for r in reports}, {(2, 4)})
    self.assertEqual(reports[0]['digest'], reports[1]['digest'])
    trained = reports[0]['params']

    # The same training in this process, on one device and the whole global batch; the
    # 4 devices' partial sums and all-reduces add in another order.
    model, tx, states, batches = parallel_worker.experiment()
    train_step = bw.make_train_step(model, tx)
    for batch in batches:
      states, _ = train_step(states, batch)
    chex.assert_trees_all_close(trained, parallel_worker.params_leaves(states),
                                rtol=1e-5, atol=1e-5)


class MultiDeviceTest(parameterized.TestCase):
  """Needs 8 devices; tests/test_multi_device.py runs it on 8 fake CPU devices."""

  def setUp(self):
    super().setUp()
    if jax.device_count() < NUM_DEVICES:
      self.skipTest(f'needs {NUM_DEVICES} devices, found {jax.device_count()}')

  def test_data_parallel_step_equals_single_device_step(self):
    model, tx, states = _setup(2)
    mesh = parallel.make_mesh(NUM_DEVICES)
    sharded_step = parallel.make_data_parallel_train_step(model, tx, mesh)
    single_step = bw.make_train_step(model, tx)
    sharded_states, single_states = parallel.replicate(states, mesh), _copy(states)
    for seed in range(2):
      batch = parallel.shard_batch(_batch(seed=seed), mesh)
      self.assertEqual(batch['image'].sharding, parallel.data_sharding(mesh))
      self.assertEqual(batch['image'].addressable_shards[0].data.shape, (2,) + IMAGE)
      sharded_states, sharded_metrics = sharded_step(sharded_states, batch)
      single_states, single_metrics = single_step(single_states, _batch(seed=seed))
    for leaf in jax.tree_util.tree_leaves(sharded_states):
      self.assertEqual(leaf.sharding, parallel.replicated_sharding(mesh))
    # Per-device partial sums, then an all-reduce: float32 sums in another order.
    chex.assert_trees_all_close(sharded_states, single_states, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(sharded_metrics, single_metrics, rtol=1e-5)

    # Evaluation: 8 real rows, then 8 padded rows (on the last 4 devices) that each head
    # would get right if the mask were lost; the sums must be the real rows' alone, as the
    # single-device step gives them without padding.
    sharded_eval = parallel.make_data_parallel_eval_step(model, mesh)
    single_eval = bw.make_eval_step(model)
    evaluate = lambda batch: sharded_eval(sharded_states, parallel.shard_batch(batch, mesh))
    case = eval_cases.masked_eval_case(
        evaluate, model, _batch(size=8, seed=2), num_padded=8,
        reference=lambda batch: single_eval(single_states, batch))
    chex.assert_trees_all_close(evaluate(case.batch), case.expected, rtol=1e-5)

  def test_sharded_blockwise_step_equals_single_device_blockwise_step(self):
    model, tx, states = _setup(2)
    mesh = parallel.make_mesh(NUM_DEVICES)
    sharded_step = parallel.make_data_parallel_blockwise_train_step(model, tx, mesh)
    single_step = bw.make_blockwise_train_step(model, tx)
    sharded_states, single_states = parallel.replicate(states, mesh), _copy(states)
    for seed in range(2):
      sharded_states, sharded_metrics = sharded_step(
          sharded_states, parallel.shard_batch(_batch(seed=seed), mesh))
      single_states, single_metrics = single_step(single_states, _batch(seed=seed))
    for leaf in jax.tree_util.tree_leaves(sharded_states):
      self.assertEqual(leaf.sharding, parallel.replicated_sharding(mesh))
    chex.assert_trees_all_close(sharded_states, single_states, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(sharded_metrics, single_metrics, rtol=1e-5)
    with self.assertRaisesRegex(UsageError, 'multiple of 8'):
      sharded_step(sharded_states, _batch(size=12))

  def test_gradient_isolation_holds_through_the_sharded_function(self):
    model, _, states = _setup(2)
    mesh = parallel.make_mesh(NUM_DEVICES)
    stats = tuple(s.batch_stats for s in states)

    def per_loss_grads(params, batch):
      losses = lambda p: step_lib.network_loss(model, p, stats, batch['image'],
                                               batch['label'])[1][0]
      return jax.jacrev(losses)(params)  # Leaves [K, ...]: row k is loss k's gradient.

    sharded = jax.jit(per_loss_grads, in_shardings=(parallel.replicated_sharding(mesh),
                                                    parallel.data_sharding(mesh)))
    grads = sharded(parallel.replicate(tuple(s.params for s in states), mesh),
                    parallel.shard_batch(_batch(), mesh))
    # Exact zeros: block 1's loss (through BatchNorm over the global batch) reaches no
    # parameter of block 0; each loss reaches its own block.
    for k in range(model.num_blocks):
      for j in range(model.num_blocks):
        row = [np.asarray(leaf[k]) for leaf in jax.tree_util.tree_leaves(grads[j])]
        self.assertEqual(all(np.all(g == 0) for g in row), j != k, f'loss {k}, block {j}')

  def test_indivisible_batch_is_a_usage_error(self):
    model, tx, states = _setup(2)
    mesh = parallel.make_mesh(NUM_DEVICES)
    with self.assertRaisesRegex(UsageError, '12 examples cannot be split evenly over 8'):
      parallel.shard_batch(_batch(size=12), mesh)
    step = parallel.make_data_parallel_train_step(model, tx, mesh)
    with self.assertRaisesRegex(UsageError, 'multiple of 8'):
      step(parallel.replicate(states, mesh), _batch(size=12))

  def test_block_parallel_pipeline_equals_blockwise_steps_on_the_microbatches(self):
    model, tx, states = _setup(4)
    blockwise = bw.make_blockwise_train_step(model, tx)
    expected, expected_metrics = _copy(states), []
    for microbatch in parallel.split_microbatches(_batch(), 4):
      expected, step_metrics = blockwise(expected, microbatch)
      expected_metrics.append(step_metrics)
    expected_metrics = jax.tree_util.tree_map(lambda *m: jnp.mean(jnp.stack(m), 0),
                                              *expected_metrics)

    # One device per block, states placed beforehand.
    devices = host_dispatch.placement(model, jax.devices()[:NUM_DEVICES])
    self.assertEqual(devices, tuple(jax.devices()[:4]))
    placed = host_dispatch.place_block_states(_copy(states), devices)
    pipelined, metrics = host_dispatch.make_block_parallel_train_step(
        model, tx, jax.devices()[:NUM_DEVICES], num_microbatches=4)(placed, _batch())
    for state, device in zip(pipelined, devices):
      for leaf in jax.tree_util.tree_leaves(state):
        self.assertEqual(leaf.devices(), {device})
    chex.assert_trees_all_close(host_dispatch.gather_block_states(pipelined), expected,
                                rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(metrics, expected_metrics, rtol=1e-5)

    # Two devices shared round-robin; states given on the default device move themselves.
    shared, _ = host_dispatch.make_block_parallel_train_step(
        model, tx, jax.devices()[:2], num_microbatches=4)(_copy(states), _batch())
    self.assertEqual([jax.tree_util.tree_leaves(s)[0].devices() for s in shared],
                     [{jax.devices()[k % 2]} for k in range(4)])
    chex.assert_trees_all_close(host_dispatch.gather_block_states(shared), expected,
                                rtol=1e-5, atol=1e-6)


if __name__ == '__main__':
  from absl.testing import absltest
  absltest.main()
