"""Run configuration: one frozen object, filled from presets, dataset defaults and flags.

Precedence, strongest first: a flag given on the command line, the named
`--preset`, the defaults of the chosen dataset, the global defaults below.
"""

import dataclasses
import difflib
import json
import re
from typing import Optional

import bwbpf_jax
from bwbpf_jax import optimizers
from bwbpf_jax.cost import SPLIT_BY
from bwbpf_jax.data import AUGMENTATIONS, DATASET_NAMES
from bwbpf_jax.errors import UsageError
from bwbpf_jax.models.resnet import STEMS
from bwbpf_jax.parallel.pipeline import BATCH_NORM_STATISTICS

# Choices that belong to the runner rather than the library (the library's own are
# imported above where they are defined).
TRAIN_STEPS = ('auto', 'fused', 'blockwise')
PARALLEL = ('auto', 'none', 'data', 'blocks')  # 'auto' and experiments/engine.py's engines.
DTYPES = ('float32', 'bfloat16')
# The groups of `--help`, in the order it shows them.
GROUPS = ('data', 'model', 'training', 'parallel')


def setting(default, group: str, help: str, choices: Optional[tuple] = None):  # pylint: disable=redefined-builtin
  """A Config field with what the command line needs to offer it as a flag.

  The flag of field `name` is `--name`, of the field's type, with this help and
  these choices, shown in `--help` under `group` (one of GROUPS). experiments/main.py
  makes the flags from these fields; nothing else lists them.
  """
  assert group in GROUPS, group
  return dataclasses.field(default=default,
                           metadata={'group': group, 'help': help, 'choices': choices})


def _learning_rate_help() -> str:
  defaults = ', '.join(f'{name} {lr:g}' for name, lr in optimizers.DEFAULT_LEARNING_RATES.items())
  return (f'Peak learning rate (unset: the optimizer\'s default, {defaults}; a rate a preset '
          f'or dataset sets is for its optimizer, sgd unless it names another).')


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that decides what a run computes (and so what a workdir holds).

  Each field is a flag of the command line (see `setting`).
  """
  dataset: str = setting('digits', 'data', 'Dataset (digits: offline, bundled with '
                         'scikit-learn).', DATASET_NAMES)
  arch: str = setting('vgg19', 'model', f'Architecture: {", ".join(bwbpf_jax.ARCHITECTURES)}, '
                      f'or package.module:function for a network of your own.')
  num_blocks: int = setting(4, 'model', 'K, blocks the network is cut into (1 = backprop).')
  split_points: Optional[tuple[int, ...]] = setting(
      None, 'model', 'Unit indices where blocks 2..K start, e.g. 2,4 (sets K).')
  # Where the default cut goes: 'stages' (the paper's: stage boundaries, units shared out
  # evenly) or 'activations' (the smallest largest block in activation memory, for the
  # block-wise step's peak memory; bwbpf_jax.cost.activation_balanced_split_points).
  split_by: str = setting(
      'stages', 'model', 'The cut into --num_blocks blocks: stages (the paper: at stage '
      'boundaries, units shared evenly) or activations (balance the activation memory of the '
      'blocks: the smallest peak memory of the block-wise step).', SPLIT_BY)
  mode: str = setting('bwbpf', 'model', 'bwbpf: isolated blocks; deep_supervision: the '
                      'reference code (gradients cross blocks); bp: end-to-end backprop.',
                      bwbpf_jax.MODES)
  aux_head: str = setting('linear', 'model', 'Auxiliary head of blocks 1..K-1: linear (the '
                          'paper), mlp, dgl (DGL\'s MLP-SR), infopro (InfoPro\'s 1c2f), '
                          'auglocal (copies of sampled later units).', bwbpf_jax.HEADS)
  auglocal_depth: int = setting(2, 'model', 'Later units copied into the first block\'s '
                                'auglocal head (AugLocal\'s depth; falls to about half at the '
                                'last auxiliary block).')
  local_loss: str = setting('xent', 'model', 'Loss of blocks 1..K-1: xent, xent_recon (+ '
                            'InfoPro\'s image reconstruction), supcon (supervised contrastive), '
                            'supcon_recon (InfoPro\'s contrastive variant).', bwbpf_jax.LOSSES)
  # InfoPro's (reconstruction, task) weights of the first and last auxiliary block
  # for the *_recon losses; None: bwbpf_jax.partition.DEFAULT_LOSS_WEIGHTS.
  loss_weights: Optional[tuple[float, ...]] = setting(
      None, 'model', 'For *_recon losses: reconstruction and task weight of the first and of '
      'the last auxiliary block, e.g. 1,1,0,1 (linear between).')
  width: float = setting(1.0, 'model', 'Channel multiplier (0.25 for CPU runs).')
  stem: Optional[str] = setting(None, 'model', 'ResNet stem (unset: imagenet for images of 64 '
                                'pixels and more, else cifar).', STEMS)
  dtype: str = setting('float32', 'model', 'Computation dtype.', DTYPES)
  image_size: Optional[int] = setting(None, 'data', 'Resize images to this side.')
  epochs: int = setting(200, 'training', 'Epochs; the cosine schedule spans them.')
  # Train this many steps in all (instead of `epochs`); warm-up and decay are fitted to them.
  max_steps: Optional[int] = setting(
      None, 'training', 'Train this many steps in all instead of --epochs, with warm-up and '
      'decay fitted to them (a complete short run).')
  # Stop after this many steps of the full schedule; a rerun with a larger value resumes.
  stop_at_step: Optional[int] = setting(
      None, 'training', 'Stop after this many steps of the full schedule; a rerun with a '
      'larger value (or without it) resumes the run.')
  batch_size: int = setting(128, 'training', 'Global batch size.')
  optimizer: str = setting('sgd', 'training', 'Per-block optimizer.', bwbpf_jax.OPTIMIZERS)
  # None: the optimizer's default (make_config fills it in, so a stored config holds
  # the rate that trained).
  lr: Optional[float] = setting(None, 'training', _learning_rate_help())
  momentum: float = setting(0.9, 'training', 'SGD momentum.')
  nesterov: bool = setting(False, 'training', 'Nesterov momentum (SGD).')
  weight_decay: float = setting(5e-4, 'training', 'Weight decay.')
  warmup_epochs: int = setting(0, 'training', 'Linear warm-up epochs before the cosine decay '
                               '(with --max_steps: their share of --epochs).')
  augment: str = setting('crop_flip', 'data', 'Training augmentation: random crop and '
                         'horizontal flip, crop only (for digits, whose mirror images are '
                         'other shapes), or none.', AUGMENTATIONS)
  seed: int = setting(0, 'training', 'Seed of initialisation, shuffling and augmentation.')
  eval_every: int = setting(1, 'training', 'Evaluate every N epochs (and at the end).')
  # Train metrics every N steps too (None: at epoch ends only).
  log_every: Optional[int] = setting(
      None, 'training', 'Record training metrics (metrics.jsonl, TensorBoard, console) every N '
      'steps as well as at each epoch\'s end; each record waits for the device, so a small N '
      'costs some speed.')
  train_step: str = setting('auto', 'training', 'fused: one jitted step; blockwise: one jitted '
                            'call per block (bwbpf; less memory); auto: blockwise for bwbpf.',
                            TRAIN_STEPS)
  # Gradient checkpointing of every unit (partition.REMAT_POLICY), in any mode: the
  # same update with less activation memory, for one more forward pass per step.
  remat: bool = setting(False, 'model', 'Gradient checkpointing: every unit under '
                        'jax.checkpoint, keeping only unit inputs for the backward pass (same '
                        'update, less memory, one more forward pass); any mode.')
  parallel: str = setting('auto', 'parallel', 'data: the step sharded over all devices (the '
                          'batch split, gradients averaged); blocks: a stage pipeline over a '
                          '(data x stage) mesh of every device, pipelined over micro-batches '
                          '(bwbpf); none: one device; auto: data when several devices are '
                          'present.', PARALLEL)
  microbatches: int = setting(4, 'parallel', 'Micro-batches per batch for --parallel=blocks '
                              '(each is an optimizer step).')
  pipeline_stages: Optional[int] = setting(
      None, 'parallel', 'Pipeline stages for --parallel=blocks (unset: one per block); '
      'contiguous blocks are grouped by cost, and the device count must be a multiple of it '
      '(data = devices / stages).')
  # BatchNorm statistics in the stage pipeline over several data rows: 'rows' (each row
  # its own micro-batch share; no collective inside a conditional) or 'global' (over all
  # rows, inside the stage's switch branch). The same with one data row.
  pipeline_batch_norm: str = setting(
      'rows', 'parallel', 'BatchNorm statistics of --parallel=blocks over several data rows: '
      'rows (each data row normalises with its own statistics and no collective runs inside a '
      'conditional, safe on GPU/TPU) or global (over all rows, as --parallel=data; an '
      'all-reduce inside each stage\'s branch).', BATCH_NORM_STATISTICS)
  data_dir: Optional[str] = setting(None, 'data', 'Dataset folder (tfds data_dir or image '
                                    'folder).')
  # Skip (and count) a block's update when its loss or gradient is not finite, instead of
  # stopping the run. Changes nothing while every loss stays finite.
  skip_nonfinite: bool = setting(False, 'training', 'Skip (and count) a block\'s update when '
                                 'its loss or gradient is not finite, instead of stopping the '
                                 'run.')

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)


# The paper's recipe (SGD 0.1, momentum 0.9, weight decay 5e-4, cosine) is the
# global default; datasets add what differs for them.
DATASET_DEFAULTS = {
    # Offline default: small enough to learn to >90% in about a minute on 2 CPU cores.
    'digits': dict(arch='vgg11', width=0.25, num_blocks=4, epochs=12, batch_size=64, lr=0.05,
                   warmup_epochs=1,
                   augment='crop'),  # A mirrored digit is another shape.
    'cifar10': dict(epochs=200),
    'cifar100': dict(epochs=200),
    'imagefolder': dict(epochs=200),
    'tiny_imagenet': dict(epochs=200, stem='imagenet'),
}


def _paper_presets() -> dict:
  """The paper's experiments: one name each, e.g. `paper_cifar10_resnet101_k8`."""
  presets = {}
  for dataset in ('cifar10', 'tiny_imagenet'):
    for arch in ('vgg19', 'resnet50', 'resnet101', 'resnet152'):
      for num_blocks in (4, 8, 12, 16):
        presets[f'paper_{dataset}_{arch}_k{num_blocks}'] = dict(
            dataset=dataset, arch=arch, num_blocks=num_blocks, mode='bwbpf', aux_head='linear',
            epochs=200, batch_size=128, optimizer='sgd', lr=0.1, momentum=0.9,
            weight_decay=5e-4, width=1.0)
  return presets


# InfoPro's CIFAR-10 recipe (Wang et al., ICLR 2021; its reference code's train.py and
# comand.sh): ResNet-32/110 with option-B shortcuts, SGD with Nesterov momentum 0.9,
# lr 0.8 for batch 1024, weight decay 1e-4, 160 epochs of cosine decay after a
# 10-epoch warm-up, the '1c2f' auxiliary network with decoder and the contrastive
# loss, its hand-placed block ends and per-K loss weights. What differs: our warm-up
# rises per step from 0 (InfoPro's per epoch from 0.01) and the cosine spans the
# steps after it; random crops pad with zeros (InfoPro's reflect).
_INFOPRO_RUNS = {
    # (arch, K): (InfoPro's block ends as (stage, layer) with stage 0 the stem,
    #             (lambda_1 first, lambda_2 first, lambda_1 last, lambda_2 last)).
    ('resnet32', 2): (((2, 1),), (5.0, 1.0, 0.0, 0.0)),
    ('resnet32', 4): (((1, 2), (2, 1), (3, 0)), (6.0, 0.0, 1.0, 2.0)),
    ('resnet32', 8): (((1, 0), (1, 2), (1, 4), (2, 1), (2, 3), (3, 0), (3, 2)),
                      (5.0, 0.0, 0.0, 2.0)),
    ('resnet32', 16): (((0, 0),) + tuple((s, i) for s in (1, 2) for i in range(5))
                       + tuple((3, i) for i in range(4)), (5.0, 0.05, 0.2, 0.5)),
    ('resnet110', 2): (((2, 8),), (5.0, 0.5, 0.0, 0.0)),
    ('resnet110', 4): (((1, 11), (2, 7), (3, 3)), (1.0, 0.0, 0.0, 1.0)),
    ('resnet110', 8): (((1, 4), (1, 11), (2, 0), (2, 7), (2, 14), (3, 3), (3, 10)),
                       (5.0, 0.0, 0.0, 1.0)),
    ('resnet110', 16): (((1, 1), (1, 4), (1, 7), (1, 10), (1, 13), (1, 16), (2, 1), (2, 4),
                         (2, 7), (2, 11), (2, 15), (3, 1), (3, 5), (3, 9), (3, 13)),
                        (5.0, 0.0, 0.5, 1.0)),
}


def infopro_split_points(block_ends, units_per_stage: int) -> tuple:
  """InfoPro's block ends -> our split points (the stem is unit 0; see models/cifar_resnet.py).

  A block ending after layer i of stage s >= 1 means the next block starts at
  unit 1 + (s - 1) * units_per_stage + i + 1; ending after the stem (0, 0), at unit 1.
  """
  return tuple(1 if stage == 0 else 1 + (stage - 1) * units_per_stage + layer + 1
               for stage, layer in block_ends)


def _infopro_presets() -> dict:
  """`infopro_cifar10_<arch>_k<K>`: InfoPro's Table 2 runs (CIFAR-10 through tfds)."""
  presets = {}
  for (arch, num_blocks), (block_ends, weights) in _INFOPRO_RUNS.items():
    units_per_stage = {'resnet32': 5, 'resnet110': 18}[arch]
    presets[f'infopro_cifar10_{arch}_k{num_blocks}'] = dict(
        dataset='cifar10', arch=arch, num_blocks=num_blocks,
        split_points=infopro_split_points(block_ends, units_per_stage),
        mode='bwbpf', aux_head='infopro', local_loss='supcon_recon', loss_weights=weights,
        width=1.0, epochs=160, batch_size=1024, optimizer='sgd', lr=0.8, momentum=0.9,
        nesterov=True, weight_decay=1e-4, warmup_epochs=10)
  return presets


# AugLocal's CIFAR-10 recipe (Ma et al., ICLR 2024; its reference code's README, run.sh
# and train.py): InfoPro's optimiser, schedule and data pipeline for 400 epochs, and one
# layer per local module (the stem, then each residual unit). Its `--local_module_num L
# --aux_net_depth d` trains L - d modules: the first L - d - 1 layers each with an
# augmented auxiliary network of pyramidal depth (coefficient 0.5, our default), and the
# last d + 1 layers together as the output block, since no d layers follow them. The
# README's runs: ResNet-32 at L=16, d=2; ResNet-110 at L=55, d=3.
_AUGLOCAL_RUNS = {'resnet32': (16, 2), 'resnet110': (55, 3)}


def _auglocal_presets() -> dict:
  """`auglocal_cifar10_<arch>`: AugLocal's README runs (CIFAR-10 through tfds)."""
  presets = {}
  for arch, (modules, depth) in _AUGLOCAL_RUNS.items():
    num_blocks = modules - depth
    presets[f'auglocal_cifar10_{arch}'] = dict(
        dataset='cifar10', arch=arch, num_blocks=num_blocks,
        split_points=tuple(range(1, num_blocks)), mode='bwbpf', aux_head='auglocal',
        auglocal_depth=depth, local_loss='xent', width=1.0, epochs=400, batch_size=1024,
        optimizer='sgd', lr=0.8, momentum=0.9, nesterov=True, weight_decay=1e-4,
        warmup_epochs=10)
  return presets


PRESETS = {
    **_paper_presets(),
    **_infopro_presets(),
    **_auglocal_presets(),
    # The equal-budget CPU comparison of docs/results.md (on the CIFAR-10 JPEG copy).
    'cpu_cifar10_vgg11': dict(dataset='imagefolder', arch='vgg11', width=0.25, epochs=3,
                              batch_size=128, lr=0.05, warmup_epochs=1),
    'cpu_cifar10_resnet18': dict(dataset='imagefolder', arch='resnet18', width=0.25, epochs=3,
                                 batch_size=128, lr=0.05, warmup_epochs=1),
    # He et al.'s CIFAR ResNet-32 at half width (8/16/32 channels): the local-learning
    # literature's network on the same budget.
    'cpu_cifar10_resnet32': dict(dataset='imagefolder', arch='resnet32', width=0.5, epochs=3,
                                 batch_size=128, lr=0.05, warmup_epochs=1),
    # ViT on CIFAR-10 from scratch: the optimiser of DeiT (Touvron et al., 2021) and of
    # "Vision Transformer for Small-Size Datasets" (Lee et al., 2021): AdamW, weight decay
    # 0.05, linear warm-up then cosine; lr 1e-3 at batch 128 and 10 warm-up epochs of 100
    # as Lee et al. train ViT-Tiny-sized models on CIFAR. What differs: only crop_flip
    # augmentation (they add AutoAugment, Mixup, CutMix, random erasing and label
    # smoothing), and AdamW here decays every parameter (LayerNorms and biases too). Expect
    # lower accuracy than theirs and more overfitting.
    'vit_cifar10_tiny': dict(dataset='cifar10', arch='vit_tiny', optimizer='adamw', lr=1e-3,
                             weight_decay=0.05, batch_size=128, epochs=100, warmup_epochs=10,
                             augment='crop_flip'),
    'vit_cifar10_small': dict(dataset='cifar10', arch='vit_small', optimizer='adamw', lr=1e-3,
                              weight_decay=0.05, batch_size=128, epochs=100, warmup_epochs=10,
                              augment='crop_flip'),
    # The same recipe, shortened for this project's CPU comparisons on the JPEG copy: a
    # 4-layer ViT-Tiny at half width (96 wide, 2 heads; even blocks at K=2 and K=4) and 1
    # warm-up epoch of 10.
    'cpu_cifar10_vit': dict(dataset='imagefolder', arch='vit_tiny_d4', width=0.5,
                            optimizer='adamw', lr=1e-3, weight_decay=0.05, batch_size=128,
                            epochs=10, warmup_epochs=1, augment='crop_flip'),
}

# The names of Config's fields, in declaration order: what a flag, a preset or a stored
# config.json may set.
FIELD_NAMES = tuple(field.name for field in dataclasses.fields(Config))
_FIELDS = {field.name: field for field in dataclasses.fields(Config)}


def make_config(overrides: dict, preset: Optional[str] = None) -> Config:
  """Builds the run's Config from explicit overrides (given flags) and a preset name.

  A learning rate a preset or a dataset's defaults set was chosen for their
  optimizer (SGD unless they name another); with another `optimizer` the run
  takes that optimizer's default, and the preset's settings only SGD uses fall
  back to Config's defaults.
  """
  if preset is not None and preset not in PRESETS:
    close = difflib.get_close_matches(preset, PRESETS, n=3, cutoff=0.6)
    hint = f'did you mean {" or ".join(close)}? ' if close else ''
    raise UsageError(f'unknown preset {preset!r}; {hint}--list_presets lists all '
                     f'{len(PRESETS)} with their settings')
  unknown = set(overrides) - set(FIELD_NAMES)
  if unknown:
    raise UsageError(f'unknown config fields: {", ".join(sorted(unknown))}')
  overrides = {name: value for name, value in overrides.items()
               if not (name == 'lr' and value is None)}
  preset_values = PRESETS.get(preset, {})
  _refuse_contradictions(overrides, preset_values)
  dataset = overrides.get('dataset', preset_values.get('dataset', Config.dataset))
  dataset_values = DATASET_DEFAULTS.get(dataset, {})
  values = {**dataset_values, **preset_values, **overrides}
  optimizer = values.get('optimizer', Config.optimizer)
  values['lr'] = _learning_rate(overrides, preset_values, dataset_values, optimizer)
  for name, users in optimizers.OPTIMIZER_ARGUMENTS.items():
    if optimizer not in users and name not in overrides:
      values[name] = _FIELDS[name].default
  for name in ('split_points', 'loss_weights'):
    if values.get(name) is not None:
      values[name] = tuple(values[name])
  if values.get('split_points') is not None and 'num_blocks' not in overrides:
    # The cut decides K; the dataset's or preset's default K gives way to it.
    values['num_blocks'] = len(values['split_points']) + 1
  config = Config(**values)
  _validate(config)
  _refuse_ignored(config, overrides)
  return config


def _learning_rate(overrides, preset_values, dataset_values, optimizer) -> float:
  """The given lr, else a preset's or dataset's made for this optimizer, else its default."""
  if 'lr' in overrides:
    return overrides['lr']
  for source in (preset_values, dataset_values):
    if 'lr' in source and source.get('optimizer', Config.optimizer) == optimizer:
      return source['lr']
  if optimizer not in optimizers.DEFAULT_LEARNING_RATES:
    return None  # _validate names the unknown optimizer.
  return optimizers.DEFAULT_LEARNING_RATES[optimizer]


def _refuse_contradictions(overrides: dict, preset_values: dict):
  """Refuses flags that contradict each other (or the preset) instead of ignoring one."""
  chosen = {**preset_values, **overrides}
  split_points = chosen.get('split_points')
  if ('num_blocks' in overrides and split_points is not None
      and overrides['num_blocks'] != len(split_points) + 1):
    raise UsageError(f'--split_points={",".join(map(str, split_points))} makes '
                     f'{len(split_points) + 1} blocks but --num_blocks={overrides["num_blocks"]}; '
                     f'give one of the two')
  if 'loss_weights' in overrides and not chosen.get('local_loss', '').endswith('_recon'):
    raise UsageError('--loss_weights weighs the reconstruction losses; it needs '
                     '--local_loss=xent_recon or supcon_recon')
  if 'auglocal_depth' in overrides and chosen.get('aux_head') != 'auglocal':
    raise UsageError('--auglocal_depth sets the auglocal head\'s depth; it needs '
                     '--aux_head=auglocal')
  for name in ('pipeline_stages', 'microbatches', 'pipeline_batch_norm'):
    if name in overrides and chosen.get('parallel') != 'blocks':
      raise UsageError(f'--{name} sets up the stage pipeline; it needs --parallel=blocks')
  if 'train_step' in overrides and chosen.get('parallel') == 'blocks':
    raise UsageError('--train_step chooses the step of --parallel=none or data; the stage '
                     'pipeline of --parallel=blocks has its own: drop one of the two')
  if 'epochs' in overrides and 'max_steps' in overrides:
    raise UsageError(f'--max_steps={overrides["max_steps"]} trains that many steps instead of '
                     f'--epochs={overrides["epochs"]}; give one of the two')
  if ('stop_at_step' in overrides and chosen.get('max_steps') is not None
      and overrides['stop_at_step'] >= chosen['max_steps']):
    raise UsageError(f'--stop_at_step={overrides["stop_at_step"]} does not stop a run of '
                     f'--max_steps={chosen["max_steps"]} steps early; drop it or make it smaller')
  optimizer = chosen.get('optimizer', Config.optimizer)
  for name, users in optimizers.OPTIMIZER_ARGUMENTS.items():
    if name in overrides and optimizer not in users and optimizer in bwbpf_jax.OPTIMIZERS:
      raise UsageError(f'--{name} is a setting of --optimizer={" or ".join(users)}; '
                       f'--optimizer={optimizer} does not use it')
  if chosen.get('nesterov') and chosen.get('momentum', Config.momentum) == 0:
    raise UsageError('--nesterov needs momentum; drop it or give --momentum above 0')


def _refuse_ignored(config: Config, overrides: dict):
  """Refuses flags the run would ignore for the config they end up in."""
  if 'data_dir' in overrides and config.dataset == 'digits':
    raise UsageError('--data_dir is not used by --dataset=digits (bundled with scikit-learn); '
                     'drop it, or name the dataset it holds')
  if 'stem' in overrides and config.arch in bwbpf_jax.models.vgg.CONVS_PER_STAGE:
    raise UsageError(f'--stem chooses a ResNet\'s first layers; --arch={config.arch} has none')
  if config.arch not in bwbpf_jax.ARCHITECTURES:
    for name in ('width', 'stem'):
      if name in overrides:
        raise UsageError(f'--{name} shapes the built-in networks; --arch={config.arch} is built '
                         f'by its own code (drop --{name})')
  if config.num_blocks == 1:
    for name in ('aux_head', 'local_loss', 'loss_weights', 'auglocal_depth'):
      if name in overrides:
        raise UsageError(f'--{name} sets the auxiliary blocks 1..K-1, and --num_blocks=1 has '
                         f'none; drop it or cut the network into more blocks')


def _validate(config: Config):
  positive = ('num_blocks', 'epochs', 'batch_size', 'eval_every', 'microbatches',
              'auglocal_depth')
  for name in positive:
    if getattr(config, name) < 1:
      raise UsageError(f'--{name} must be at least 1, got {getattr(config, name)}')
  for name in ('pipeline_stages', 'max_steps', 'stop_at_step', 'image_size', 'log_every'):
    if getattr(config, name) is not None and getattr(config, name) < 1:
      raise UsageError(f'--{name} must be at least 1, got {getattr(config, name)}')
  if not config.width > 0:
    raise UsageError(f'--width must be positive, got {config.width}')
  for field in dataclasses.fields(Config):
    allowed = field.metadata['choices']
    if allowed is not None and getattr(config, field.name) not in allowed + (None,):
      raise UsageError(f'--{field.name} must be one of {", ".join(allowed)}, '
                       f'got {getattr(config, field.name)!r}')
  if config.arch not in bwbpf_jax.ARCHITECTURES and not bwbpf_jax.network.is_import_spec(config.arch):
    raise UsageError(f'unknown --arch={config.arch}; choose one of '
                     f'{", ".join(bwbpf_jax.ARCHITECTURES)}, or give package.module:function '
                     f'for a network of your own')
  if not config.lr > 0:
    raise UsageError(f'--lr must be positive, got {config.lr}')
  if config.split_points is not None and config.num_blocks != len(config.split_points) + 1:
    raise UsageError(f'{len(config.split_points)} split points make '
                     f'{len(config.split_points) + 1} blocks, not num_blocks={config.num_blocks}')
  if config.split_by != 'stages' and config.split_points is not None:
    raise UsageError(f'--split_points sets the cut itself; drop --split_by={config.split_by}')
  if config.train_step == 'blockwise' and config.mode != 'bwbpf':
    raise UsageError('--train_step=blockwise needs --mode=bwbpf: in other modes gradients '
                     'cross block boundaries')


# The library's argument names that differ from the Config field (and flag) they come
# from, as experiments/engine.py passes them; every other Config field keeps its name.
LIBRARY_ARGUMENTS = {'num_stages': 'pipeline_stages', 'num_microbatches': 'microbatches',
                     'global_batch_size': 'batch_size', 'batch_norm': 'pipeline_batch_norm'}
_ARGUMENT = re.compile(r'(?<![^\s(\[,;`\'"])([a-z_]+)=')


def as_flags(message: str) -> str:
  """A library message for the command line: `name=` -> `--flag=` where name is a setting.

  The library names its Python arguments (`num_stages=2`); at the command line the
  user gave flags (`--pipeline_stages=2`). Only an argument written as a word of
  its own followed by '=' (after a space, a bracket or a quote, or first) is
  rewritten, so paths, '--flags' and other text stay as they are.
  """
  def flag(match):
    name = LIBRARY_ARGUMENTS.get(match.group(1), match.group(1))
    return f'--{name}=' if name in FIELD_NAMES else match.group(0)
  return _ARGUMENT.sub(flag, message)


def describe_presets() -> list:
  """One line per preset: its name and the settings it makes."""
  return [f'{name}: ' + ', '.join(f'{key}={value}' for key, value in values.items())
          for name, values in PRESETS.items()]


def config_from_json(text: str) -> Config:
  values = json.loads(text)
  if isinstance(values.get('augment'), bool):  # Written before the crop-only choice existed.
    values['augment'] = 'crop_flip' if values['augment'] else 'none'
  for name in ('split_points', 'loss_weights'):
    if values.get(name) is not None:
      values[name] = tuple(values[name])
  return Config(**{k: v for k, v in values.items() if k in FIELD_NAMES})
