"""The training loop: plain Python around the library's pure, jitted steps.

`train_and_evaluate(config, workdir)` loads the data, builds and initialises
the partitioned model, trains every block for `config.epochs` (or
`config.max_steps`), evaluates every head, and leaves metrics, TensorBoard
events, a plot and results.json in `workdir`.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

import bwbpf_jax as bw
from bwbpf_jax import data
from experiments import writers
from experiments.engine import Engine, make_engine
from experiments.config import Config


def evaluate(engine: Engine, states, dataset, config: Config, mean, std) -> dict:
  """Accuracy and mean loss of every head on the test set: {'accuracy': [K], 'loss': [K]}."""
  totals = None
  batches = data.eval_batches(dataset.test_images, dataset.test_labels,
                              batch_size=config.batch_size, mean=mean, std=std,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
  for batch in data.prefetch(batches, put=engine.put_batch):
    sums = engine.eval_step(states, batch)
    totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  return {'accuracy': totals['correct'] / totals['count'],
          'loss': totals['loss'] / totals['count']}


def train_and_evaluate(config: Config, workdir: str, log=print) -> dict:
  """Runs the whole experiment described by `config`; returns what results.json holds."""
  wall_start = time.time()
  is_chief = jax.process_index() == 0
  log = log if is_chief else (lambda *args, **kwargs: None)
  dataset = data.load_dataset(config.dataset, config.data_dir, image_size=config.image_size)
  mean, std = data.normalization_stats(dataset.train_images)
  image_shape = dataset.image_shape
  model = bw.build_model(
      config.arch, num_classes=dataset.num_classes, num_blocks=config.num_blocks,
      split_points=config.split_points, mode=config.mode, aux_head=config.aux_head,
      width=config.width, stem=config.stem or ('imagenet' if image_shape[0] >= 64 else 'cifar'),
      dtype=jnp.dtype(config.dtype))
  steps_per_epoch = data.steps_per_epoch(len(dataset.train_images), config.batch_size)
  if steps_per_epoch == 0:
    raise bw.UsageError(f'--batch_size={config.batch_size} is larger than the '
                        f'{len(dataset.train_images)} training images')
  schedule_steps = config.epochs * steps_per_epoch
  last_step = min(schedule_steps, config.max_steps or schedule_steps)
  tx = bw.make_optimizer(config.optimizer, learning_rate=config.lr, total_steps=schedule_steps,
                         momentum=config.momentum, weight_decay=config.weight_decay,
                         warmup_steps=config.warmup_epochs * steps_per_epoch)
  engine = make_engine(config, model, tx)
  states = bw.init_block_states(model, tx, jax.random.key(config.seed), image_shape)
  log(f'{config.arch} on {config.dataset} {image_shape}: {model.num_blocks} blocks of '
      f'{list(bw.partition.block_unit_counts(model))} units, mode {config.mode}, '
      f'{bw.backbone_param_count(model, states):,} backbone parameters, '
      f'{steps_per_epoch} steps/epoch, engine {engine.name} on {engine.num_devices} device(s)')
  states = engine.put_states(states)

  writer = writers.MetricWriter(workdir, enabled=is_chief)
  progress = writers.Progress(last_step, enabled=is_chief)
  step, test_metrics = 0, None
  train_seconds, timed_images = 0.0, 0
  try:
    while step < last_step:
      epoch, epoch_start_step = divmod(step, steps_per_epoch)
      batches = data.train_batches(
          dataset.train_images, dataset.train_labels, batch_size=config.batch_size,
          seed=config.seed, epoch=epoch, mean=mean, std=std, augment=config.augment,
          start_step=epoch_start_step, process_index=jax.process_index(),
          process_count=jax.process_count())
      sums, count, pending = None, 0, None
      segment_start, segment_images = None, 0
      with data.prefetch(batches, put=engine.put_batch) as stream:
        for batch in stream:
          states, metrics = engine.train_step(states, batch)
          step += 1
          # Read the previous step's metrics while this one runs: the host stays one
          # step ahead of the device and never drains the dispatch queue.
          if pending is not None:
            sums, count = _accumulate(sums, jax.device_get(pending)), count + 1
            if segment_start is None:  # The first step compiled; time from its end.
              segment_start = time.perf_counter()
            else:
              segment_images += config.batch_size
          pending = metrics
          elapsed = time.perf_counter() - segment_start if segment_start else 0.0
          progress.update(step, epoch, segment_images / elapsed if elapsed else 0.0)
          if step >= last_step or step % steps_per_epoch == 0:
            break
      sums, count = _accumulate(sums, jax.device_get(pending)), count + 1
      if segment_start is not None:
        segment_images += config.batch_size
        train_seconds += time.perf_counter() - segment_start
        timed_images += segment_images
      progress.clear()
      train_metrics = {name: value / count for name, value in sums.items()}
      writer.write({'split': 'train', 'step': step, 'epoch': step / steps_per_epoch,
                    **train_metrics})
      line = (f'epoch {step / steps_per_epoch:6.2f}  step {step:6d}  train loss '
              f'{writers.format_blocks(train_metrics["loss"])} '
              f'acc {writers.format_blocks(train_metrics["accuracy"])}')
      end_of_epoch = step % steps_per_epoch == 0
      if step >= last_step or (end_of_epoch and (step // steps_per_epoch) % config.eval_every == 0):
        test_metrics = evaluate(engine, states, dataset, config, mean, std)
        writer.write({'split': 'test', 'step': step, 'epoch': step / steps_per_epoch,
                      **test_metrics})
        line += f'  test acc {writers.format_blocks(test_metrics["accuracy"])}'
      if train_seconds:
        line += f'  {timed_images / train_seconds:.0f} img/s'
      log(line)
  finally:
    writer.close()

  results = {
      'config': config.to_dict(),
      'test_accuracy': float(test_metrics['accuracy'][-1]),
      'block_test_accuracy': test_metrics['accuracy'],
      'block_test_loss': test_metrics['loss'],
      'block_train_accuracy': train_metrics['accuracy'],
      'block_train_loss': train_metrics['loss'],
      'split_points': list(model.split_points),
      'backbone_params': bw.backbone_param_count(model, jax.device_get(states)),
      'steps': step,
      'epochs_completed': step / steps_per_epoch,
      'num_devices': engine.num_devices,
      'num_processes': jax.process_count(),
      'parallel': engine.name,
      'images_per_sec': timed_images / train_seconds if train_seconds else None,
      'wall_time_s': time.time() - wall_start,
      'platform': jax.default_backend(),
  }
  if is_chief:
    writers.write_results(workdir, results)
    writers.plot_block_curves(workdir)
  log(f'test accuracy {100 * results["test_accuracy"]:.2f}% (output head); every head: '
      f'{writers.format_blocks(100 * np.asarray(test_metrics["accuracy"]), "{:.1f}")}; '
      f'results in {workdir}')
  return results


def _accumulate(sums, metrics):
  metrics = {name: np.asarray(value, np.float64) for name, value in metrics.items()}
  return metrics if sums is None else {name: sums[name] + metrics[name] for name in sums}
