"""bwbpf_jax.checkpoint: exact round trips, digests, unfinished and corrupt checkpoints."""

import glob
import os
import shutil
import signal
import subprocess
import sys

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

import bwbpf_jax as bw
from bwbpf_jax import checkpoint

_INPUT_SHAPE = (8, 8, 1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Saves step 4, then dies by SIGKILL in the middle of saving step 8: after orbax
# has started writing (the arrays) and before the JSON record is written.
_KILLED_MIDWAY_SAVE = """
import json, os, signal, sys
import numpy as np
from bwbpf_jax import checkpoint
manager = checkpoint.make_manager(sys.argv[1])
state = {'w': np.arange(6, dtype=np.float32)}
checkpoint.save(manager, 4, state, {'seed': 0})
dumps = json.dumps
def dumps_then_die(obj, *args, **kwargs):
  if isinstance(obj, dict) and 'state_sha256' in obj:
    os.kill(os.getpid(), signal.SIGKILL)
  return dumps(obj, *args, **kwargs)
json.dumps = dumps_then_die
checkpoint.save(manager, 8, state, {'seed': 0})
"""


def _model_and_tx():
  model = bw.build_model('vgg11', num_classes=10, num_blocks=2, width=0.125)
  return model, bw.make_optimizer('sgd', learning_rate=0.1, total_steps=10)


def _trained_states(model, tx, train_step, seed=0):
  """States after one real step, so momentum buffers and batch stats are not trivial."""
  states = bw.init_block_states(model, tx, jax.random.key(seed), _INPUT_SHAPE)
  batch = {'image': jax.random.normal(jax.random.key(1), (4,) + _INPUT_SHAPE),
           'label': jnp.arange(4) % 10}
  states, _ = train_step(states, batch)
  return states


# Block states replicated over a 4-device mesh (data-parallel) and placed one block per
# device (block-parallel) save and restore to the same host values as unplaced ones.
_SEVERAL_DEVICES = """
import sys
import chex, jax
import numpy as np
import bwbpf_jax as bw
from bwbpf_jax import checkpoint
assert jax.device_count() == 4, jax.devices()
model = bw.build_model('vgg11', num_classes=10, num_blocks=2, width=0.125)
tx = bw.make_optimizer('sgd', learning_rate=0.1, total_steps=10)
states = bw.init_block_states(model, tx, jax.random.key(0), (8, 8, 1))
target = bw.abstract_block_states(model, tx, (8, 8, 1))
mesh = jax.make_mesh((4,), ('data',))
replicated = jax.device_put(states, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
per_block = tuple(jax.device_put(s, jax.devices()[k + 2]) for k, s in enumerate(states))
manager = checkpoint.make_manager(sys.argv[1])
for step, placed in ((1, replicated), (2, per_block)):
  checkpoint.save(manager, step, placed)
  restored, _ = checkpoint.restore(manager, step, target)
  chex.assert_trees_all_equal(restored, jax.device_get(states))
  assert checkpoint.params_digest(placed) == checkpoint.params_digest(states)
print('ok', jax.device_count(), 'devices')
"""


class CheckpointTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model, cls.tx = _model_and_tx()
    cls.train_step = staticmethod(bw.make_train_step(cls.model, cls.tx, donate=False))
    cls.states = _trained_states(cls.model, cls.tx, cls.train_step)
    cls.target = bw.abstract_block_states(cls.model, cls.tx, _INPUT_SHAPE)

  def _manager(self):
    return checkpoint.make_manager(os.path.join(self.create_tempdir().full_path, 'ckpt'))

  def test_round_trip_is_bitwise_exact_with_meta(self):
    manager = self._manager()
    meta = {'seed': 3, 'epoch_step': 7, 'sums': {'loss': [0.1, 1 / 3]}}
    path = checkpoint.save(manager, 5, self.states, meta)
    self.assertEqual(path, os.path.join(str(manager.directory), '5'))
    restored, restored_meta = checkpoint.restore(manager, 5, self.target)
    self.assertEqual(restored_meta, meta)
    self.assertEqual(jax.tree_util.tree_structure(restored),
                     jax.tree_util.tree_structure(self.states))
    for got, want in zip(jax.tree_util.tree_leaves(restored),
                         jax.tree_util.tree_leaves(self.states)):
      self.assertEqual(got.dtype, want.dtype)
      np.testing.assert_array_equal(got, np.asarray(want))  # exact, every bit
    self.assertEqual(checkpoint.params_digest(restored), checkpoint.params_digest(self.states))

  def test_keeps_the_newest_three_and_lists_them_in_order(self):
    manager = self._manager()
    for step in (2, 4, 6, 8):
      checkpoint.save(manager, step, self.states)
    self.assertEqual(checkpoint.steps(manager), [4, 6, 8])
    checkpoint.delete(manager, 8)
    self.assertEqual(checkpoint.steps(manager), [4, 6])

  def test_digest_is_stable_and_sensitive(self):
    digest = checkpoint.params_digest(self.states)
    self.assertLen(digest, 64)
    self.assertEqual(digest, checkpoint.params_digest(jax.device_get(self.states)))
    self.assertEqual(digest, checkpoint.params_digest(
        _trained_states(self.model, self.tx, self.train_step)))
    self.assertNotEqual(digest, checkpoint.params_digest(
        _trained_states(self.model, self.tx, self.train_step, seed=1)))
    # One bit of one parameter.
    leaves, treedef = jax.tree_util.tree_flatten(jax.device_get(self.states[1].params))
    flipped = [leaf.copy() for leaf in leaves]
    flipped[0].view(np.uint32).flat[0] ^= 1
    changed = (self.states[0], self.states[1].replace(
        params=jax.tree_util.tree_unflatten(treedef, flipped)))
    self.assertNotEqual(digest, checkpoint.params_digest(changed))
    # Batch statistics count; optimizer state does not.
    stats = jax.tree_util.tree_map(lambda x: x + 1, self.states[0].batch_stats)
    self.assertNotEqual(digest, checkpoint.params_digest(
        (self.states[0].replace(batch_stats=stats), self.states[1])))
    opt_state = jax.tree_util.tree_map(jnp.zeros_like, self.states[0].opt_state)
    self.assertEqual(digest, checkpoint.params_digest(
        (self.states[0].replace(opt_state=opt_state), self.states[1])))
    # Same values in another dtype are another network.
    self.assertNotEqual(checkpoint.tree_digest({'w': np.zeros(3, np.float32)}),
                        checkpoint.tree_digest({'w': np.zeros(3, np.float64)}))

  def test_save_killed_midway_is_never_listed(self):
    # A process killed (SIGKILL) while writing step 8, after its arrays and before
    # its record: the state orbax leaves behind when a job is preempted mid-save.
    directory = os.path.join(self.create_tempdir().full_path, 'ckpt')
    proc = subprocess.run([sys.executable, '-c', _KILLED_MIDWAY_SAVE, directory],
                          env={**os.environ, 'PYTHONPATH': REPO}, capture_output=True,
                          text=True, timeout=120)
    self.assertEqual(proc.returncode, -signal.SIGKILL, proc.stderr[-2000:])
    leftovers = sorted(set(os.listdir(directory)) - {'4'})
    self.assertNotEmpty(leftovers)
    self.assertTrue(all(name.startswith('8.orbax-checkpoint-tmp') for name in leftovers),
                    leftovers)
    manager = checkpoint.make_manager(directory)
    # Removed before make_manager returns (not in a thread still running at exit).
    self.assertEqual(os.listdir(directory), ['4'])
    self.assertEqual(checkpoint.steps(manager), [4])
    self.assertEqual(manager.latest_step(), 4)
    state = {'w': np.arange(6, dtype=np.float32)}
    restored, meta = checkpoint.restore(manager, 4, state)
    np.testing.assert_array_equal(restored['w'], state['w'])
    self.assertEqual(meta, {'seed': 0})
    checkpoint.save(manager, 8, state)  # The step can be written again.
    self.assertEqual(checkpoint.steps(manager), [4, 8])

  def _saved_with_largest_data_file(self):
    """(manager, checkpoint path, its largest array data file) for a fresh checkpoint."""
    manager = self._manager()
    path = checkpoint.save(manager, 4, self.states)
    data_files = [p for p in glob.glob(os.path.join(path, 'state', '**', 'd', '*'),
                                       recursive=True) if os.path.isfile(p)]
    return manager, path, max(data_files, key=os.path.getsize)

  def test_truncated_data_file_is_a_usage_error_naming_the_checkpoint(self):
    manager, path, largest = self._saved_with_largest_data_file()
    with open(largest, 'r+b') as f:
      f.truncate(os.path.getsize(largest) // 2)
    with self.assertRaisesRegex(bw.UsageError, f'checkpoint {path} is unreadable or corrupt'):
      checkpoint.restore(checkpoint.make_manager(str(manager.directory)), 4, self.target)

  def test_arrays_that_read_back_wrong_are_caught_by_the_digest(self):
    # Silent corruption: arrays that decode without error but are not the ones saved
    # (here: another checkpoint's arrays under this checkpoint's record). Only the
    # digest saved beside the arrays can notice.
    manager = self._manager()
    path = checkpoint.save(manager, 4, self.states)
    other = self._manager()
    first = self.states[0]
    dense = first.params['head']['Dense_0']
    changed = (first.replace(params={**first.params, 'head': {'Dense_0': {
        **dense, 'bias': dense['bias'].at[0].add(1.0)}}}),) + tuple(self.states[1:])
    other_path = checkpoint.save(other, 4, changed)
    shutil.rmtree(os.path.join(path, 'state'))
    shutil.copytree(os.path.join(other_path, 'state'), os.path.join(path, 'state'))
    with self.assertRaisesRegex(
        bw.UsageError, f'^checkpoint {path} is corrupt: its arrays do not match the digest '
                       f'saved with them$'):
      checkpoint.restore(checkpoint.make_manager(str(manager.directory)), 4, self.target)

  def test_missing_step_and_wrong_structure(self):
    manager = self._manager()
    checkpoint.save(manager, 4, self.states)
    with self.assertRaisesRegex(bw.UsageError, r'no checkpoint of step 5 .*there are: 4'):
      checkpoint.restore(manager, 5, self.target)
    other = bw.build_model('vgg11', num_classes=10, num_blocks=3, width=0.125)
    with self.assertRaisesRegex(bw.UsageError, 'checkpoint .*/4 '):
      checkpoint.restore(manager, 4, bw.abstract_block_states(other, self.tx, _INPUT_SHAPE))

  def test_a_file_in_place_of_the_directory_is_a_usage_error(self):
    path = self.create_tempfile().full_path
    with self.assertRaisesRegex(bw.UsageError, 'not a directory'):
      checkpoint.make_manager(path)

  def test_states_on_several_devices_save_as_one(self):
    # JAX fixed this process's device count at start; 4 fake CPU devices need a new one.
    proc = subprocess.run(
        [sys.executable, '-c', _SEVERAL_DEVICES, self.create_tempdir().full_path],
        env={**os.environ, 'PYTHONPATH': REPO,
             'XLA_FLAGS': os.environ.get('XLA_FLAGS', '') +
                          ' --xla_force_host_platform_device_count=4'},
        capture_output=True, text=True, timeout=180)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn('ok 4 devices', proc.stdout)


if __name__ == '__main__':
  absltest.main()
