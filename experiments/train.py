"""The training loop: plain Python around the library's pure, jitted steps.

`train_and_evaluate(config, workdir)` loads the data, builds and initialises
the partitioned model, trains every block for `config.epochs` (or
`config.max_steps`; the learning-rate schedule spans whichever it is, and
`config.stop_at_step` can end the run earlier), evaluates every head, and
leaves metrics, TensorBoard events, a plot and results.json in `workdir`.

Failure handling, so that a run of hours loses at most the steps since its
last checkpoint:

- Checkpoints (orbax, `bwbpf_jax.checkpoint`) of every block's params,
  batch_stats and opt_state, plus the loop position, go to `workdir/checkpoints`
  every `checkpoint_every` steps (default: at every epoch's end) and at the end.
  Nothing else needs saving: the init key is `config.seed` and batches are a
  pure function of (seed, epoch, step), so the step fixes all randomness.
- Rerunning with the same workdir resumes from the latest checkpoint and ends
  bitwise equal to an uninterrupted run (on CPU; results.json's `params_digest`
  compares two runs). A finished run rerun only says so. metrics.jsonl records
  after the checkpoint's step are dropped, so they are not written twice.
- The workdir keeps its run's config.json; a different config is refused
  (`workdir.RESUMABLE_FIELDS` may change) unless `overwrite`, which deletes the
  run's own files in the workdir (`workdir.RUN_FILES`) and nothing else.
- A workdir holds one run at a time: `workdir.WorkdirLock` (an flock, which the kernel
  releases when the process ends, however it ends) is taken before anything is
  written, and a second run on the workdir is refused, naming the holder's host
  and pid. Nothing is written to the workdir until the config is valid, the
  data loads and the model builds, so a run that fails to start leaves the
  workdir as it found it and can be rerun with the fix.
- A non-finite loss (or parameter, checked before each save) raises
  `NonFiniteError` naming the block and step, without saving anything after the
  last good checkpoint; with `config.skip_nonfinite` the block's update is
  skipped instead and counted (metrics 'skipped', results 'skipped_updates').
- From the first file written to the workdir, SIGINT, SIGTERM and a closed
  stdout pipe finish the current step (a compilation in progress included),
  save a checkpoint and raise `Interrupted` (see experiments/stopping.py);
  before that they act as they normally would, and a second signal acts at
  once. A signal after the last step lets the run complete, then raises
  `Interrupted` too. With several
  processes every one saves (orbax saves collectively), so all must get the
  signal between the same two steps; orbax's preemption sync point
  (`CheckpointManager.reached_preemption`) is not wired in yet.

Checkpoints are written synchronously (the save waits for the host copy and
the files): simple, and exact resume and the signal path never depend on a
write still in flight.
"""

import dataclasses
import json
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import bwbpf_jax as bw
from bwbpf_jax import checkpoint
from bwbpf_jax import data
from . import stopping
from . import writers
from .config import Config
from .engine import Engine, make_engine, optimizer_steps_per_batch
from .workdir import (CHECKPOINT_DIR, WorkdirLock, check_workdir, truncate_metrics,
                                 write_workdir)


class NonFiniteError(Exception):
  """A block's loss or parameters stopped being finite; nothing after that was saved."""


# SIGINT, SIGTERM or a closed output pipe stopped the run (after saving a checkpoint
# once the run had begun writing its workdir).
Interrupted = stopping.Interrupted


def evaluate(engine: Engine, states, dataset, config: Config, mean, std,
             with_pixels: bool = False) -> dict:
  """Accuracy and mean loss of every head on the test set: {'accuracy': [K], 'loss': [K]}."""
  totals = None
  batches = data.eval_batches(dataset.test_images, dataset.test_labels,
                              batch_size=config.batch_size, mean=mean, std=std,
                              process_index=engine.feed_slice[0],
                              process_count=engine.feed_slice[1], with_pixels=with_pixels)
  states = engine.eval_states(states)
  for batch in data.prefetch(batches, put=engine.put_eval_batch or engine.put_batch):
    sums = engine.eval_step(states, batch)
    totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  return {'accuracy': totals['correct'] / totals['count'],
          'loss': totals['loss'] / totals['count']}


@dataclasses.dataclass
class LoopState:
  """Where the loop is, beyond the block states; saved with every checkpoint.

  `train_sums`/`train_count` hold the metrics since the last train record (at
  an epoch's end or every `config.log_every` steps), so a record is the same
  whether or not the run was resumed inside its span.
  """
  step: int = 0
  train_sums: Optional[dict] = None
  train_count: int = 0
  skipped_updates: Optional[list] = None  # [K] updates skipped per block, whole run.
  train_seconds: float = 0.0
  timed_images: int = 0
  wall_seconds: float = 0.0  # Time spent in the loop, over every process that ran it.

  def to_meta(self, config: Config, steps_per_epoch: int) -> dict:
    fields = dataclasses.asdict(self)
    if self.train_sums is not None:
      fields['train_sums'] = {name: np.asarray(v).tolist() for name, v in self.train_sums.items()}
    return {'seed': config.seed, 'steps_per_epoch': steps_per_epoch,
            'epoch': self.step // steps_per_epoch, 'epoch_step': self.step % steps_per_epoch,
            'loop': fields}

  @classmethod
  def from_meta(cls, meta: dict) -> 'LoopState':
    loop = cls(**meta['loop'])
    if loop.train_sums is not None:
      loop.train_sums = {name: np.asarray(v, np.float64) for name, v in loop.train_sums.items()}
    return loop

  def accumulate(self, metrics: dict):
    """Adds one step's metrics (host arrays, each [K]) to the epoch's sums."""
    metrics = {name: np.asarray(value, np.float64) for name, value in metrics.items()}
    self.train_sums = metrics if self.train_sums is None else {
        name: self.train_sums[name] + metrics[name] for name in self.train_sums}
    self.train_count += 1
    skipped = np.asarray(metrics['skipped']).astype(int)
    self.skipped_updates = (skipped if self.skipped_updates is None
                            else np.asarray(self.skipped_updates) + skipped).tolist()


def train_and_evaluate(config: Config, workdir: str, log=print, *,
                       checkpoint_every: Optional[int] = None, resume_from: str = 'latest',
                       overwrite: bool = False,
                       progress_seconds: float = writers.PROGRESS_SECONDS,
                       network: Optional[bw.Network] = None) -> dict:
  """Runs (or resumes) the whole experiment described by `config`; returns results.json's dict.

  Args:
    config: what to compute. `config.arch` names the network: a built-in one, or
      'package.module:function' returning a `bw.Network` (imported here).
    workdir: where the run's files go; a rerun with the same workdir resumes.
    log: prints a line (only the chief process logs).
    checkpoint_every: save every N steps; None: at every epoch's end; 0: only at
      the end (and on SIGINT/SIGTERM).
    resume_from: 'latest', 'previous' (the checkpoint before the latest, when the
      latest is unreadable), or a step number as a string or int.
    overwrite: delete the run files of whatever run `workdir` holds and start afresh.
    progress_seconds: when stdout is not a terminal, a progress line this often.
    network: a `bw.Network` to train instead of the one `config.arch` names
      (from Python, e.g. a notebook); `config.arch` should then name where it
      comes from ('package.module:function'), since the workdir's stored config is
      what a rerun must match.

  Raises:
    bw.UsageError: another run's config in workdir, another run using it, an
      unreadable checkpoint, bad data.
    NonFiniteError: a non-finite loss without `config.skip_nonfinite`.
    Interrupted: SIGINT or SIGTERM, after saving a checkpoint.
  """
  is_chief = jax.process_index() == 0
  if checkpoint_every is not None and checkpoint_every < 0:
    raise bw.UsageError(f'--checkpoint_every must be 0 or more, got {checkpoint_every}')
  # The chief writes the workdir's files, so it alone holds the lock.
  lock = WorkdirLock(workdir) if is_chief else None
  stop_signals = stopping.StopSignals()
  try:
    return _train_and_evaluate(config, workdir, log, lock, checkpoint_every, resume_from,
                               overwrite, progress_seconds, stop_signals, network)
  finally:
    stop_signals.restore()
    if lock is not None:
      lock.release()


def _network(config: Config, network, stem: str) -> bw.Network:
  """The network the run trains: the one given, a built-in one by name, or a user's by import path.

  Width, stem and dtype shape the built-in networks; a user's network is built
  by its own code.
  """
  if network is not None:
    if not isinstance(network, bw.Network):
      raise bw.UsageError(f'network must be a bwbpf_jax.Network, got a {type(network).__name__}')
    return network
  if config.arch in bw.ARCHITECTURES:
    return bw.models.network(config.arch, width=config.width, stem=stem,
                             dtype=jnp.dtype(config.dtype))
  return bw.models.resolve(config.arch)  # package.module:function, or a one-line error.


def _train_and_evaluate(config, workdir, log, lock, checkpoint_every, resume_from, overwrite,
                        progress_seconds, stop_signals, network) -> dict:
  """train_and_evaluate, holding the workdir."""
  wall_start = time.time()
  is_chief = jax.process_index() == 0
  log = log if is_chief else (lambda *args, **kwargs: None)
  log = stop_signals.guard_output(log)
  check_workdir(config, workdir, overwrite)
  dataset = data.load_dataset(config.dataset, config.data_dir, image_size=config.image_size)
  mean, std = data.normalization_stats(dataset.train_images)
  image_shape = dataset.image_shape
  stem = config.stem or ('imagenet' if image_shape[0] >= 64 else 'cifar')
  network = _network(config, network, stem)
  split_points = config.split_points
  if split_points is None:  # Config refuses split_points with a split_by other than 'stages'.
    split_points = bw.cost.split_points_by(
        config.split_by, network, config.num_blocks, image_shape,
        batch_size=config.batch_size)
  model = bw.build_model(
      network, num_classes=dataset.num_classes, num_blocks=config.num_blocks,
      split_points=split_points, mode=config.mode, aux_head=config.aux_head,
      dtype=jnp.dtype(config.dtype), remat=config.remat,
      local_loss=config.local_loss, loss_weights=config.loss_weights,
      auglocal_depth=config.auglocal_depth)
  aux_flops = bw.aux_flop_fractions(model, image_shape)
  steps_per_epoch = data.steps_per_epoch(len(dataset.train_images), config.batch_size)
  if steps_per_epoch == 0:
    raise bw.UsageError(f'--batch_size={config.batch_size} is larger than the '
                        f'{len(dataset.train_images)} training images')
  # max_steps replaces the epochs; the warm-up keeps its share of the schedule.
  schedule_steps = config.max_steps or config.epochs * steps_per_epoch
  warmup_steps = round(schedule_steps * config.warmup_epochs / config.epochs)
  last_step = min(schedule_steps, config.stop_at_step or schedule_steps)
  # Block-parallel pipelines make one optimizer step per micro-batch.
  updates_per_batch = optimizer_steps_per_batch(config)
  # Built once: the optimizer trains with it and the records log the rate from it.
  default_lr = bw.optimizers.DEFAULT_LEARNING_RATES[config.optimizer]
  peak_lr = default_lr if config.lr is None else config.lr  # None: the optimizer's default.
  learning_rate = bw.optimizers.learning_rate_schedule(
      peak_lr, total_steps=schedule_steps * updates_per_batch,
      warmup_steps=warmup_steps * updates_per_batch)
  tx = bw.make_optimizer(config.optimizer, learning_rate=learning_rate,
                         momentum=config.momentum, weight_decay=config.weight_decay,
                         nesterov=config.nesterov)

  # Checks the device setup before anything is saved.
  engine = make_engine(config, model, tx, image_shape)
  # From the first file written, a signal stops the run between steps, after a checkpoint
  # (until here it stops the run at once, and the lock removes what it created).
  stop_signals.defer()
  if is_chief:  # The run starts: from here on the workdir is its.
    write_workdir(config, workdir, overwrite, log)
    lock.keep()
  manager = checkpoint.make_manager(os.path.join(workdir, CHECKPOINT_DIR))
  try:
    start_step = _resume_step(manager, resume_from)
    if start_step is not None and start_step >= last_step:
      return _already_finished(workdir, start_step, last_step, log)
    abstract_states = bw.abstract_block_states(model, tx, image_shape)
    if start_step is None:
      states = engine.put_states(
          bw.init_block_states(model, tx, jax.random.key(config.seed), image_shape))
      loop = LoopState()
    else:
      states, loop = _restore(engine, manager, start_step, abstract_states, config,
                              steps_per_epoch)
    width = f' x{config.width:g}' if config.arch in bw.ARCHITECTURES else ''
    log(f'{model.arch}{width} on {config.dataset} {image_shape}: '
        f'{model.num_blocks} blocks of {list(bw.partition.block_unit_counts(model))} units, '
        f'mode {config.mode}, {bw.backbone_param_count(model, abstract_states):,} backbone parameters '
        f'({bw.state.count_params([s.params for s in abstract_states]):,} with the auxiliary heads), '
        f'{steps_per_epoch} steps/epoch, {_placement(engine)}')
    log(_describe_data(dataset, config))
    lr_source = f' ({config.optimizer}\'s default)' if peak_lr == default_lr else ''
    log(f'{config.optimizer} learning rate {peak_lr:g}{lr_source}, {warmup_steps} warm-up steps, cosine decay to 0 at '
        f'step {schedule_steps}; augmentation {config.augment}')
    log(f'auxiliary heads {config.aux_head} with loss {config.local_loss}: '
        f'{100 * aux_flops["total"]:.2f}% of the backbone\'s FLOPs (per head: '
        f'{writers.format_blocks(100 * np.asarray(aux_flops["per_head"]), "{:.2f}")}%)')
    if start_step is None:
      log(f'starting at step 0 of {last_step}; checkpoints in {manager.directory}')
    else:
      log(f'resuming at step {start_step} of {last_step} (epoch '
          f'{start_step / steps_per_epoch:.2f}) from {checkpoint.step_path(manager, start_step)}')
    if is_chief:
      truncate_metrics(workdir, start_step or 0)
    run = _Run(config, workdir, engine, manager, dataset, mean, std, steps_per_epoch,
               last_step, checkpoint_every, log, is_chief,
               lambda step: float(learning_rate(max(step * updates_per_batch - 1, 0))),
               progress_seconds, stop_signals, with_pixels=bw.step.needs_pixels(model))
    states, loop, train_metrics, test_metrics = run.train(states, loop, start_step)
    run.check_finite_params(states, loop.step)
    results = {
        'config': config.to_dict(),
        'data': data_identity(dataset, config),
        'test_accuracy': float(test_metrics['accuracy'][-1]),
        'block_test_accuracy': test_metrics['accuracy'],
        'block_test_loss': test_metrics['loss'],
        'block_train_accuracy': train_metrics['accuracy'],
        'block_train_loss': train_metrics['loss'],
        'num_blocks': model.num_blocks,
        'split_points': list(model.split_points),
        'backbone_params': bw.backbone_param_count(model, abstract_states),
        'aux_flop_fraction': aux_flops['total'],
        'aux_flop_fraction_per_head': aux_flops['per_head'],
        'params_digest': checkpoint.combine_block_digests(engine.block_digests(states)),
        'skipped_updates': loop.skipped_updates,
        'steps': loop.step,
        'epochs_completed': loop.step / steps_per_epoch,
        'resumed_from_step': start_step,
        'num_devices': engine.num_devices,
        'mesh': engine.mesh_shape,
        'num_processes': jax.process_count(),
        'parallel': engine.name,
        # The stage pipeline's BatchNorm statistics (None for the other engines).
        'pipeline_batch_norm': engine.batch_norm,
        'images_per_sec': loop.timed_images / loop.train_seconds if loop.train_seconds else None,
        'wall_time_s': time.time() - wall_start,
        'platform': jax.default_backend(),
    }
    if is_chief:
      writers.write_results(workdir, results)
      writers.plot_block_curves(workdir, writers.run_title(results))
    # The final checkpoint comes after results.json: a checkpoint at the last step
    # means the run is complete, and a rerun then has nothing to do.
    run.save(states, loop)
  finally:
    manager.close()
  log(f'test accuracy {100 * results["test_accuracy"]:.2f}% (output head); every head: '
      f'{writers.format_blocks(100 * np.asarray(test_metrics["accuracy"]), "{:.1f}")}; '
      f'results in {workdir}')
  if stop_signals.signum is not None:  # It came after the last step: the run is complete.
    raise Interrupted(f'stopped by {stopping.signal_name(stop_signals.signum)} after the last '
                      f'step ({loop.step}); the run is complete, results in {workdir}',
                      stop_signals.signum)
  return results


class _Run:
  """The loop of one process over its remaining steps; owns the writers and the signals."""

  def __init__(self, config, workdir, engine, manager, dataset, mean, std, steps_per_epoch,
               last_step, checkpoint_every, log, is_chief, learning_rate, progress_seconds,
               stop_signals, with_pixels=False):
    self.config, self.workdir, self.engine, self.manager = config, workdir, engine, manager
    # Batches carry the unnormalised images when a block reconstructs them.
    self.with_pixels = with_pixels
    self.dataset, self.mean, self.std = dataset, mean, std
    self.steps_per_epoch, self.last_step = steps_per_epoch, last_step
    self.checkpoint_every, self.log, self.is_chief = checkpoint_every, log, is_chief
    # The learning rate of the last update before a step: learning_rate(step) -> float.
    self.learning_rate, self.progress_seconds = learning_rate, progress_seconds
    self.stop_signals = stop_signals  # SIGINT, SIGTERM and a closed stdout pipe.
    self.saved_step = None
    self.clock = None  # (loop.wall_seconds, time.monotonic()) when this process began.
    self.last_record = None  # (train_seconds, timed_images) at the previous train record.

  def elapsed(self) -> float:
    """Seconds spent in the loop so far, counting the runs this one resumed."""
    return self.clock[0] + time.monotonic() - self.clock[1]

  def record_due(self, step: int) -> bool:
    """Training metrics are recorded at each epoch's end, the last step and every log_every."""
    log_every = self.config.log_every
    return (step % self.steps_per_epoch == 0 or step >= self.last_step
            or (log_every is not None and step % log_every == 0))

  def checkpoint_due(self, step: int) -> bool:
    if step == 0:
      return False
    if self.checkpoint_every is None:
      return step % self.steps_per_epoch == 0
    return self.checkpoint_every > 0 and step % self.checkpoint_every == 0

  def save(self, states, loop: LoopState) -> str:
    """Checkpoints `states` after `loop.step` steps, unless that step is saved already."""
    path = checkpoint.step_path(self.manager, loop.step)
    if self.saved_step == loop.step:
      return path
    self.check_finite_params(states, loop.step)
    loop.wall_seconds = self.elapsed()
    self.engine.save_checkpoint(self.manager, loop.step, states,
                                loop.to_meta(self.config, self.steps_per_epoch))
    self.saved_step = loop.step
    return path

  def check_finite_params(self, states, step: int):
    """A checkpoint is good only if its parameters are finite (unless skipping is on)."""
    if self.config.skip_nonfinite:
      return
    finite = self.engine.finite_blocks(states)
    for k, block_finite in enumerate(finite):
      if not block_finite:
        raise NonFiniteError(f'non-finite parameters in block {k + 1} of {len(finite)} '
                             f'after step {step}; not saved. {self.last_good()}')

  def last_good(self) -> str:
    saved = checkpoint.steps(self.manager)
    if not saved:
      return 'No checkpoint was saved.'
    return (f'Last good checkpoint: step {saved[-1]} in {self.manager.directory} (rerun with '
            f'--skip_nonfinite to skip such updates, or change the config with --overwrite).')

  def take_metrics(self, loop: LoopState, metrics, step: int):
    """Adds step `step`'s metrics to the epoch's, stopping the run if a loss is not finite."""
    metrics = jax.device_get(metrics)
    loss = np.asarray(metrics['loss'])
    if not self.config.skip_nonfinite and not np.all(np.isfinite(loss)):
      blocks = np.flatnonzero(~np.isfinite(loss))
      names = ', '.join(f'{k + 1} (loss {loss[k]})' for k in blocks)
      raise NonFiniteError(
          f'non-finite loss at step {step} in block{"s" if len(blocks) > 1 else ""} {names} '
          f'of {len(loss)}; stopped without saving it. {self.last_good()}')
    loop.accumulate(metrics)

  def train(self, states, loop: LoopState, start_step):
    """Trains from `loop.step` to the last step; returns (states, loop, train and test metrics)."""
    config, steps_per_epoch, last_step = self.config, self.steps_per_epoch, self.last_step
    self.saved_step = start_step
    self.clock = (loop.wall_seconds, time.monotonic())
    self.last_record = (loop.train_seconds, loop.timed_images)
    writer = writers.MetricWriter(self.workdir, enabled=self.is_chief)
    progress = writers.Progress(last_step, steps_per_epoch, config.batch_size,
                                enabled=self.is_chief, interval_s=self.progress_seconds,
                                log=self.log)
    train_metrics = test_metrics = None
    stop = self.stop_signals
    try:
      while True:
        if stop.signum is not None and loop.step < last_step:
          self.stop(states, loop, stop.signum, progress)
        step = loop.step
        # The records, once the epoch's last step (or the run's, or a log_every's) is done.
        # A run stopped by a signal right there writes them when it resumes.
        if loop.train_count and self.record_due(step):
          train_metrics, evaluated = self.write_records(states, loop, writer, progress)
          test_metrics = evaluated or test_metrics
        if step >= last_step:
          break
        if self.checkpoint_due(step):
          self.save(states, loop)
        if stop.signum is not None:
          self.stop(states, loop, stop.signum, progress)
        states = self.train_segment(states, loop, stop, progress)
    finally:
      progress.close()
      writer.close()
    return states, loop, train_metrics, test_metrics

  def train_segment(self, states, loop: LoopState, stop, progress):
    """Steps until a record or a checkpoint is due, the run ends, or a signal comes."""
    config, steps_per_epoch = self.config, self.steps_per_epoch
    epoch, epoch_step = divmod(loop.step, steps_per_epoch)
    batches = data.train_batches(
        self.dataset.train_images, self.dataset.train_labels, batch_size=config.batch_size,
        seed=config.seed, epoch=epoch, mean=self.mean, std=self.std, augment=config.augment,
        start_step=epoch_step, process_index=self.engine.feed_slice[0],
        process_count=self.engine.feed_slice[1], with_pixels=self.with_pixels)
    pending, segment_start, segment_images = None, None, 0
    with data.prefetch(batches, put=self.engine.put_batch) as stream:
      for batch in stream:
        states, metrics = self.engine.train_step(states, batch)
        loop.step += 1
        # Read the previous step's metrics while this one runs: the host stays one
        # step ahead of the device and never drains the dispatch queue.
        if pending is not None:
          self.take_metrics(loop, pending, loop.step - 1)
          if segment_start is None:  # The first step compiled; time from its end.
            segment_start = time.perf_counter()
          else:
            segment_images += config.batch_size
        pending = metrics
        elapsed = time.perf_counter() - segment_start if segment_start else 0.0
        progress.update(loop.step, epoch, segment_images / elapsed if elapsed else 0.0)
        if (self.record_due(loop.step) or self.checkpoint_due(loop.step)
            or stop.signum is not None):
          break
    # A pipelined engine finishes the micro-batches still in flight, so checkpoints,
    # evaluation and the next segment see well-defined states.
    states, pending = self.engine.drain(states, pending)
    self.take_metrics(loop, pending, loop.step)
    if segment_start is not None:
      loop.train_seconds += time.perf_counter() - segment_start
      loop.timed_images += segment_images + config.batch_size
    return states

  def write_records(self, states, loop: LoopState, writer, progress):
    """Writes the train record of the steps since the last one (and evaluates at an epoch's
    end when due); resets the sums."""
    step, steps_per_epoch = loop.step, self.steps_per_epoch
    progress.clear()
    # Means over the record's steps, but 'skipped': the updates skipped in its span.
    train_metrics = {name: value if name == 'skipped' else value / loop.train_count
                     for name, value in loop.train_sums.items()}
    loop.train_sums, loop.train_count = None, 0
    # images/s over the steps since the previous record that this process timed.
    seconds = loop.train_seconds - self.last_record[0]
    images = loop.timed_images - self.last_record[1]
    self.last_record = (loop.train_seconds, loop.timed_images)
    elapsed = self.elapsed()
    writer.write({'split': 'train', 'step': step, 'epoch': step / steps_per_epoch,
                  **train_metrics, 'learning_rate': self.learning_rate(step),
                  'images_per_sec': images / seconds if seconds > 0 else None,
                  'elapsed_s': elapsed})
    line = (f'epoch {step / steps_per_epoch:6.2f}  step {step:6d}  train loss '
            f'{writers.format_blocks(train_metrics["loss"])} '
            f'acc {writers.format_blocks(train_metrics["accuracy"])}')
    test_metrics = None
    end_of_epoch = step % steps_per_epoch == 0
    if step >= self.last_step or (
        end_of_epoch and (step // steps_per_epoch) % self.config.eval_every == 0):
      test_metrics = evaluate(self.engine, states, self.dataset, self.config, self.mean,
                              self.std, with_pixels=self.with_pixels)
      writer.write({'split': 'test', 'step': step, 'epoch': step / steps_per_epoch,
                    **test_metrics, 'elapsed_s': self.elapsed()})
      line += f'  test acc {writers.format_blocks(test_metrics["accuracy"])}'
    if np.any(train_metrics['skipped']):
      line += f'  skipped updates {loop.skipped_updates}'
    if loop.train_seconds:
      line += f'  {loop.timed_images / loop.train_seconds:.0f} img/s'
    self.log(line)
    return train_metrics, test_metrics

  def stop(self, states, loop: LoopState, signum: int, progress):
    progress.clear()
    path = self.save(states, loop)
    raise Interrupted(f'stopped by {stopping.signal_name(signum)} at step {loop.step} of '
                      f'{self.last_step}; checkpoint in {path}; rerun the same command to resume',
                      signum)


def _resume_step(manager, resume_from) -> Optional[int]:
  """The checkpoint step to start from (None: from scratch)."""
  available = checkpoint.steps(manager)
  where = f'{manager.directory} (checkpoints: {", ".join(map(str, available)) or "none"})'
  resume_from = str(resume_from)
  if resume_from == 'latest':
    return available[-1] if available else None
  if resume_from == 'previous':
    if len(available) < 2:
      raise bw.UsageError(f'--resume_from=previous needs two checkpoints in {where}')
    return available[-2]
  if not resume_from.isdigit():
    raise bw.UsageError(f'--resume_from must be latest, previous or a step number, '
                        f'got {resume_from!r}')
  if int(resume_from) not in available:
    raise bw.UsageError(f'no checkpoint of step {resume_from} in {where}')
  return int(resume_from)


def _restore(engine, manager, step, abstract_states, config, steps_per_epoch):
  """Block states (placed by the engine) and loop state of checkpoint `step`, checked."""
  try:
    states, meta = engine.restore_checkpoint(manager, step, abstract_states)
  except bw.UsageError as e:
    earlier = [s for s in checkpoint.steps(manager) if s < step]
    hint = (f'rerun with --resume_from=previous to resume from step {earlier[-1]}' if earlier
            else 'rerun with --overwrite to start again')
    raise bw.UsageError(f'{e}; {hint}') from None
  path = checkpoint.step_path(manager, step)
  if meta.get('seed') != config.seed or meta.get('steps_per_epoch') != steps_per_epoch:
    raise bw.UsageError(
        f'checkpoint {path} was made with seed {meta.get("seed")} and '
        f'{meta.get("steps_per_epoch")} steps/epoch, this run has {config.seed} and '
        f'{steps_per_epoch}; use another --workdir or --overwrite')
  # Checkpoints after this one belong to a trajectory being replaced (or are unreadable).
  for newer in [s for s in checkpoint.steps(manager) if s > step]:
    checkpoint.delete(manager, newer)
  return states, LoopState.from_meta(meta)


def _already_finished(workdir, step, last_step, log) -> dict:
  path = os.path.join(workdir, writers.RESULTS_FILE)
  results = {}
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
  log(f'{workdir} holds a finished run (checkpoint at step {step}, this config stops at '
      f'{last_step}); nothing to do. Results: {path}'
      + (f', test accuracy {100 * results["test_accuracy"]:.2f}%'
         if isinstance(results.get('test_accuracy'), float) else ''))
  return results
def _placement(engine: Engine, devices=None) -> str:
  """Where the step runs: --parallel's value, the mesh and its devices.

  E.g. '--parallel=blocks: mesh 2 data x 2 stage over 4 cpu devices (ids 0-3, 2 processes)'.
  """
  if engine.name == 'none':
    return f'one {jax.default_backend()} device (--parallel=none)'
  devices = list(devices if devices is not None else jax.devices())[:engine.num_devices]
  mesh = ' x '.join(f'{size} {axis}' for axis, size in (engine.mesh_shape or {}).items())
  platforms = '/'.join(sorted({device.platform for device in devices}))
  text = (f'--parallel={engine.name}: mesh {mesh or engine.num_devices} over '
          f'{len(devices)} {platforms} devices (ids {_ranges(d.id for d in devices)}')
  processes = sorted({device.process_index for device in devices})
  if len(processes) > 1:
    text += f', {len(processes)} processes'
  return text + ')'


def _ranges(numbers) -> str:
  """'0-3, 8, 10-11': sorted integers as runs."""
  numbers = sorted(numbers)
  runs = []
  for number in numbers:
    if runs and number == runs[-1][1] + 1:
      runs[-1][1] = number
    else:
      runs.append([number, number])
  return ', '.join(str(a) if a == b else f'{a}-{b}' for a, b in runs)


def data_identity(dataset, config: Config) -> dict:
  """What the run trained and tested on, for results.json: runs of other data never pool.

  The folder is resolved (a symlink or a relative path names the same data); the
  classes and image counts tell two copies of a dataset apart when a folder changed.
  """
  folder = config.data_dir and os.path.realpath(os.path.expanduser(config.data_dir))
  return {'name': dataset.name, 'data_dir': folder or None,
          'num_classes': dataset.num_classes, 'class_names': list(dataset.class_names),
          'train_images': len(dataset.train_images), 'test_images': len(dataset.test_images),
          'image_shape': list(dataset.image_shape)}


def _describe_data(dataset, config: Config) -> str:
  """The header line about the data: classes, images per split, where decoded copies are kept."""
  text = (f'data: {dataset.num_classes} classes, {len(dataset.train_images):,} train and '
          f'{len(dataset.test_images):,} test images')
  if config.max_steps is None:
    text += f', {config.epochs} epochs'
  else:
    text += f', {config.max_steps} steps (--max_steps)'
  if dataset.cache_path is not None:
    size = os.path.getsize(dataset.cache_path) if os.path.exists(dataset.cache_path) else 0
    text += (f'; decoded images cached in {dataset.cache_path} ({size / 2**20:.0f} MiB; '
             f'BWBPF_CACHE_DIR moves it, deleting it costs one decode)')
  return text


