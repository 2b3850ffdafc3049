"""parallel/pipeline.py: the SPMD stage pipeline computes the synchronous block-wise updates.

The pipeline and the synchronous block-wise step are different XLA programs,
so their float32 results agree to rounding, not bit for bit (about 1e-7
relative after one update; BatchNorm on small micro-batches amplifies it over
several). Comparisons within one program (isolation, bubbles) are exact.

Multi-device tests need 8 devices: tests/test_multi_device.py runs
`MultiDeviceTest` in a pytest process of its own with 8 fake CPU devices. The 2-process test starts
tests/parallel_worker.py processes that talk over loopback only.
"""

import functools
import os
import re
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bwbpf_jax as bw
from benchmarks import hlo
from bwbpf_jax import checkpoint
from bwbpf_jax import parallel
from bwbpf_jax.errors import UsageError
from fake_devices import NUM_DEVICES, run_workers
from parallel_worker import same_microbatches_on_rows

IMAGE = (16, 16, 3)
# Agreement of two programs' float32 trajectories over a few updates (see the docstring).
RTOL, ATOL = 1e-4, 1e-5


@functools.lru_cache(maxsize=None)
def _built(num_blocks=4):
  model = bw.build_model('vgg11', num_classes=10, num_blocks=num_blocks, width=0.125)
  tx = bw.make_optimizer('sgd', learning_rate=0.05, total_steps=100)
  return model, tx, bw.init_block_states(model, tx, jax.random.key(0), IMAGE)


def _batches(count, size=16, seed=0):
  rng = np.random.default_rng(seed)
  return [{'image': rng.normal(size=(size,) + IMAGE).astype(np.float32),
           'label': rng.integers(0, 10, size).astype(np.int32)} for _ in range(count)]


def _synchronous(model, tx, states, batches, num_microbatches):
  """The block-wise step fed every batch's micro-batches in turn: what the pipeline computes."""
  step = bw.make_blockwise_train_step(model, tx, donate=False)
  for batch in batches:
    for microbatch in parallel.split_microbatches(batch, num_microbatches):
      states, _ = step(states, microbatch)
  return jax.device_get(states)


@functools.lru_cache(maxsize=None)
def _pipeline(num_stages, num_rows, num_microbatches=2, global_batch_size=16,
              batch_norm='global', skip_nonfinite=False):
  """One compiled pipeline per configuration, shared by the tests.

  Global batch statistics by default: then any number of data rows computes the
  synchronous step's updates on the global micro-batches, which the tests compare.
  """
  model, tx, _ = _built()
  mesh = parallel.make_pipeline_mesh(num_stages, jax.devices()[:num_stages * num_rows])
  plan = parallel.make_stage_plan(model, tx, IMAGE, num_stages)
  return parallel.StagePipeline(model, tx, plan, mesh, num_microbatches=num_microbatches,
                                global_batch_size=global_batch_size, batch_norm=batch_norm,
                                skip_nonfinite=skip_nonfinite)


def _train(states, batches, *, num_stages, num_rows, poison_bubbles=False, **options):
  """Pipeline-trains on `batches` (2 micro-batches each), drains; returns host block states."""
  pipeline = _pipeline(num_stages, num_rows, **options)
  state = pipeline.init(states)
  if poison_bubbles:  # What the stages read in bubble slots: it must change nothing.
    state = state.replace(activations=jnp.full_like(state.activations, jnp.nan))
  for batch in batches:
    batch = same_microbatches_on_rows(batch, 2, num_rows)
    state, _ = pipeline.step(state, pipeline.shard_batch(batch))
  state, _ = pipeline.drain(state)
  return pipeline.host_block_states(state.stages)


class OneDeviceTest(parameterized.TestCase):

  def test_one_stage_of_all_blocks_equals_synchronous_steps(self):
    model, tx, states = _built()
    batches = _batches(2)
    trained = _train(states, batches, num_stages=1, num_rows=1)
    self.assertEqual(_pipeline(1, 1).plan.stage_blocks, ((0, 1, 2, 3),))
    chex.assert_trees_all_close(trained, _synchronous(model, tx, states, batches, 2),
                                rtol=RTOL, atol=ATOL)

  def test_packing_round_trips_exactly_and_reports_its_padding(self):
    model, tx, states = _built()
    plan = parallel.make_stage_plan(model, tx, IMAGE, 4)
    sizes = [packing.size for packing in plan.state_packings]
    self.assertEqual(plan.state_length, max(sizes))
    self.assertAlmostEqual(plan.padding_overhead(), 4 * max(sizes) / sum(sizes) - 1)
    for s, packing in enumerate(plan.state_packings):
      stage_states = (states[s],)
      unpacked = packing.unpack(packing.pack(stage_states, plan.state_length))
      chex.assert_trees_all_equal(unpacked, stage_states)
      chex.assert_trees_all_equal_dtypes(unpacked, stage_states)
    # Each VGG-11 block of two units pools twice: 16x16 -> 4x4 -> 2x2 -> 1x1 (x0.125 widths).
    self.assertEqual(plan.input_shapes, ((16, 16, 3), (4, 4, 16), (2, 2, 32), (1, 1, 64)))
    self.assertEqual(plan.activation_length, 4 * 4 * 16)

  @pytest.mark.slow  # Compiles every block's step for XLA's FLOP counts.
  def test_fewer_stages_than_blocks_groups_the_costliest_blocks_alone(self):
    model, tx, _ = _built()
    plan = parallel.make_stage_plan(model, tx, IMAGE, 2, costs=[1.0, 1.0, 1.0, 5.0])
    self.assertEqual(plan.stage_blocks, ((0, 1, 2), (3,)))
    plan = parallel.make_stage_plan(model, tx, IMAGE, 2)  # By XLA's FLOP counts.
    costs = parallel.block_costs(model, tx, IMAGE)
    self.assertLen(costs, 4)
    self.assertTrue(all(c > 1 for c in costs), costs)
    boundary = len(plan.stage_blocks[0])
    self.assertEqual((boundary,), parallel.balanced_split_points(costs, 2))

  def test_usage_errors(self):
    """The library's refusals name its Python arguments (the command line names flags)."""
    model, tx, _ = _built()
    messages = []

    def refused(pattern, call, *args, **kwargs):
      with self.assertRaisesRegex(UsageError, pattern) as caught:
        call(*args, **kwargs)
      messages.append(str(caught.exception))

    refused(r"^num_stages=5 is not between 1 and the model's 4 blocks$",
            parallel.make_stage_plan, model, tx, IMAGE, 5)
    # A device count the stages do not divide: the counts that work, most stages first.
    refused(r'^num_stages=2 needs a multiple of 2 devices \(one stage each, times the data '
            r'rows\), found 3; use num_stages=3 \(or 1\)$',
            parallel.make_pipeline_mesh, 2, jax.devices()[:1] * 3)
    refused(r'^num_stages=4 needs a multiple of 4 devices .*, found 2; use '
            r'num_stages=2 \(or 1\), or run on 4 accelerators or processes',
            parallel.make_pipeline_mesh, 4, jax.devices()[:1] * 2, max_stages=4)
    refused(r'found 6; use num_stages=3 \(or 2, 1\)$',
            parallel.make_pipeline_mesh, 4, jax.devices()[:1] * 6, max_stages=4)
    # One device: also what gives several.
    refused(r'found 1; use num_stages=1, or run on 2 accelerators .*device_count=2',
            parallel.make_pipeline_mesh, 2, jax.devices()[:1])
    bp_model = bw.build_model('vgg11', num_classes=10, num_blocks=2, width=0.125, mode='bp')
    refused('isolated blocks', parallel.make_stage_plan, bp_model, tx, IMAGE)
    recon_model = bw.build_model('vgg11', num_classes=10, num_blocks=2, width=0.125,
                                 aux_head='infopro', local_loss='xent_recon')
    refused('reconstruction loss', parallel.make_stage_plan, recon_model, tx, IMAGE)
    plan = parallel.make_stage_plan(model, tx, IMAGE, 1)
    mesh = parallel.make_pipeline_mesh(1, jax.devices()[:1])
    refused(r'^global_batch_size=16 cannot be split into num_microbatches=3 equal',
            parallel.StagePipeline, model, tx, plan, mesh, num_microbatches=3,
            global_batch_size=16)
    refused(r'^batch_norm=sideways is not one of rows, global$', parallel.StagePipeline, model,
            tx, plan, mesh, num_microbatches=2, global_batch_size=16, batch_norm='sideways')
    for message in messages:
      self.assertNotIn(' --', message)  # No command-line flags for a Python caller.

  @pytest.mark.slow
  def test_processes_of_two_devices_or_one_equal_one_process(self):
    # One mesh, 2 stages x 2 data rows with global batch statistics, in three topologies
    # against one reference (one process of 4 devices): 2 processes of 2 devices, each
    # holding a data row (every stage), and 4 processes of one CPU device, as on
    # accelerators, where the handoffs and the data all-reduce both cross processes. (2
    # processes of one device, the one-row program, run from the command line in
    # test_network.py's CommandLineTest, against the same pipeline in one process.)
    args = ('--stages=2', '--batch_norm=global')
    runs = {}
    with tempfile.TemporaryDirectory() as out_dir:
      for processes in (1, 2, 4):
        runs[processes] = run_workers(os.path.join(out_dir, str(processes)),
                                      num_processes=processes, local_devices=4 // processes,
                                      engine='pipeline', extra_args=args)
    one, two, four = runs[1], runs[2], runs[4]
    self.assertEqual([r['global_devices'] for r in one + two + four], [4] * 7)
    self.assertEqual([r['mesh'] for r in one + two + four], [[2, 2]] * 7)
    # Each of 2 processes holds one data row, every stage, and the whole result.
    self.assertEqual([sorted(r['stages']) for r in two], [[0, 1]] * 2)
    self.assertEqual(two[0]['digest'], two[1]['digest'])
    for process in two:
      # Different collectives (in-process against gloo) may sum in another order.
      np.testing.assert_allclose(process['loss'], one[0]['loss'], rtol=1e-5)
      chex.assert_trees_all_close(process['stages'], one[0]['stages'], rtol=RTOL, atol=ATOL)
    # Each of 4 processes holds only its own stage, and digests agree without a gather.
    self.assertEqual([sorted(r['stages']) for r in four], [[0], [1]] * 2)
    self.assertEqual({r['digest'] for r in four}, {four[0]['digest']})
    for r in four:
      np.testing.assert_allclose(r['loss'], one[0]['loss'], rtol=1e-4)
      stage = next(iter(r['stages']))
      np.testing.assert_allclose(r['stages'][stage], one[0]['stages'][stage],
                                 rtol=RTOL, atol=ATOL)


def _stage_digests(pipeline, state):
  return [bytes(d) for d in pipeline.block_summaries(state.stages,
                                                     checkpoint.block_params_digest)]


@pytest.mark.slow
class MultiDeviceTest(parameterized.TestCase):
  """Needs 8 devices; tests/test_multi_device.py runs it on 8 fake CPU devices."""

  def setUp(self):
    super().setUp()
    if jax.device_count() < NUM_DEVICES:
      self.skipTest(f'needs {NUM_DEVICES} devices, found {jax.device_count()}')

  def test_one_block_per_stage_equals_synchronous_steps_and_rows_agree(self):
    model, tx, states = _built()
    batches = _batches(2)
    expected = _synchronous(model, tx, states, batches, 2)
    one_row = _train(states, batches, num_stages=4, num_rows=1)
    chex.assert_trees_all_close(one_row, expected, rtol=RTOL, atol=ATOL)
    # 2 x 4: each micro-batch split over two data rows, gradients and BatchNorm
    # statistics averaged over them: the same global micro-batches, the same updates.
    two_rows = _train(states, batches, num_stages=4, num_rows=2)
    chex.assert_trees_all_close(two_rows, one_row, rtol=RTOL, atol=ATOL)

  def test_contrastive_loss_is_pipelined_on_one_data_row_only(self):
    # With 2 rows each would pair only its half of the micro-batch: another loss.
    model = bw.build_model('vgg11', num_classes=10, num_blocks=2, width=0.125,
                           aux_head='infopro', local_loss='supcon')
    _, tx, _ = _built()
    plan = parallel.make_stage_plan(model, tx, IMAGE, 2)
    for rows in (1, 2):
      mesh = parallel.make_pipeline_mesh(2, jax.devices()[:2 * rows])
      make = functools.partial(parallel.StagePipeline, model, tx, plan, mesh,
                               num_microbatches=2, global_batch_size=16)
      if rows == 1:
        self.assertEqual(make().mesh.shape['data'], 1)
      else:
        with self.assertRaisesRegex(UsageError, 'contrastive loss pairs the examples'):
          make()

  def test_two_stages_of_two_blocks_on_4_rows(self):
    model, tx, states = _built()
    batches = _batches(2)
    trained = _train(states, batches, num_stages=2, num_rows=4)
    self.assertLen(_pipeline(2, 4).plan.stage_blocks, 2)
    chex.assert_trees_all_close(trained, _synchronous(model, tx, states, batches, 2),
                                rtol=RTOL, atol=ATOL)

  def test_isolation_a_later_block_never_changes_an_earlier_trajectory(self):
    model, tx, states = _built()
    batches = _batches(2)
    perturbed = list(jax.tree_util.tree_map(jnp.copy, states))
    perturbed[3] = perturbed[3].replace(
        params=jax.tree_util.tree_map(lambda p: p * 1.5 + 0.1, perturbed[3].params))
    base = _train(states, batches, num_stages=4, num_rows=2)
    changed = _train(tuple(perturbed), batches, num_stages=4, num_rows=2)
    chex.assert_trees_all_equal(changed[:3], base[:3])  # Exactly: the same program.
    self.assertFalse(np.array_equal(jax.tree_util.tree_leaves(changed[3].params)[0],
                                    jax.tree_util.tree_leaves(base[3].params)[0]))

  def test_bubbles_change_nothing_and_step_counts_are_real_microbatches(self):
    model, tx, states = _built()
    batches = _batches(3)
    clean = _train(states, batches, num_stages=4, num_rows=2)
    poisoned = _train(states, batches, num_stages=4, num_rows=2, poison_bubbles=True)
    chex.assert_trees_all_equal(poisoned, clean)
    for block in poisoned:
      self.assertTrue(all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(block)))
      counts = [leaf for leaf in jax.tree_util.tree_leaves(block.opt_state)
                if leaf.dtype == np.int32]
      self.assertEqual([int(c) for c in counts], [3 * 2])  # 3 batches x 2 micro-batches.

  def test_metrics_count_each_microbatch_once_across_steps_and_drain(self):
    _, _, states = _built()
    pipeline = _pipeline(4, 2)
    state = pipeline.init(states)
    counts = []
    for batch in _batches(3):
      state, metrics = pipeline.step(state, pipeline.shard_batch(batch))
      counts.append(np.asarray(metrics['count']))
    programs = pipeline.step._cache_size()  # pylint: disable=protected-access
    state, tail = pipeline.drain(state)
    counts.append(np.asarray(tail['count']))
    # It drained with the step's program (3 ticks of fill to finish: 2 steps of empty ones).
    self.assertEqual(pipeline.step._cache_size(), programs)  # pylint: disable=protected-access
    # Filling: stage s idles its first s ticks; full afterwards; the drain finishes the rest.
    np.testing.assert_array_equal(counts, [[2, 1, 0, 0], [2, 2, 2, 1], [2, 2, 2, 2],
                                           [0, 1, 2, 3]])
    np.testing.assert_array_equal(np.sum(counts, axis=0), [6, 6, 6, 6])
    # Per step, sums / M: their mean over the segment is the mean over all 6 micro-batches.
    last = parallel.step_metrics(metrics, tail, num_microbatches=2)
    self.assertEqual(set(last), {'loss', 'accuracy', 'skipped'})
    np.testing.assert_allclose(last['loss'], (metrics['loss'] + tail['loss']) / 2)
    self.assertEqual(float(tail['loss'][0]), 0.0)  # Block 0 finished everything before.

  def test_one_data_row_gives_the_same_updates_with_either_batch_norm_choice(self):
    model, tx, states = _built()
    batches = _batches(2)
    rows = _train(states, batches, num_stages=4, num_rows=1, batch_norm='rows')
    chex.assert_trees_all_close(rows, _train(states, batches, num_stages=4, num_rows=1),
                                rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_close(rows, _synchronous(model, tx, states, batches, 2),
                                rtol=RTOL, atol=ATOL)
    # Over two rows the choice matters: each row normalises its half of a micro-batch.
    split = _train(states, batches, num_stages=4, num_rows=2, batch_norm='rows')
    with self.assertRaises(AssertionError):
      chex.assert_trees_all_close(split, rows, rtol=RTOL, atol=ATOL)

  def test_rows_batch_norm_runs_no_collective_inside_a_conditional(self):
    _, _, states = _built()
    batch = _batches(1)[0]
    found = {}
    for choice in ('rows', 'global'):
      pipeline = _pipeline(4, 2, batch_norm=choice)
      state = pipeline.init(states)
      text = pipeline.step.lower(state, pipeline.shard_batch(batch)).compile().as_text()
      self.assertIn(' conditional(', text)
      found[choice] = hlo.collectives_in_conditionals(text)  # The drain runs this program too.
    self.assertEqual(found['rows'], [])
    # The check sees them where they are: global statistics all-reduce inside the branches.
    self.assertTrue(any('all-reduce' in line for line in found['global']), found['global'])
    evaluate = _pipeline(4, 2).evaluate.lower(
        state, _pipeline(4, 2).shard_batch({**batch, 'mask': np.ones(16, np.float32)}))
    self.assertEqual(hlo.collectives_in_conditionals(evaluate.compile().as_text()), [])

  @parameterized.parameters('rows', 'global')
  def test_skip_nonfinite_skips_exactly_the_nonfinite_updates(self, batch_norm):
    model, tx, states = _built()
    batches = _batches(2)
    poisoned = [dict(batch) for batch in batches]
    poisoned[0]['image'] = poisoned[0]['image'].copy()
    poisoned[0]['image'][8:] = np.nan  # Micro-batch 2 of batch 1: every block's loss is NaN.
    pipeline = _pipeline(4, 1, batch_norm=batch_norm, skip_nonfinite=True)
    state = pipeline.init(states)
    skipped = []
    for batch in poisoned:
      state, metrics = pipeline.step(state, pipeline.shard_batch(batch))
      skipped.append(np.asarray(metrics['skipped']))
    state, tail = pipeline.drain(state)
    skipped.append(np.asarray(tail['skipped']))
    # Each block skips that one micro-batch's update and no other.
    np.testing.assert_array_equal(np.sum(skipped, axis=0), [1, 1, 1, 1])
    trained = pipeline.host_block_states(state.stages)
    # The updates made are those of the synchronous step on the three good micro-batches.
    good = [{name: value[:8] for name, value in batches[0].items()}, batches[1]]
    step = bw.make_blockwise_train_step(model, tx, donate=False)
    expected = states
    for part in [good[0]] + parallel.split_microbatches(good[1], 2):
      expected, _ = step(expected, part)
    chex.assert_trees_all_close(trained, jax.device_get(expected), rtol=RTOL, atol=ATOL)

  def test_images_reach_stage_zero_only(self):
    _, _, states = _built()
    pipeline = _pipeline(4, 2, num_microbatches=4)
    batch = pipeline.shard_batch(_batches(1)[0])
    # Each device holds one of the four micro-batches of its row (c = ceil(M / S) = 1).
    self.assertEqual(batch['image'].sharding.spec, jax.sharding.PartitionSpec('stage', 'data'))
    for shard in batch['image'].addressable_shards:
      self.assertEqual(shard.data.shape, (1, 2) + IMAGE)
    text = pipeline.step.lower(pipeline.init(states), batch).compile().as_text()
    # Each later stage's micro-batches travel as one message, before the ticks: a row per
    # micro-batch (1 here), its examples' images flattened, their labels as extra columns.
    image_length = int(np.prod(IMAGE))
    permutes = [line for line in text.splitlines() if ' collective-permute(' in line]
    image_moves = [line for line in permutes
                   if (shape := re.search(r'= f32\[1,(\d+)\]', line))
                   and int(shape.group(1)) > 2 * image_length]
    self.assertLen(image_moves, 3)  # From stages 1, 2 and 3.
    # Outside the one loop over the ticks, whose body (compiled once, not once per stage
    # holding inputs) permutes one message: the handoff to the next stage.
    self.assertEqual([line for line in image_moves if '/while/' in line], [])
    self.assertLen([line for line in permutes if '/while/' in line], 1)
    stage_zero = {str(d.id) for d in pipeline.mesh.devices[:, 0]}
    for line in image_moves:
      pairs = re.findall(r'\{(\d+),(\d+)\}', line.split('source_target_pairs=')[1])
      self.assertTrue(pairs and all(target in stage_zero for _, target in pairs), line)

  def test_evaluation_is_pipelined_masks_padding_and_gathers_no_state(self):
    from eval_cases import masked_eval_case  # pylint: disable=g-import-not-at-top
    model, tx, states = _built()
    trained = _synchronous(model, tx, states, _batches(1), 2)
    pipeline = _pipeline(4, 2)
    state = pipeline.init(trained)
    evaluate = lambda batch: jax.device_get(pipeline.evaluate(state, pipeline.shard_batch(batch)))
    real = {name: value[:8] for name, value in _batches(1, seed=3)[0].items()}
    case = masked_eval_case(evaluate, model, real, num_padded=8,
                            reference=lambda batch: bw.eval_step(model, trained, batch))
    chex.assert_trees_all_close(evaluate(case.batch), case.expected, rtol=1e-4, atol=1e-4)
    # Nothing of a stage's state crosses devices: only a few floats per block do.
    text = pipeline.evaluate.lower(state, pipeline.shard_batch(case.batch)).compile().as_text()
    crossing = [line for line in text.splitlines()
                if any(f' {op}(' in line for op in hlo.COLLECTIVES)]
    self.assertTrue(all(str(pipeline.plan.state_length) not in line for line in crossing))
    # Digests, as checkpoints and results use them, are each computed by the stage's owner.
    self.assertEqual(_stage_digests(pipeline, state),
                     [bytes(checkpoint.block_params_digest(s)) for s in trained])

  def test_layout_one_stage_per_device_and_no_gather_of_states(self):
    _, _, states = _built()
    pipeline, plan = _pipeline(4, 2), _pipeline(4, 2).plan
    self.assertEqual(dict(pipeline.mesh.shape), {'data': 2, 'stage': 4})
    state = pipeline.init(states)
    self.assertEqual(state.stages.sharding.spec, jax.sharding.PartitionSpec('stage'))
    for shard in state.stages.addressable_shards:
      self.assertEqual(shard.data.shape, (1, plan.state_length))
    self.assertEqual(parallel.state_bytes_per_device(state), 4 * plan.state_length)
    all_blocks = sum(packing.size for packing in plan.state_packings)
    self.assertLess(plan.state_length, all_blocks)
    batch = pipeline.shard_batch(_batches(1)[0])
    text = pipeline.step.lower(state, batch).compile().as_text()
    self.assertIn('collective-permute', text)  # Activations to the next stage.
    # Gradients, losses and BatchNorm statistics averaged over 'data': groups of the
    # devices holding one stage, e.g. {0,4},{1,5},{2,6},{3,7}.
    data_groups = ','.join('{' + ','.join(str(d.id) for d in column) + '}'
                           for column in pipeline.mesh.devices.T)
    self.assertIn(f'replica_groups={{{data_groups}}}', text)
    # Only a few floats per block cross stages (metrics); never a stage's state.
    crossing = [line for line in text.splitlines()
                if any(f' {op}(' in line for op in hlo.COLLECTIVES)]
    self.assertTrue(all(str(plan.state_length) not in line for line in crossing), crossing)
    # The step hands states back where they were.
    state, _ = pipeline.step(state, batch)
    self.assertEqual(state.stages.sharding.spec, jax.sharding.PartitionSpec('stage'))
    self.assertEqual(state.activations.sharding.spec,
                     jax.sharding.PartitionSpec('stage', 'data'))


if __name__ == '__main__':
  absltest.main()
