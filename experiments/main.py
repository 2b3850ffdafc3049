r"""Trains a network block-wise (BWBPF), with deep supervision, or with backprop.

    python -m experiments.main                                  # offline: digits, ~1 min on CPU
    python -m experiments.main --arch=vgg16 --dataset=cifar10   # the paper's recipe
    python -m experiments.main --preset=paper_cifar10_resnet101_k8 --data_dir=...

Flags left unset take the preset's value, then the dataset's default (see
experiments/config.py).

Checkpoints and resuming (see experiments/train.py): every block's state and
the loop position are saved in <workdir>/checkpoints every --checkpoint_every
steps (default: at each epoch's end) and at the end. Rerunning the same
command with the same --workdir resumes from the latest checkpoint and ends
bitwise as an uninterrupted run would (compare results.json's params_digest);
a finished run rerun says so and exits 0. Only --stop_at_step, --eval_every and
--skip_nonfinite may differ from the config stored in the workdir. A workdir
holds one run at a time: a second run started on it exits 2 naming the first
one's host and pid, and a run that fails to start writes nothing there.

Quick runs: --max_steps=N trains N steps in all, with warm-up and decay fitted
to them (a complete short run); --stop_at_step=N stops after N steps of the
full schedule, and a rerun with a larger N (or without it) carries on.

Output: every epoch a line of every block's loss and accuracy (blocks are
numbered 1..K everywhere); while training, a progress bar on a terminal, and a
progress line every --progress_seconds when stdout is a file.

    --checkpoint_every=N     save every N steps (0: only at the end and on a signal)
    --resume_from=previous   the checkpoint before the latest (if that one is corrupt),
                             or =<step>; later checkpoints are then deleted
    --skip_nonfinite         skip and count a block's update whose loss is not finite
    --overwrite              delete the workdir's run files and start afresh
    --list_presets           print the named presets and their settings

Several devices and hosts (see experiments/engine.py):

    --parallel=data          the step sharded over every device (default when JAX
                             sees more than one); the batch must divide evenly
    --parallel=blocks        a stage pipeline over a (data, stage) mesh of every device:
                             --pipeline_stages=S (default K), --microbatches=M
    --coordinator_address=host:port --num_processes=N --process_id=I
                             one process per host (TPU pods and SLURM jobs are
                             detected without these); each reads its slice of
                             every batch, process 0 writes the logs and results

Exit codes, each failure with one line on stderr:
    0    finished (or was already finished); also --help, -h, --helpfull, --list_presets
    2    a mistake in the flags, the data, the workdir (another run's config, or
         another run still using it) or an unreadable checkpoint (named)
    3    a block's loss became non-finite (block and step named; nothing after the
         last good checkpoint saved); rerun with --skip_nonfinite, or change the
         config with --overwrite
    130  stopped by Ctrl-C (SIGINT) after saving a checkpoint; 143: by SIGTERM;
    141  stopped because the output pipe closed (`... | head`), after saving a checkpoint
(1 is left to Python itself: an uncaught exception, a bug to report.)
"""

import os
import sys

from . import xla_defaults

xla_defaults.apply()  # Before JAX starts.
# TensorFlow (imported for tfds datasets only, to decode images) announces its oneDNN
# kernels on stderr, where a user's error should be one line; it computes nothing here.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging

import bwbpf_jax
from bwbpf_jax.data import AUGMENTATIONS, DATASET_NAMES
from . import config as config_lib

FLAGS = flags.FLAGS
_UNSET = None
flags.DEFINE_string('preset', None, f'Named configuration (--list_presets shows their '
                    f'settings): {", ".join(config_lib.PRESETS)}.')
flags.DEFINE_enum('dataset', _UNSET, DATASET_NAMES, 'Dataset (default: digits, offline).')
flags.DEFINE_enum('arch', _UNSET, bwbpf_jax.ARCHITECTURES, 'Architecture.')
flags.DEFINE_integer('num_blocks', _UNSET, 'K, blocks the network is cut into (1 = backprop).')
flags.DEFINE_list('split_points', _UNSET, 'Unit indices where blocks 2..K start '
                  '(overrides --num_blocks).')
flags.DEFINE_enum('split_by', _UNSET, config_lib.SPLIT_BY, 'The cut into --num_blocks '
                  'blocks: stages (the paper: at stage boundaries, units shared evenly) or '
                  'activations (balance the activation memory of the blocks: the smallest '
                  'peak memory of the block-wise step).')
flags.DEFINE_enum('mode', _UNSET, bwbpf_jax.MODES, 'bwbpf: isolated blocks; deep_supervision: '
                  'the reference code (gradients cross blocks); bp: end-to-end backprop.')
flags.DEFINE_enum('aux_head', _UNSET, bwbpf_jax.HEADS, 'Auxiliary head of blocks 1..K-1: '
                  'linear (the paper), mlp, dgl (DGL\'s MLP-SR), infopro (InfoPro\'s 1c2f), '
                  'auglocal (copies of sampled later units).')
flags.DEFINE_integer('auglocal_depth', _UNSET, 'Later units copied into the first block\'s '
                     'auglocal head (AugLocal\'s depth, default 2; falls to about half at the '
                     'last auxiliary block).')
flags.DEFINE_enum('local_loss', _UNSET, bwbpf_jax.LOSSES, 'Loss of blocks 1..K-1: xent, '
                  'xent_recon (+ InfoPro\'s image reconstruction), supcon (supervised '
                  'contrastive), supcon_recon (InfoPro\'s contrastive variant).')
flags.DEFINE_list('loss_weights', _UNSET, 'For *_recon losses: reconstruction and task weight '
                  'of the first and of the last auxiliary block, e.g. 1,1,0,1 (linear between).')
flags.DEFINE_float('width', _UNSET, 'Channel multiplier (0.25 for CPU runs).')
flags.DEFINE_enum('stem', _UNSET, ('cifar', 'imagenet'), 'ResNet stem (default: by image size).')
flags.DEFINE_enum('dtype', _UNSET, ('float32', 'bfloat16'), 'Computation dtype.')
flags.DEFINE_integer('image_size', _UNSET, 'Resize images to this side.')
flags.DEFINE_integer('epochs', _UNSET, 'Epochs; the cosine schedule spans them.')
flags.DEFINE_integer('max_steps', _UNSET, 'Train this many steps in all instead of --epochs, '
                     'with warm-up and decay fitted to them (a complete short run).')
flags.DEFINE_integer('stop_at_step', _UNSET, 'Stop after this many steps of the full schedule; '
                     'a rerun with a larger value (or without it) resumes the run.')
flags.DEFINE_integer('batch_size', _UNSET, 'Global batch size.')
flags.DEFINE_enum('optimizer', _UNSET, bwbpf_jax.OPTIMIZERS, 'Per-block optimizer.')
flags.DEFINE_float('lr', _UNSET, 'Peak learning rate.')
flags.DEFINE_float('momentum', _UNSET, 'SGD momentum.')
flags.DEFINE_bool('nesterov', _UNSET, 'Nesterov momentum (SGD).')
flags.DEFINE_float('weight_decay', _UNSET, 'Weight decay.')
flags.DEFINE_integer('warmup_epochs', _UNSET, 'Linear warm-up epochs before the cosine decay.')
flags.DEFINE_enum('augment', _UNSET, AUGMENTATIONS, 'Training augmentation: random crop '
                  'and horizontal flip, crop only, or none (default: crop for digits, whose '
                  'mirror images are other shapes; crop_flip otherwise).')
flags.DEFINE_integer('seed', _UNSET, 'Seed of initialisation, shuffling and augmentation.')
flags.DEFINE_integer('eval_every', _UNSET, 'Evaluate every N epochs (and at the end).')
flags.DEFINE_enum('train_step', _UNSET, ('auto', 'fused', 'blockwise'),
                  'fused: one jitted step; blockwise: one jitted call per block (bwbpf; less '
                  'memory); auto: blockwise for bwbpf.')
flags.DEFINE_bool('remat', _UNSET, 'Gradient checkpointing: every unit under jax.checkpoint, '
                  'keeping only unit inputs for the backward pass (same update, less memory, '
                  'one more forward pass); any mode.')
flags.DEFINE_enum('parallel', _UNSET, ('auto', 'none', 'data', 'blocks'),
                  'data: the step sharded over all devices (the batch split, gradients '
                  'averaged); blocks: a stage pipeline over a (data x stage) mesh of every '
                  'device, pipelined over micro-batches (bwbpf); none: one device; auto: data when several devices are present.')
flags.DEFINE_integer('pipeline_stages', _UNSET, 'Pipeline stages for --parallel=blocks '
                     '(default: one per block); contiguous blocks are grouped by cost, and '
                     'the device count must be a multiple of it (data = devices / stages).')
flags.DEFINE_enum('pipeline_batch_norm', _UNSET, ('rows', 'global'),
                  'BatchNorm statistics of --parallel=blocks over several data rows: rows '
                  '(default; each data row normalises with its own statistics and no '
                  'collective runs inside a conditional, safe on GPU/TPU) or global (over '
                  'all rows, as --parallel=data; an all-reduce inside each stage\'s branch).')
flags.DEFINE_integer('microbatches', _UNSET, 'Micro-batches per batch for --parallel=blocks '
                     '(each is an optimizer step).')
flags.DEFINE_string('data_dir', _UNSET, 'Dataset folder (tfds data_dir or image folder).')
flags.DEFINE_bool('skip_nonfinite', _UNSET, 'Skip (and count) a block\'s update when its loss '
                  'or gradient is not finite, instead of stopping the run.')
flags.DEFINE_string('workdir', None, 'Output folder (default: runs/<dataset>_<arch>_<mode>); '
                    'a rerun with the same workdir resumes.')
flags.DEFINE_integer('checkpoint_every', None, 'Save a checkpoint every N steps (default: at '
                     'each epoch\'s end; 0: only at the end and on SIGINT/SIGTERM).')
flags.DEFINE_string('resume_from', 'latest', 'Checkpoint to resume from: latest, previous (the '
                    'one before the latest), or a step number.')
flags.DEFINE_bool('overwrite', False, 'Delete the run files (checkpoints, metrics, results) of '
                  'the run in --workdir and start afresh (not in a command rerun to resume).')

flags.DEFINE_bool('list_presets', False, 'Print every named preset and its settings, then exit.')
flags.DEFINE_float('progress_seconds', 30, 'When stdout is not a terminal (a log file), print a '
                   'progress line this often (step, epoch, images/s, time left).')

flags.DEFINE_string('coordinator_address', None, 'Multi-process runs: host:port of process '
                    '0. Without it JAX detects TPU pods and SLURM/MPI/Kubernetes jobs itself.')
flags.DEFINE_integer('num_processes', None, 'Multi-process runs: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-process runs: this process\'s index.')

# Flags that are not run configuration.
_NOT_CONFIG = ('preset', 'workdir', 'checkpoint_every', 'resume_from', 'overwrite',
               'coordinator_address', 'num_processes', 'process_id')


def _given_flags() -> dict:
  """The configuration flags set on the command line, as Config fields."""
  names = [field for field in config_lib.FIELD_NAMES if field in FLAGS]
  values = {name: FLAGS[name].value for name in names
            if FLAGS[name].present and name not in _NOT_CONFIG}
  if 'split_points' in values:
    try:
      values['split_points'] = tuple(int(p) for p in values['split_points'])
    except ValueError as e:
      raise bwbpf_jax.UsageError(f'--split_points must be integers: {e}') from None
  if 'loss_weights' in values:
    try:
      values['loss_weights'] = tuple(float(w) for w in values['loss_weights'])
    except ValueError as e:
      raise bwbpf_jax.UsageError(f'--loss_weights must be numbers: {e}') from None
  return values


# --augment was a boolean before it named a choice; the old spellings still work.
# -h is the usual short help (absl's own is -?).
_OLD_SPELLINGS = {'--augment': '--augment=crop_flip', '--noaugment': '--augment=none',
                  '-h': '--help'}
_HELP_FLAGS = ('--help', '-?', '--helpshort', '--helpfull', '--helpxml')
# Exit codes (see the module docstring and README.md).
EXIT_USAGE = 2
EXIT_NONFINITE = 3


def _parse_flags(argv):
  """absl's parser, but a bad flag is one line and exit code 2, and help exits 0."""
  argv = [_OLD_SPELLINGS.get(arg, arg) for arg in argv]
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(EXIT_USAGE)
  except SystemExit as e:
    # absl's help flags print the help and exit 1; asking for help is not a failure.
    if e.code == 1 and any(arg.split('=')[0] in _HELP_FLAGS for arg in argv[1:]):
      _exit_quietly_if_output_closed(sys.stdout.flush)
      sys.exit(0)
    raise


def _exit_quietly_if_output_closed(write):
  """Calls `write`; a closed stdout pipe (`--list_presets | head -1`) just ends the output."""
  try:
    write()
    sys.stdout.flush()
  except BrokenPipeError:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit then goes nowhere.
    os.close(devnull)


def _quiet_closed_loop_callbacks():
  """Drops the 'Event loop is closed' errors orbax's readers raise after a failed restore.

  When one array of a corrupt checkpoint fails to read, orbax closes its event
  loop while the other reads are still finishing; their callbacks then fail
  into `sys.unraisablehook` and print tracebacks after the one-line error. They
  say nothing more than that error; any other unraisable error is still shown.
  """
  default_hook = sys.unraisablehook

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == 'Event loop is closed'):
      default_hook(unraisable)
  sys.unraisablehook = hook


def main(argv):
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]} (flags look like --name=value)',
          file=sys.stderr)
    sys.exit(EXIT_USAGE)
  if FLAGS.list_presets:
    _exit_quietly_if_output_closed(lambda: print('\n'.join(config_lib.describe_presets())))
    return
  # A log file gets every line as it is printed, not when a buffer fills.
  sys.stdout.reconfigure(line_buffering=True)
  logging.set_verbosity(logging.WARNING)  # JAX's backend probing is not news to a user.
  _quiet_closed_loop_callbacks()
  from . import train  # pylint: disable=g-import-not-at-top  (imports JAX)
  from bwbpf_jax import parallel  # pylint: disable=g-import-not-at-top
  try:
    multi_process = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if any(value is not None for value in multi_process):
      if None in multi_process[1:]:
        raise bwbpf_jax.UsageError('a multi-process run needs --num_processes and --process_id '
                                   '(and --coordinator_address outside TPU pods and clusters)')
      if not 0 <= FLAGS.process_id < FLAGS.num_processes:
        raise bwbpf_jax.UsageError(f'--process_id must be in [0, {FLAGS.num_processes}), '
                                   f'got {FLAGS.process_id}')
    parallel.initialize_distributed(*multi_process)
    config = config_lib.make_config(_given_flags(), FLAGS.preset)
    workdir = FLAGS.workdir or default_workdir(config, FLAGS.preset)
    train.train_and_evaluate(config, workdir, checkpoint_every=FLAGS.checkpoint_every,
                             resume_from=FLAGS.resume_from, overwrite=FLAGS.overwrite,
                             progress_seconds=FLAGS.progress_seconds)
  except bwbpf_jax.UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(EXIT_USAGE)
  except train.NonFiniteError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(EXIT_NONFINITE)
  except train.Interrupted as e:
    print(e, file=sys.stderr)
    sys.exit(128 + e.signum)  # The shell's code for a process a signal ended (141: SIGPIPE).


def default_workdir(config, preset=None) -> str:
  """runs/<dataset>[-<folder>]_[<preset>_]<arch>_<mode>: what ran, and on which folder.

  Two image folders, or a preset and a plain run, then get workdirs of their own
  instead of one refusing the other's config.
  """
  dataset = config.dataset
  if config.data_dir and config.dataset in ('imagefolder', 'tiny_imagenet'):
    folder = os.path.basename(os.path.normpath(os.path.expanduser(config.data_dir)))
    dataset += f'-{folder}'
  preset_part = f'{preset}_' if preset else ''
  return os.path.join('runs', f'{dataset}_{preset_part}{config.arch}_{config.mode}')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
