r"""Trains a network block-wise (BWBPF), with deep supervision, or with backprop.

    python -m experiments.main                                  # offline: digits, ~1 min on CPU
    python -m experiments.main --arch=vgg16 --dataset=cifar10   # the paper's recipe
    python -m experiments.main --preset=paper_cifar10_resnet101_k8 --data_dir=...

Flags left unset take the preset's value, then the dataset's default (see
experiments/config.py, where each flag is a field of Config).

Without --workdir a run writes to
runs/<dataset>[-<folder>]_[<preset>_]<arch>_<mode>_k<K>_<head>_s<seed>, so a sweep
of seeds, K or heads needs no names; --workdir may name config fields instead:
--workdir=runs/{arch}_lr{lr:g}_s{seed}.

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

Output: every epoch (and every --log_every steps) a line of every block's loss
and accuracy (blocks are numbered 1..K everywhere); while training, a progress
bar with the time left on a terminal, and a progress line every
--progress_seconds when stdout is a file.

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
    130  stopped by Ctrl-C (SIGINT); 143: by SIGTERM. Once the run has written its
         workdir, after the step (or compilation) in progress and a checkpoint;
         before, at once, writing nothing
    141  stopped because the output pipe closed (`... | head`, `... 2>&1 | head`),
         after saving a checkpoint
(1 is left to Python itself: an uncaught exception, a bug to report.)
"""

import dataclasses
import os
import sys
import typing

from . import stopping


def _exit_at_once(when: str):
  """A signal handler that ends the process with one line: `stopped by SIGINT <when>`.

  For the moments when nothing is being written: before main() runs (JAX imports)
  and after the run has ended (Python's exit).
  """
  def handler(signum, frame):  # pylint: disable=unused-argument
    try:
      sys.stdout.flush()
    except (BrokenPipeError, ValueError):
      pass
    stopping.say(f'stopped by {stopping.signal_name(signum)} {when}')
    os._exit(128 + signum)  # pylint: disable=protected-access
  return handler


if __name__ == '__main__':  # Ctrl-C while JAX imports: one line, not a traceback.
  stopping.handle_stop_signals(_exit_at_once('while starting; nothing was written'))

# pylint: disable=g-import-not-at-top,wrong-import-position
from . import xla_defaults

xla_defaults.apply()  # Before JAX starts.
# TensorFlow (imported for tfds datasets only, to decode images) announces its oneDNN
# kernels on stderr, where a user's error should be one line; it computes nothing here.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app
from absl import flags
from absl import logging

import bwbpf_jax
from . import config as config_lib
from . import workdir as workdir_lib

FLAGS = flags.FLAGS
# The groups of --help, in order: config_lib.GROUPS (one flag per Config field), then
# the flags that are not run configuration.
OUTPUT_GROUP = 'output'
HELP_GROUPS = ('presets',) + config_lib.GROUPS + (OUTPUT_GROUP,)


class _TupleParser(flags.ListParser):
  """A comma-separated list of numbers, e.g. --split_points=2,4, parsed into a tuple."""

  def __init__(self, element_type: type):
    super().__init__()
    self.element_type = element_type

  def parse(self, argument):
    words = super().parse(argument)
    try:
      return tuple(self.element_type(word) for word in words)
    except ValueError:
      kind = 'integers' if self.element_type is int else 'numbers'
      raise ValueError(f'must be {kind} separated by commas') from None


def _define_config_flags():
  """One flag per Config field: its name, type, help and choices (experiments/config.py).

  Every default is None, so a flag counts as given only when it is on the command
  line; what an unset flag means (the preset's value, the dataset's default, the
  global default) is said in its help.
  """
  types = typing.get_type_hints(config_lib.Config)
  for field in dataclasses.fields(config_lib.Config):
    meta, name = field.metadata, field.name
    if 'help' not in meta:
      raise TypeError(f'Config field {name} needs config.setting(...) to become a flag')
    help_text = meta['help'] + _default_help(field)
    kind = _without_optional(types[name])
    common = dict(module_name=meta['group'])
    if meta['choices'] is not None:
      flags.DEFINE_enum(name, None, meta['choices'], help_text, **common)
    elif kind is bool:
      flags.DEFINE_bool(name, None, help_text, **common)
    elif kind is int:
      flags.DEFINE_integer(name, None, help_text, **common)
    elif kind is float:
      flags.DEFINE_float(name, None, help_text, **common)
    elif kind is str:
      flags.DEFINE_string(name, None, help_text, **common)
    elif typing.get_origin(kind) is tuple:
      flags.DEFINE(_TupleParser(typing.get_args(kind)[0]), name, None, help_text,
                   serializer=flags.CsvListSerializer(','), **common)
    else:
      raise TypeError(f'Config field {name}: no flag type for {types[name]}')


def _without_optional(annotation):
  """X for Optional[X], else the annotation itself."""
  if typing.get_origin(annotation) is typing.Union:
    (annotation,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
  return annotation


def _default_help(field) -> str:
  """' (default: ...)': Config's default and the datasets' own, where there is one."""
  values = [] if field.default is None else [_format_value(field.default)]
  values += [f'{_format_value(defaults[field.name])} for {dataset}'
             for dataset, defaults in config_lib.DATASET_DEFAULTS.items()
             if field.name in defaults and defaults[field.name] != field.default]
  return f' (default: {"; ".join(values)})' if values else ''


def _format_value(value) -> str:
  if isinstance(value, bool):
    return 'true' if value else 'false'
  return f'{value:g}' if isinstance(value, float) else str(value)


flags.DEFINE_string('preset', None, f'Named configuration (--list_presets shows their '
                    f'settings): {", ".join(config_lib.PRESETS)}.', module_name='presets')
flags.DEFINE_bool('list_presets', False, 'Print every named preset and its settings, then exit.',
                  module_name='presets')
_define_config_flags()
flags.DEFINE_string('workdir', None, 'Output folder; a rerun with the same workdir resumes. '
                    'May name config fields: --workdir=runs/{arch}_k{num_blocks}_s{seed} '
                    '(default: runs/<dataset>[-<folder>]_[<preset>_]<arch>_<mode>_k<K>_<head>'
                    '_s<seed>).', module_name=OUTPUT_GROUP)
flags.DEFINE_integer('checkpoint_every', None, 'Save a checkpoint every N steps (default: at '
                     'each epoch\'s end; 0: only at the end and on SIGINT/SIGTERM).',
                     module_name=OUTPUT_GROUP)
flags.DEFINE_string('resume_from', 'latest', 'Checkpoint to resume from: latest, previous (the '
                    'one before the latest), or a step number.', module_name=OUTPUT_GROUP)
flags.DEFINE_bool('overwrite', False, 'Delete the run files (checkpoints, metrics, results) of '
                  'the run in --workdir and start afresh (not in a command rerun to resume).',
                  module_name=OUTPUT_GROUP)
flags.DEFINE_float('progress_seconds', 30, 'When stdout is not a terminal (a log file), print a '
                   'progress line this often (step, epoch, images/s, time left).',
                   module_name=OUTPUT_GROUP)

flags.DEFINE_string('coordinator_address', None, 'Multi-process runs: host:port of process '
                    '0. Without it JAX detects TPU pods and SLURM/MPI/Kubernetes jobs itself.',
                    module_name='parallel')
flags.DEFINE_integer('num_processes', None, 'Multi-process runs: number of processes.',
                     module_name='parallel')
flags.DEFINE_integer('process_id', None, 'Multi-process runs: this process\'s index.',
                     module_name='parallel')


def _given_flags() -> dict:
  """The configuration flags set on the command line, as Config fields."""
  return {name: FLAGS[name].value for name in config_lib.FIELD_NAMES if FLAGS[name].present}


# --augment was a boolean before it named a choice; the old spellings still work.
# -h is the usual short help (absl's own is -?).
_OLD_SPELLINGS = {'--augment': '--augment=crop_flip', '--noaugment': '--augment=none',
                  '-h': '--help'}
_HELP_FLAGS = ('--help', '-?', '--helpshort', '--helpfull', '--helpxml')
# Exit codes (see the module docstring and README.md).
EXIT_USAGE = 2
EXIT_NONFINITE = 3


_SHORT_HELP_FLAGS = ('--help', '-?', '--helpshort')


def _short_help() -> str:
  """This module's docstring, then the flags of this command by group (--helpfull: all)."""
  groups = [FLAGS.module_help(group).strip() for group in HELP_GROUPS]
  return '\n\n'.join([__doc__.rstrip()] + [group for group in groups if group]
                      + ['--helpfull adds the flags of JAX, absl and the other libraries.'])


def _parse_flags(argv):
  """absl's parser, but a bad flag is one line and exit code 2, and help exits 0."""
  argv = [_OLD_SPELLINGS.get(arg, arg) for arg in argv]
  if any(arg.split('=')[0] in _SHORT_HELP_FLAGS for arg in argv[1:]):
    _exit_quietly_if_output_closed(lambda: print(_short_help()))
    sys.exit(0)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    stopping.say(f'error: {e}')
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


def _quiet_unraisable_errors():
  """Keeps two kinds of error Python cannot raise from printing tracebacks.

  - 'Event loop is closed', from orbax's readers after a failed restore: when one
    array of a corrupt checkpoint fails to read, orbax closes its event loop while
    the other reads are still finishing, and their callbacks fail here after the
    one-line error, which says all they would.
  - A stop a signal handler raised while a garbage-collection callback ran (JAX's
    `_xla_gc_callback`), which Python drops: `stopping` raises it again before the
    run writes anything.

  Any other unraisable error is still shown.
  """
  default_hook = sys.unraisablehook

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == 'Event loop is closed'):
      default_hook(unraisable)
  sys.unraisablehook = stopping.quiet_dropped_stops(hook)


def _stop_now(signum, frame):  # pylint: disable=unused-argument
  """A signal the run does not defer: before it writes its workdir, or a second one."""
  name = stopping.signal_name(signum)
  if stopping.run_started():
    stopping.raise_stop(stopping.Interrupted(
        f'stopped at once by a second {name}, without a checkpoint of this step; rerun the '
        f'same command to resume from the last checkpoint', signum))
  stopping.raise_stop(stopping.Interrupted(
      f'stopped by {name} before the run began writing its workdir; nothing was written',
      signum))


def main(argv):
  if len(argv) > 1:
    stopping.say(f'error: unexpected arguments {argv[1:]} (flags look like --name=value)')
    sys.exit(EXIT_USAGE)
  if FLAGS.list_presets:
    _exit_quietly_if_output_closed(lambda: print('\n'.join(config_lib.describe_presets())))
    return
  # A log file gets every line as it is printed, not when a buffer fills.
  sys.stdout.reconfigure(line_buffering=True)
  logging.set_verbosity(logging.WARNING)  # JAX's backend probing is not news to a user.
  _quiet_unraisable_errors()
  from . import train  # pylint: disable=g-import-not-at-top  (imports JAX)
  from bwbpf_jax import parallel  # pylint: disable=g-import-not-at-top
  # Signals now unwind (the workdir lock removes what it created); once the run writes its
  # workdir, train defers them to the end of a step and saves a checkpoint.
  stopping.handle_stop_signals(_stop_now)
  exit_code = None
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
    workdir = (workdir_lib.expand_workdir(FLAGS.workdir, config) if FLAGS.workdir
               else workdir_lib.default_workdir(config, FLAGS.preset))
    train.train_and_evaluate(config, workdir, checkpoint_every=FLAGS.checkpoint_every,
                             resume_from=FLAGS.resume_from, overwrite=FLAGS.overwrite,
                             progress_seconds=FLAGS.progress_seconds)
  except bwbpf_jax.UsageError as e:
    stopping.say(f'error: {config_lib.as_flags(str(e))}')
    exit_code = EXIT_USAGE
  except stopping.Interrupted as e:
    stopping.stop_delivered()
    # stderr may be the pipe that closed (`2>&1 | head`): say() then drops the line.
    stopping.say(str(e))
    exit_code = 128 + e.signum  # The shell's code for a process a signal ended (141: SIGPIPE).
  except train.NonFiniteError as e:
    stopping.say(f'error: {e}')
    exit_code = EXIT_NONFINITE
  finally:
    # Everything is written: a signal from here on (Python's exit) ends the process at once.
    stopping.handle_stop_signals(_exit_at_once('while exiting, after the run had ended'))
  if exit_code is not None:
    sys.exit(exit_code)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
