r"""One process of the 2-process data-parallel test in tests/test_parallel.py.

    python tests/parallel_worker.py --coordinator=127.0.0.1:PORT --num_processes=2 \
        --process_id=0 --local_devices=2 --out_dir=DIR

joins the run through `parallel.initialize_distributed`, trains the model that
`experiment()` describes for `STEPS` data-parallel steps, each process feeding
only its slice of every global batch (as `data.train_batches` slices it), then
writes its block states' parameters to DIR/process_<i>.npz and prints one JSON
line: process index and count, global device count, and a digest of the
parameters.
"""

import argparse
import hashlib
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IMAGE = (16, 16, 3)
GLOBAL_BATCH_SIZE = 16
STEPS = 2


def experiment():
  """(model, tx, initial states, global batches): the same in every process and in the test."""
  import jax  # pylint: disable=g-import-not-at-top
  import bwbpf_jax as bw  # pylint: disable=g-import-not-at-top
  model = bw.build_model('vgg11', num_classes=10, num_blocks=2, width=0.125)
  tx = bw.make_optimizer('sgd', learning_rate=0.05, total_steps=100)
  states = bw.init_block_states(model, tx, jax.random.key(0), IMAGE)
  rng = np.random.default_rng(0)
  batches = [{'image': rng.normal(size=(GLOBAL_BATCH_SIZE,) + IMAGE).astype(np.float32),
              'label': rng.integers(0, 10, GLOBAL_BATCH_SIZE).astype(np.int32)}
             for _ in range(STEPS)]
  return model, tx, states, batches


def params_leaves(block_states) -> list:
  """Every block's parameters as host arrays, in a fixed order."""
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(leaf.addressable_data(0)) if hasattr(leaf, 'addressable_data')
          else np.asarray(leaf)
          for leaf in jax.tree_util.tree_leaves([s.params for s in block_states])]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--coordinator', required=True)
  parser.add_argument('--num_processes', type=int, required=True)
  parser.add_argument('--process_id', type=int, required=True)
  parser.add_argument('--local_devices', type=int, default=1)
  parser.add_argument('--out_dir', required=True)
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_num_cpu_devices', args.local_devices)
  jax.config.update('jax_default_matmul_precision', 'highest')
  from bwbpf_jax import parallel  # pylint: disable=g-import-not-at-top

  process_index, process_count = parallel.initialize_distributed(
      args.coordinator, args.num_processes, args.process_id, initialization_timeout=60)
  model, tx, states, batches = experiment()
  mesh = parallel.make_mesh()
  train_step = parallel.make_data_parallel_train_step(model, tx, mesh)
  states = parallel.replicate(states, mesh)
  local = GLOBAL_BATCH_SIZE // process_count
  for batch in batches:
    local_batch = {name: value[process_index * local:(process_index + 1) * local]
                   for name, value in batch.items()}
    states, metrics = train_step(states, parallel.shard_batch(local_batch, mesh))
  leaves = params_leaves(states)
  np.savez(os.path.join(args.out_dir, f'process_{process_index}.npz'), *leaves)
  digest = hashlib.sha256(b''.join(leaf.tobytes() for leaf in leaves)).hexdigest()
  print(json.dumps({'process_index': process_index, 'process_count': process_count,
                    'global_devices': jax.device_count(), 'digest': digest,
                    'loss': np.asarray(metrics['loss'].addressable_data(0)).tolist()}),
        flush=True)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
