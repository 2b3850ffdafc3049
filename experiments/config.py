"""Run configuration: one frozen object, filled from presets, dataset defaults and flags.

Precedence, strongest first: a flag given on the command line, the named
`--preset`, the defaults of the chosen dataset, the global defaults below.
"""

import dataclasses
import difflib
import json
from typing import Optional

from bwbpf_jax.cost import SPLIT_BY
from bwbpf_jax.data.batches import AUGMENTATIONS
from bwbpf_jax.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that decides what a run computes (and so what a workdir holds)."""
  dataset: str = 'digits'
  arch: str = 'vgg19'
  num_blocks: int = 4
  split_points: Optional[tuple] = None
  # Where the default cut goes: 'stages' (the paper's: stage boundaries, units shared out
  # evenly) or 'activations' (the smallest largest block in activation memory, for the
  # block-wise step's peak memory; bwbpf_jax.cost.activation_balanced_split_points).
  split_by: str = 'stages'
  mode: str = 'bwbpf'
  aux_head: str = 'linear'
  auglocal_depth: int = 2  # Units copied into the first block's auglocal head (AugLocal's depth).
  local_loss: str = 'xent'  # Loss of the auxiliary blocks; see bwbpf_jax.partition.LOSSES.
  # InfoPro's (reconstruction, task) weights of the first and last auxiliary block
  # for the *_recon losses; None: bwbpf_jax.partition.DEFAULT_LOSS_WEIGHTS.
  loss_weights: Optional[tuple] = None
  width: float = 1.0
  stem: Optional[str] = None  # None: 'imagenet' for images of 64 pixels and more, else 'cifar'.
  dtype: str = 'float32'
  image_size: Optional[int] = None
  epochs: int = 200
  # Train this many steps in all (instead of `epochs`); warm-up and decay are fitted to them.
  max_steps: Optional[int] = None
  # Stop after this many steps of the full schedule; a rerun with a larger value resumes.
  stop_at_step: Optional[int] = None
  batch_size: int = 128
  optimizer: str = 'sgd'
  lr: float = 0.1
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 5e-4
  warmup_epochs: int = 0
  augment: str = 'crop_flip'  # 'crop_flip', 'crop' (no mirror images) or 'none'.
  seed: int = 0
  eval_every: int = 1
  train_step: str = 'auto'  # 'fused', 'blockwise' (bwbpf only), or 'auto'.
  # Gradient checkpointing of every unit (partition.REMAT_POLICY), in any mode: the
  # same update with less activation memory, for one more forward pass per step.
  remat: bool = False
  parallel: str = 'auto'  # 'none', 'data', 'blocks', or 'auto'.
  microbatches: int = 4  # Pipeline depth for parallel='blocks'.
  pipeline_stages: Optional[int] = None  # Stages for parallel='blocks' (None: one per block).
  # BatchNorm statistics in the stage pipeline over several data rows: 'rows' (each row
  # its own micro-batch share; no collective inside a conditional) or 'global' (over all
  # rows, inside the stage's switch branch). The same with one data row.
  pipeline_batch_norm: str = 'rows'
  data_dir: Optional[str] = None
  # Skip (and count) a block's update when its loss or gradient is not finite, instead of
  # stopping the run. Changes nothing while every loss stays finite.
  skip_nonfinite: bool = False

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


def make_config(overrides: dict, preset: Optional[str] = None) -> Config:
  """Builds the run's Config from explicit overrides (given flags) and a preset name."""
  if preset is not None and preset not in PRESETS:
    close = difflib.get_close_matches(preset, PRESETS, n=3, cutoff=0.6)
    hint = f'did you mean {" or ".join(close)}? ' if close else ''
    raise UsageError(f'unknown preset {preset!r}; {hint}--list_presets lists all '
                     f'{len(PRESETS)} with their settings')
  unknown = set(overrides) - set(FIELD_NAMES)
  if unknown:
    raise UsageError(f'unknown config fields: {", ".join(sorted(unknown))}')
  preset_values = PRESETS.get(preset, {})
  _refuse_contradictions(overrides, preset_values)
  dataset = overrides.get('dataset', preset_values.get('dataset', Config.dataset))
  values = {**DATASET_DEFAULTS.get(dataset, {}), **preset_values, **overrides}
  for name in ('split_points', 'loss_weights'):
    if values.get(name) is not None:
      values[name] = tuple(values[name])
  if values.get('split_points') is not None and 'num_blocks' not in overrides:
    # The cut decides K; the dataset's or preset's default K gives way to it.
    values['num_blocks'] = len(values['split_points']) + 1
  config = Config(**values)
  _validate(config)
  return config


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
  if ('stop_at_step' in overrides and chosen.get('max_steps') is not None
      and overrides['stop_at_step'] >= chosen['max_steps']):
    raise UsageError(f'--stop_at_step={overrides["stop_at_step"]} does not stop a run of '
                     f'--max_steps={chosen["max_steps"]} steps early; drop it or make it smaller')


def _validate(config: Config):
  positive = ('num_blocks', 'epochs', 'batch_size', 'eval_every', 'microbatches',
              'auglocal_depth')
  for name in positive:
    if getattr(config, name) < 1:
      raise UsageError(f'--{name} must be at least 1, got {getattr(config, name)}')
  if config.pipeline_stages is not None and config.pipeline_stages < 1:
    raise UsageError(f'--pipeline_stages must be at least 1, got {config.pipeline_stages}')
  if config.max_steps is not None and config.max_steps < 1:
    raise UsageError(f'--max_steps must be at least 1, got {config.max_steps}')
  if config.stop_at_step is not None and config.stop_at_step < 1:
    raise UsageError(f'--stop_at_step must be at least 1, got {config.stop_at_step}')
  if not config.width > 0:
    raise UsageError(f'--width must be positive, got {config.width}')
  if not config.lr > 0:
    raise UsageError(f'--lr must be positive, got {config.lr}')
  choices = {'train_step': ('auto', 'fused', 'blockwise'),
             'parallel': ('auto', 'none', 'data', 'blocks'),
             'pipeline_batch_norm': ('rows', 'global'),
             'dtype': ('float32', 'bfloat16'),
             'augment': AUGMENTATIONS,
             'split_by': SPLIT_BY}
  for name, allowed in choices.items():
    if getattr(config, name) not in allowed:
      raise UsageError(f'--{name} must be one of {", ".join(allowed)}, '
                       f'got {getattr(config, name)!r}')
  if config.split_points is not None and config.num_blocks != len(config.split_points) + 1:
    raise UsageError(f'{len(config.split_points)} split points make '
                     f'{len(config.split_points) + 1} blocks, not num_blocks={config.num_blocks}')
  if config.split_by != 'stages' and config.split_points is not None:
    raise UsageError(f'--split_points sets the cut itself; drop --split_by={config.split_by}')
  if config.train_step == 'blockwise' and config.mode != 'bwbpf':
    raise UsageError('--train_step=blockwise needs --mode=bwbpf: in other modes gradients '
                     'cross block boundaries')


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
