r"""One process of the multi-process tests in tests/test_parallel.py and test_stage_pipeline.py.

    python tests/parallel_worker.py --coordinator=127.0.0.1:PORT --num_processes=2 \
        --process_id=0 --local_devices=2 --out_dir=DIR [--engine=data|pipeline] \
        [--stages=S --batch_norm=rows|global]

joins the run through `parallel.initialize_distributed`, trains the model that
`experiment()` describes for `STEPS` steps, each process feeding only its
slice of every global batch (as `data.train_batches` slices it), then writes
what it holds to DIR/process_<i>.npz and prints one JSON line: process index
and count, global device count, mesh shape, the last step's losses and a
digest of the parameters. `data`: the data-parallel step over every device;
it writes every block's parameters (arr_0, arr_1, ...). `pipeline`: 4 blocks
in S stages over a (devices / S) x S mesh, 2 micro-batches per batch, drained
at the end; it writes the packed states of the stages its devices hold
(stage_<s>), as nothing gathers them, and the digest is the run's
`params_digest`, each block's computed by its owner.
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


def experiment(num_blocks=2):
  """(model, tx, initial states, global batches): the same in every process and in the test."""
  import jax  # pylint: disable=g-import-not-at-top
  import bwbpf_jax as bw  # pylint: disable=g-import-not-at-top
  model = bw.build_model('vgg11', num_classes=10, num_blocks=num_blocks, width=0.125)
  tx = bw.make_optimizer('sgd', learning_rate=0.05, total_steps=100)
  states = bw.init_block_states(model, tx, jax.random.key(0), IMAGE)
  rng = np.random.default_rng(0)
  batches = [{'image': rng.normal(size=(GLOBAL_BATCH_SIZE,) + IMAGE).astype(np.float32),
              'label': rng.integers(0, 10, GLOBAL_BATCH_SIZE).astype(np.int32)}
             for _ in range(STEPS)]
  return model, tx, states, batches


def same_microbatches_on_rows(batch, num_microbatches, num_rows):
  """The batch whose pipeline micro-batches on `num_rows` data rows are those of `batch` on one.

  With D rows, micro-batch m is the m-th part of each row's share; this
  reorders examples so that it holds examples [m B/M, (m+1) B/M) of `batch`.
  """
  def reorder(x):
    x = x.reshape((num_microbatches, num_rows, -1) + x.shape[1:]).swapaxes(0, 1)
    return x.reshape((-1,) + x.shape[3:])
  return {name: reorder(value) for name, value in batch.items()}


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
  parser.add_argument('--engine', choices=('data', 'pipeline'), default='data')
  parser.add_argument('--stages', type=int, default=4)
  parser.add_argument('--batch_norm', choices=('rows', 'global'), default='global')
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_num_cpu_devices', args.local_devices)
  jax.config.update('jax_default_matmul_precision', 'highest')
  from bwbpf_jax import parallel  # pylint: disable=g-import-not-at-top

  process_index, process_count = parallel.initialize_distributed(
      args.coordinator, args.num_processes, args.process_id, initialization_timeout=60)
  if args.engine == 'data':
    model, tx, states, batches = experiment()
    mesh = parallel.make_mesh()
    train_step = parallel.make_data_parallel_train_step(model, tx, mesh)
    states = parallel.replicate(states, mesh)
    index, count = process_index, process_count
    put = lambda batch: parallel.shard_batch(batch, mesh)
  else:
    model, tx, states, batches = experiment(num_blocks=4)
    mesh = parallel.make_pipeline_mesh(args.stages)
    # Equal per-block costs: every process must group the blocks the same way.
    plan = parallel.make_stage_plan(model, tx, IMAGE, args.stages, costs=[1.0] * 4)
    pipeline = parallel.StagePipeline(model, tx, plan, mesh, num_microbatches=2,
                                      global_batch_size=GLOBAL_BATCH_SIZE,
                                      batch_norm=args.batch_norm)
    train_step = pipeline.step
    states = pipeline.init(states)
    index, count = parallel.process_feed_slice(mesh)
    put = pipeline.shard_batch
    # The same micro-batches on any number of data rows: micro-batch m is examples
    # [m B/M, (m+1) B/M) of the global batch, as with one row (see StagePipeline.shard_batch).
    batches = [same_microbatches_on_rows(batch, 2, mesh.shape['data']) for batch in batches]
  local = GLOBAL_BATCH_SIZE // count
  for batch in batches:
    local_batch = {name: value[index * local:(index + 1) * local]
                   for name, value in batch.items()}
    states, metrics = train_step(states, put(local_batch))
  if args.engine == 'pipeline':
    from bwbpf_jax import checkpoint  # pylint: disable=g-import-not-at-top
    states, tail = pipeline.drain(states)
    metrics = parallel.step_metrics(metrics, tail, num_microbatches=2)
    held = {f'stage_{s}': vector for s, vector in pipeline.own_stages(states.stages).items()}
    digest = checkpoint.combine_block_digests(
        pipeline.block_summaries(states.stages, checkpoint.block_params_digest))
  else:
    leaves = params_leaves(states)
    held = {f'arr_{i}': leaf for i, leaf in enumerate(leaves)}
    digest = hashlib.sha256(b''.join(leaf.tobytes() for leaf in leaves)).hexdigest()
  np.savez(os.path.join(args.out_dir, f'process_{process_index}.npz'), **held)
  print(json.dumps({'process_index': process_index, 'process_count': process_count,
                    'global_devices': jax.device_count(), 'digest': digest,
                    'mesh': list(mesh.devices.shape),
                    'loss': np.asarray(metrics['loss'].addressable_data(0)).tolist()}),
        flush=True)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
