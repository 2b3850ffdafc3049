"""Checkpoints of every block's state with orbax, and digests that identify a run's result.

A checkpoint holds, for one step, every block's params, batch_stats and
opt_state (an orbax `StandardSave` of the host copy of the `BlockState` tuple),
and a small JSON record: the step, a SHA-256 of the whole state, and whatever
loop position the caller passes in `meta`. Training is a pure function of the
config and the step (the init key is the seed, and batches are a pure function
of seed, epoch and step), so this is all a run needs to continue bitwise
exactly.

Writes are synchronous: `save` returns once the checkpoint is final. orbax
writes each step into a temporary directory and renames it into place only when
complete, so a save cut short (a killed process, a full disk) leaves a
`<step>.orbax-checkpoint-tmp*` directory that is never listed as a step.
Silent corruption of a finished checkpoint (a flipped byte in a data file reads
back without error) is caught by the stored digest.

Block states are fetched to the host before saving, so states placed on one
device or replicated over many save the same way; `restore` returns host
(numpy) arrays for the caller to place. States sharded over devices of several
processes (the stage pipeline's packed stages) are saved as they are, each
process writing its own shards, with a digest the caller computes from its
shards (`digest=`); nothing is gathered.
"""

import hashlib
import os
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from bwbpf_jax.errors import UsageError

_STATE = 'state'
_RECORD = 'record'


def make_manager(directory: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
  """An orbax manager of the checkpoints in `directory` (created if missing).

  Keeping several lets a run fall back to an earlier checkpoint when the latest
  one is unreadable.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise UsageError(f'checkpoint directory {directory} exists and is not a directory')
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, enable_async_checkpointing=False,
      cleanup_tmp_directories=True)
  manager = ocp.CheckpointManager(directory, options=options, item_names=(_STATE, _RECORD))
  # The manager removes unfinished writes of earlier runs in a background thread and
  # waits for it only before its first save; `close()` does not. A run that stops
  # before saving (a usage error found after this point) would exit while that thread
  # still schedules work, and print a traceback after its one-line error. Wait now.
  await_cleanup = getattr(manager, '_maybe_await_cleanup_tmp_directory', None)
  if await_cleanup is not None:
    await_cleanup()
  return manager


def steps(manager: ocp.CheckpointManager) -> list:
  """The finished checkpoints' steps, oldest first (unfinished writes are not listed)."""
  manager.reload()
  return sorted(manager.all_steps())


def step_path(manager: ocp.CheckpointManager, step: int) -> str:
  """The directory of the checkpoint of `step`."""
  return os.path.join(str(manager.directory), str(int(step)))


def save(manager: ocp.CheckpointManager, step: int, states, meta: Optional[dict] = None,
         digest: Optional[str] = None) -> str:
  """Writes the checkpoint of `step` and waits until it is final; returns its path.

  Args:
    manager: from `make_manager`; every process of a multi-process run calls this.
    step: the number of steps the states have taken; must be newer than every
      checkpoint in the manager (delete newer ones first to branch off an older one).
    states: tuple of K `BlockState`, on any devices, fetched to the host; or, with
      `digest`, a pytree of (possibly sharded) arrays saved shard by shard.
    meta: JSON-serialisable loop position, returned as is by `restore`.
    digest: the states' digest, for states this process cannot read whole.
  """
  if digest is None:
    states = jax.device_get(states)
    digest = tree_digest(states)
  record = {'step': int(step), 'state_sha256': digest, 'meta': meta or {}}
  manager.save(int(step), force=True, args=ocp.args.Composite(**{
      _STATE: ocp.args.StandardSave(states),
      _RECORD: ocp.args.JsonSave(record)}))
  manager.wait_until_finished()
  return step_path(manager, step)


def restore(manager: ocp.CheckpointManager, step: int, target,
            digest_fn: Optional[Callable[[Any], str]] = None) -> tuple:
  """Reads the checkpoint of `step` into the structure of `target`.

  Args:
    manager: from `make_manager`.
    step: one of `steps(manager)`.
    target: shapes and dtypes of the states, e.g. `abstract_block_states(...)`;
      with shardings, the arrays are read shard by shard onto those devices.
    digest_fn: the digest of the restored states, for states saved with `digest=`
      (default: `tree_digest` of their host copy, which is then returned).

  Returns:
    (states: host arrays, or global arrays with `digest_fn`; the `meta` given to `save`).

  Raises:
    UsageError naming the checkpoint's path when it is missing, unreadable, of
    another structure than `target`, or its contents do not match their digest.
  """
  path = step_path(manager, step)
  if step not in steps(manager):
    raise UsageError(f'no checkpoint of step {step} in {manager.directory} '
                     f'(there are: {_list(steps(manager))})')
  try:
    restored = manager.restore(int(step), args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(target),
        _RECORD: ocp.args.JsonRestore()}))
    states = restored[_STATE]
    if digest_fn is None:
      states = jax.device_get(states)
    record = restored[_RECORD]
    stored_digest, stored_step, meta = record['state_sha256'], record['step'], record['meta']
  except Exception as e:  # pylint: disable=broad-except  (any failure means unreadable)
    reason = ' '.join(f'{type(e).__name__}: {e}'.split())
    reason = reason if len(reason) <= 200 else reason[:200] + '...'
    raise UsageError(f'checkpoint {path} is unreadable or corrupt ({reason})') from e
  if stored_step != step:
    raise UsageError(f'checkpoint {path} is corrupt: it says it is step {stored_step}')
  if jax.tree_util.tree_structure(states) != jax.tree_util.tree_structure(target):
    raise UsageError(f'checkpoint {path} holds states of another structure than this model')
  if (digest_fn or tree_digest)(states) != stored_digest:
    raise UsageError(f'checkpoint {path} is corrupt: its arrays do not match the digest '
                     f'saved with them')
  return states, meta


def delete(manager: ocp.CheckpointManager, step: int):
  """Removes the checkpoint of `step` (e.g. ones newer than the step a run branches from)."""
  manager.delete(int(step))
  manager.wait_until_finished()


def tree_digest(tree) -> str:
  """SHA-256 (hex) of every leaf's path, dtype, shape and bytes, in the tree's fixed order.

  Equal digests mean bitwise equal trees; any changed bit, shape, dtype or leaf
  name changes it.
  """
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
    array = np.ascontiguousarray(leaf)
    digest.update(f'{jax.tree_util.keystr(path)}|{array.dtype.name}|{array.shape}|'.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def block_params_digest(block_state) -> np.ndarray:
  """SHA-256 (32 bytes, uint8) of one block's params and batch_stats."""
  return np.frombuffer(bytes.fromhex(tree_digest(
      {'params': block_state.params, 'batch_stats': block_state.batch_stats})), np.uint8)


def combine_block_digests(block_digests: Sequence) -> str:
  """The run's `params_digest` from its blocks' `block_params_digest`s, in block order."""
  return hashlib.sha256(b''.join(bytes(np.asarray(d, np.uint8)) for d in block_digests)
                        ).hexdigest()


def params_digest(block_states: Sequence) -> str:
  """SHA-256 of every block's params and batch_stats: equal only for bitwise equal networks.

  Optimizer state is left out: two runs that end with the same network have the
  same digest, whatever their momentum buffers hold. Computed block by block
  (`combine_block_digests`), so states whose blocks live in different
  processes get the same digest without being gathered.
  """
  return combine_block_digests([block_params_digest(s) for s in block_states])


def _list(values) -> str:
  return ', '.join(str(v) for v in values) or 'none'
