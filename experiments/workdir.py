"""A run's workdir: one run at a time, its config checked before and written after the start.

The loop (experiments/train.py) calls these in order: `WorkdirLock` before
anything else, `check_workdir` (writes nothing), then, once the data loads and
the model and engine build, `write_workdir` and `WorkdirLock.keep`, and
`truncate_metrics` on resume. So a run that fails to start leaves the workdir
as it found it, and a rerun of a finished or interrupted run finds its files.
Its name: `default_workdir` (what a sweep varies), or `expand_workdir` of a
--workdir template naming config fields.
"""

import dataclasses
import difflib
import fcntl
import json
import os
import shutil
import socket

import bwbpf_jax as bw
from . import config as config_lib
from . import writers
from .config import Config

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
LOCK_FILE = '.lock'
# What a run writes in its workdir; --overwrite removes these and nothing else.
RUN_FILES = (CHECKPOINT_DIR, CONFIG_FILE, writers.METRICS_FILE, writers.RESULTS_FILE,
             writers.PLOT_FILE, 'tensorboard')
# Config fields a rerun may change and still resume: they decide when the run stops,
# evaluates and logs, not what a step computes (skip_nonfinite changes nothing while the
# losses are finite, and a run that met a non-finite loss stopped there). max_steps
# is not one: the learning-rate schedule is fitted to it.
RESUMABLE_FIELDS = ('stop_at_step', 'eval_every', 'log_every', 'skip_nonfinite')


class WorkdirLock:
  """One run per workdir: an exclusive flock on `<workdir>/.lock`, naming its holder.

  The kernel drops an flock when its process ends, however it ends, so a killed
  run leaves no stale lock; the file stays, and the next run locks it again. The
  file holds the holder's host and pid for the message a refused run prints.
  Until `keep()`, `release()` also removes the lock file and the workdir if this
  lock created them: a run that fails to start leaves the workdir as it was.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    # The outermost folder this lock creates (None: the workdir exists).
    self.created_folder = None
    folder = os.path.abspath(workdir)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
      if os.path.lexists(folder):  # The workdir, or a folder on its path, is a file.
        what = 'is a file' if folder == os.path.abspath(workdir) else f'is under the file {folder}'
        raise bw.UsageError(f'workdir {workdir} {what}, not a folder; use another --workdir')
      self.created_folder, folder = folder, os.path.dirname(folder)
    self.kept = False
    try:
      os.makedirs(workdir, exist_ok=True)
      while True:
        self.created_file = not os.path.exists(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
          holder = os.read(fd, 200).decode(errors='replace').strip() or 'starting up'
          os.close(fd)
          raise bw.UsageError(f'workdir {workdir} is in use by another run ({holder}); wait '
                              f'for it to end, or use another --workdir') from None
        # A run that failed to start may have removed the file between open and flock;
        # only the file still at the path counts.
        if os.path.exists(self.path) and os.path.samestat(os.fstat(fd), os.stat(self.path)):
          break
        os.close(fd)
      os.ftruncate(fd, 0)
      os.write(fd, f'host {socket.gethostname()}, pid {os.getpid()}\n'.encode())
    except OSError as e:
      raise bw.UsageError(f'cannot lock workdir {workdir} ({e.strerror or e}); use another '
                          f'--workdir') from None
    self.fd = fd

  def keep(self):
    """The run has started writing its files: release() leaves the workdir and lock file."""
    self.kept = True

  def release(self):
    if not self.kept:
      try:
        if self.created_file:
          os.remove(self.path)  # Still locked, so no other run holds this file.
        folder = os.path.abspath(self.workdir)
        while self.created_folder is not None:
          os.rmdir(folder)
          if folder == self.created_folder:
            break
          folder = os.path.dirname(folder)
      except OSError:
        pass  # Another run has begun using it in the meantime.
    os.close(self.fd)


def check_workdir(config: Config, workdir: str, overwrite: bool):
  """Checks, writing nothing, that `workdir` holds this run, none, or one to overwrite."""
  config_path = os.path.join(workdir, CONFIG_FILE)
  if overwrite:
    return
  if os.path.exists(config_path):
    try:
      with open(config_path) as f:
        stored = config_lib.config_from_json(f.read())
    except (ValueError, TypeError) as e:
      raise bw.UsageError(f'{config_path} is not a readable config ({e}); use another '
                          f'--workdir or --overwrite') from None
    differ = [f'{name} {getattr(stored, name)!r} != {getattr(config, name)!r}'
              for name in config_lib.FIELD_NAMES
              if name not in RESUMABLE_FIELDS and getattr(stored, name) != getattr(config, name)]
    if differ:
      raise bw.UsageError(f'workdir {workdir} holds a run with a different config '
                          f'({"; ".join(differ)}); use another --workdir or --overwrite')
  elif os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
    raise bw.UsageError(f'workdir {workdir} has checkpoints but no {CONFIG_FILE} to tell '
                        f'which run they belong to; use another --workdir or --overwrite')


def write_workdir(config: Config, workdir: str, overwrite: bool, log):
  """Removes the old run's files (with `overwrite`) and records this run's config."""
  if overwrite:
    removed = [name for name in RUN_FILES if os.path.lexists(os.path.join(workdir, name))]
    for name in removed:
      path = os.path.join(workdir, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
    if removed:
      log(f'--overwrite: removed {", ".join(removed)} from {workdir}')
  os.makedirs(workdir, exist_ok=True)
  config_path = os.path.join(workdir, CONFIG_FILE)
  tmp = config_path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(json.dumps(config.to_dict(), indent=2, sort_keys=True) + '\n')
  os.replace(tmp, config_path)


def truncate_metrics(workdir: str, step: int):
  """Drops metrics.jsonl records after `step` (and a line cut short by a crash)."""
  path = os.path.join(workdir, writers.METRICS_FILE)
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if record.get('step', 0) <= step:
        kept.append(json.dumps(record) + '\n')
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(kept)
  os.replace(tmp, path)


def default_workdir(config, preset=None) -> str:
  """runs/<dataset>[-<folder>]_[<preset>_]<arch>_<mode>_k<K>_<head>_s<seed>.

  What a sweep usually varies is in the name, so runs of other seeds, K, heads,
  folders or presets get workdirs of their own instead of refusing each other's
  config; e.g. runs/digits_vgg11_bwbpf_k4_linear_s0.
  """
  dataset = config.dataset
  if config.data_dir and config.dataset in ('imagefolder', 'tiny_imagenet'):
    folder = os.path.basename(os.path.normpath(os.path.expanduser(config.data_dir)))
    dataset += f'-{folder}'
  preset_part = f'{preset}_' if preset else ''
  return os.path.join('runs', f'{dataset}_{preset_part}{arch_folder_name(config.arch)}_'
                              f'{config.mode}_k{config.num_blocks}_{config.aux_head}_'
                              f's{config.seed}')


def arch_folder_name(arch: str) -> str:
  """An architecture as part of a folder name: 'mypkg.nets:small_cnn' -> 'small_cnn'."""
  return arch.rpartition(':')[2].rpartition('.')[2]


def expand_workdir(template: str, config) -> str:
  """--workdir with {field} replaced by the config's value: runs/{arch}_k{num_blocks}_s{seed}.

  Values are as a folder name wants them: the architecture by `arch_folder_name`,
  tuples such as split_points joined by '-'. Format specs work ({lr:g}).
  """
  values = {}
  for name, value in dataclasses.asdict(config).items():
    if name == 'arch':
      value = arch_folder_name(value)
    elif isinstance(value, (tuple, list)):
      value = '-'.join(map(str, value))
    values[name] = value
  try:
    return template.format_map(values)
  except KeyError as e:
    close = difflib.get_close_matches(str(e.args[0]), values, n=1)
    hint = f'did you mean {{{close[0]}}}? ' if close else ''
    raise bw.UsageError(
        f'--workdir={template} names {{{e.args[0]}}}, which is not a config field; {hint}'
        f'any flag of the data, model, training or parallel groups of --help can be '
        f'named') from None
  except (ValueError, IndexError, AttributeError, TypeError) as e:
    raise bw.UsageError(f'--workdir={template} is not a valid template ({e}); write '
                        f'config fields in braces, e.g. runs/{{arch}}_s{{seed}}') from None
