"""Cutting a network's unit sequence into K blocks, each a Flax module with its own head.

A network (a `bwbpf_jax.Network`: the library's own, or a user's) is
`stem, unit_0 .. unit_{n-1}`, and a classifier is added as block K's head. Split points are the unit
indices where a new block starts: K blocks have K-1 of them. Blocks are
numbered 1..K (as on the command line; `model.blocks[k - 1]` is block k). The
stem always belongs to block 1 and the classifier is block K's head; blocks
1..K-1 end in an auxiliary head.

Where each block's input is detached, and which heads see detached features, is
what distinguishes the three training modes (see `MODES`); the parameters, the
units and the step are the same in all three.
"""

import dataclasses
from typing import Any, Optional, Sequence, Union

from flax import linen as nn
import jax
import jax.numpy as jnp

from bwbpf_jax import models
from bwbpf_jax import splits
from bwbpf_jax.errors import UsageError
from bwbpf_jax.network import Network, error_summary, layer_failure

# bwbpf: every block's input is detached; each block learns from its own head only.
# deep_supervision: nothing is detached; every head's loss reaches all earlier blocks
#   (what the reference PyTorch code computes, since it never detaches).
# bp: nothing is detached for the backbone, which learns from the output loss only;
#   the auxiliary heads are trained as probes on detached features, so every block
#   still reports an accuracy without changing the backbone's gradient.
MODES = ('bwbpf', 'deep_supervision', 'bp')

# Gradient checkpointing (`build_model(remat=True)`): each unit runs under
# `jax.checkpoint` with this policy, so the backward pass keeps only every unit's
# input and recomputes the unit's inner activations (conv outputs, BatchNorm
# intermediates) from it: one extra forward pass for memory that no longer grows
# with the layers inside a unit. The update is unchanged.
REMAT_POLICY = jax.checkpoint_policies.nothing_saveable

# Local losses of the auxiliary blocks (the output block always uses cross-entropy);
# `step.example_losses` computes them from a block's `LossSpec`.
# xent: cross-entropy of the head's logits.
# xent_recon: InfoPro (Wang et al., 2021): cross-entropy plus a decoder's binary
#   cross-entropy reconstruction of the unnormalised image, weighted by block depth.
# supcon: supervised contrastive loss (temperature 0.07) on the head's embedding.
# supcon_recon: InfoPro's contrastive variant, the one of its Table 2.
LOSSES = ('xent', 'xent_recon', 'supcon', 'supcon_recon')
# InfoPro's weights (lambda_1 first, lambda_2 first, lambda_1 last, lambda_2 last):
# reconstruction and task weights of the first and of the last auxiliary block,
# linear in between. Default: reconstruction falling from 1 to 0, task weight 1.
DEFAULT_LOSS_WEIGHTS = (1.0, 1.0, 0.0, 1.0)
EMBEDDING_SIZE = 128  # InfoPro's contrastive feature dimension.


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """One block's local loss: task_weight * (cross-entropy or contrastive) + reconstruction_weight * BCE."""
  kind: str = 'xent'  # 'xent' or 'supcon'.
  task_weight: float = 1.0
  reconstruction_weight: float = 0.0
  temperature: float = 0.07


class Block(nn.Module):
  """A contiguous run of units and the head that reads its output.

  Returns `(features, outputs)`: `features` ([B, H, W, C] maps, [B, T, D] tokens
  or [B, D] vectors, whatever the units make) feed the next block and
  `outputs` is what `loss` reads: {'logits': [B, num_classes]}, plus
  'embedding' and 'reconstruction' where the head is a `heads.Objective`.
  """
  units: Sequence[nn.Module]
  head: nn.Module
  stem: Optional[nn.Module] = None
  detach_input: bool = True
  detach_head_input: bool = False
  remat: bool = False  # Every unit (and the stem) under jax.checkpoint with REMAT_POLICY.
  loss: LossSpec = LossSpec()

  def features(self, x, train: bool):
    """The block's backbone part: its (detached) input through the stem and units."""
    with models.layers.library_layers():
      return self._features(x, train)

  def _features(self, x, train: bool):
    if self.detach_input:
      # The block boundary: no gradient from this block's loss leaves the block.
      x = jax.lax.stop_gradient(x)
    layers = ([lambda block: block.stem] if self.stem is not None else []) + [
        lambda block, i=i: block.units[i] for i in range(len(self.units))]
    for layer in layers:
      if self.remat:
        # A lifted transform of this block: the unit is reached through the block it
        # is given, so parameter names (and states) are those of remat=False.
        x = nn.remat(lambda block, x, layer=layer: layer(block)(x, train=train),
                     policy=REMAT_POLICY)(self, x)
      else:
        x = layer(self)(x, train=train)
    return x

  def head_outputs(self, features, train: bool, image_shape=None):
    """What `loss` reads, from the block's features: the head alone (as cost.py counts it)."""
    with models.layers.library_layers():
      return self._head_outputs(features, train, image_shape)

  def _head_outputs(self, features, train: bool, image_shape):
    if isinstance(self.head, models.heads.Objective):
      return self.head(features, train=train, image_shape=image_shape)
    return {'logits': self.head(features, train=train)}

  def __call__(self, x, train: bool, image_shape=None):
    """`image_shape`: the input image's static (H, W, C), what a decoder reconstructs."""
    with models.layers.library_layers():
      x = self._features(x, train)
      head_input = jax.lax.stop_gradient(x) if self.detach_head_input else x
      return x, self._head_outputs(head_input, train, image_shape)


@dataclasses.dataclass(frozen=True)
class PartitionedModel:
  """A network cut into blocks; hashable, so it can be a static argument of jit.

  `arch` is the network's name (`Network.name`: a built-in's, or a user's).
  """
  arch: str
  blocks: tuple
  split_points: tuple
  mode: str
  num_classes: int
  remat: bool = False

  @property
  def num_blocks(self) -> int:
    return len(self.blocks)

  __hash__ = object.__hash__  # Identity: rebuild the model to change it.
  __eq__ = object.__eq__


def _round_half_up(x: float) -> int:
  return int(x + 0.5)


def _split_evenly(start: int, size: int, parts: int) -> list:
  """Cut points splitting units [start, start+size) into `parts` near-equal runs.

  Cumulative rounding alternates run lengths (23 units in 5 parts: 5,4,5,4,5),
  which reproduces the reference code's 8-block ResNet-101.
  """
  return [start + _round_half_up(size * i / parts) for i in range(1, parts)]


def default_split_points(stage_of_unit: Sequence[int], num_blocks: int) -> tuple:
  """The paper's partition: cut at stage boundaries, then cut the largest stages further.

  With K at most the number of stages S, keep the K-1 stage boundaries that make the
  largest block (in units) smallest (`splits.balanced_split_points` over the stage
  sizes, with its tie-break: the earliest boundaries). With K > S every stage boundary is kept and the
  K-S extra blocks go one at a time to the stage with the most units per block
  (earlier stage on ties), each stage then split evenly.
  """
  num_units = len(stage_of_unit)
  if not 1 <= num_blocks <= num_units:
    raise UsageError(f'cannot cut {num_units} units into {num_blocks} blocks; '
                     f'choose num_blocks between 1 and {num_units}')
  stage_sizes = [stage_of_unit.count(s) for s in sorted(set(stage_of_unit))]
  stage_starts = [sum(stage_sizes[:s]) for s in range(len(stage_sizes))]
  if num_blocks <= len(stage_sizes):
    first_stages = splits.balanced_split_points(stage_sizes, num_blocks)
    return tuple(stage_starts[s] for s in first_stages)
  blocks_per_stage = [1] * len(stage_sizes)
  for _ in range(num_blocks - len(stage_sizes)):
    stage = max(range(len(stage_sizes)),
                key=lambda s: (stage_sizes[s] / blocks_per_stage[s], -s))
    blocks_per_stage[stage] += 1
  points = []
  for s, (start, size) in enumerate(zip(stage_starts, stage_sizes)):
    if s > 0:
      points.append(start)
    points.extend(_split_evenly(start, size, blocks_per_stage[s]))
  return tuple(points)


def validate_split_points(split_points: Sequence[int], num_units: int) -> tuple:
  points = tuple(int(p) for p in split_points)
  if any(not 0 < p < num_units for p in points) or list(points) != sorted(set(points)):
    raise UsageError(f'split points {list(points)} must be strictly increasing unit '
                     f'indices between 1 and {num_units - 1} (the network has {num_units} units)')
  return points


def build_model(network: Union[Network, str], *, num_classes: int, num_blocks: Optional[int] = None,
                split_points: Optional[Sequence[int]] = None, mode: str = 'bwbpf',
                aux_head: Union[str, Sequence[str]] = 'linear', width: float = 1.0,
                stem: str = 'cifar', dtype: Any = jnp.float32, local_loss: str = 'xent',
                loss_weights: Optional[Sequence[float]] = None,
                remat: bool = False, auglocal_depth: int = 2) -> PartitionedModel:
  """Builds `network` cut into blocks for training `mode`.

  Args:
    network: a `Network` (a user's own: its units are cut as they are), the
      name of a built-in one (`models.ARCHITECTURES`), or
      'package.module:function' naming a function that returns a `Network`.
    num_classes: classes of every head (at least 2).
    num_blocks: K (default 4, or what `split_points` makes). K=1 is plain backprop.
    split_points: unit indices where blocks 2..K start, instead of the default cut;
      with `num_blocks` too, the two must agree.
    mode: one of `MODES`.
    aux_head: head of blocks 1..K-1 (one of `models.HEADS`, or a user's head: a
      callable such as a Flax module class, called as `aux_head(num_classes,
      dtype=dtype)`), or a list of K-1 of these, one per auxiliary block;
      block K's head is always the standard linear classifier.
    width: channel multiplier of a built-in network, positive (0.25 for quick CPU runs).
    stem: 'cifar' (3x3, stride 1) or 'imagenet' (7x7 stride 2 + max-pool), built-in
      ResNets only.
    dtype: computation dtype of the heads and of a built-in network (parameters stay
      float32), e.g. jnp.bfloat16 on accelerators; a user's network sets its own.
    local_loss: loss of blocks 1..K-1, one of `LOSSES`.
    loss_weights: InfoPro's (reconstruction, task) weights of the first and the
      last auxiliary block, `(recon_first, task_first, recon_last, task_last)`,
      linear in between; used by the *_recon losses (default
      `DEFAULT_LOSS_WEIGHTS`).
    remat: gradient checkpointing: every unit under `jax.checkpoint` (`REMAT_POLICY`),
      trading a second forward pass for activation memory. Any mode; same update.
    auglocal_depth: AugLocal's depth: later units copied into the first block's
      `auglocal` head, falling linearly to about half at the last auxiliary block.
  """
  if mode not in MODES:
    raise UsageError(f'unknown mode {mode!r}; choose one of {", ".join(MODES)}')
  # The command line's checks (experiments/config.py), in the same words, for library users.
  if not width > 0:
    raise UsageError(f'width must be positive, got {width}')
  if num_classes < 2:
    raise UsageError(f'num_classes must be at least 2, got {num_classes}')
  if num_blocks is not None and num_blocks < 1:
    raise UsageError(f'num_blocks must be at least 1, got {num_blocks}')
  if (num_blocks is not None and split_points is not None
      and num_blocks != len(split_points) + 1):
    raise UsageError(f'split_points={",".join(map(str, split_points))} makes '
                     f'{len(split_points) + 1} blocks but num_blocks={num_blocks}; give one of '
                     f'the two')
  network = models.resolve(network, width=width, stem=stem, dtype=dtype)
  stem_module, units = network.stem, network.units
  if split_points is None:
    split_points = default_split_points(network.stages(), 4 if num_blocks is None else num_blocks)
  split_points = validate_split_points(split_points, len(units))
  bounds = (0,) + split_points + (len(units),)
  num_blocks = len(bounds) - 1
  aux_heads = _aux_head_names(aux_head, num_blocks - 1)
  loss_specs = aux_loss_specs(local_loss, num_blocks - 1, loss_weights)
  blocks = []
  for k in range(num_blocks):
    is_output = k == num_blocks - 1
    blocks.append(Block(
        units=units[bounds[k]:bounds[k + 1]],
        head=(models.make_head('linear', num_classes, dtype) if is_output else
              _aux_head(aux_heads[k], local_loss, num_classes, dtype,
                        following_units=units[bounds[k + 1]:], aux_index=k,
                        num_aux=num_blocks - 1, auglocal_depth=auglocal_depth)),
        stem=stem_module if k == 0 else None,
        detach_input=(mode == 'bwbpf'),
        detach_head_input=(mode == 'bp' and not is_output), remat=remat,
        loss=LossSpec() if is_output else loss_specs[k]))
  return PartitionedModel(arch=network.name, blocks=tuple(blocks), split_points=split_points,
                          mode=mode, num_classes=num_classes, remat=remat)


def _aux_head_names(aux_head, num_aux: int) -> tuple:
  if isinstance(aux_head, str) or callable(aux_head):
    return (aux_head,) * num_aux
  names = tuple(aux_head)
  if len(names) != num_aux:
    raise UsageError(f'{len(names)} auxiliary heads given for {num_aux} auxiliary blocks; '
                     f'give one name, or one per block but the last')
  return names


def _aux_head(name, local_loss, num_classes, dtype, **placement):
  """The head of an auxiliary block, wrapped in an `Objective` where the loss needs more than logits."""
  contrastive = local_loss.startswith('supcon')
  network = models.make_head(name, EMBEDDING_SIZE if contrastive else num_classes, dtype,
                             **placement)
  if local_loss == 'xent':
    return network
  decoder = models.heads.Decoder(dtype=dtype) if local_loss.endswith('_recon') else None
  return models.heads.Objective(network, num_classes, contrastive=contrastive, decoder=decoder,
                                dtype=dtype)


def aux_loss_specs(local_loss: str, num_aux: int,
                   loss_weights: Optional[Sequence[float]] = None) -> tuple:
  """The `LossSpec` of each auxiliary block: InfoPro's weights, linear in the block's index.

  Auxiliary block k of 1..K-1 gets ratio r = (k-1) / (K-2) (0 when K = 2):
  reconstruction weight (1-r) recon_first + r recon_last, task weight likewise.
  """
  if local_loss not in LOSSES:
    raise UsageError(f'unknown local loss {local_loss!r}; choose one of {", ".join(LOSSES)}')
  kind = 'supcon' if local_loss.startswith('supcon') else 'xent'
  if not local_loss.endswith('_recon'):
    return (LossSpec(kind=kind),) * num_aux
  weights = tuple(float(w) for w in (loss_weights or DEFAULT_LOSS_WEIGHTS))
  if len(weights) != 4 or min(weights) < 0:
    raise UsageError(f'loss weights must be 4 non-negative numbers (reconstruction and task '
                     f'weight of the first and the last auxiliary block), got {list(weights)}')
  recon_first, task_first, recon_last, task_last = weights
  specs = []
  for k in range(num_aux):
    ratio = k / (num_aux - 1) if num_aux > 1 else 0.0
    specs.append(LossSpec(kind=kind,
                          task_weight=task_first * (1 - ratio) + task_last * ratio,
                          reconstruction_weight=recon_first * (1 - ratio) + recon_last * ratio))
  return tuple(specs)


def explain_block_failure(model: PartitionedModel, block_index: int, x,
                          image_shape=None) -> None:
  """Raises a `UsageError` naming what in block `block_index` + 1 cannot run on `x`, if anything.

  Called when a block fails to initialise, to turn a Flax or shape error deep in
  a user's network into one line: the stem or the unit (by its index in the
  network) that does not accept `train` or cannot read the previous unit's
  output, or the head that cannot read the block's features. Returns quietly
  when every part runs (the failure was elsewhere; the caller re-raises it).

  Args:
    model: the partitioned network.
    block_index: 0-based index of the block.
    x: the block's input (an array or `jax.ShapeDtypeStruct`, batch first).
    image_shape: the network input's shape without the batch, for a decoder head.
  """
  block = model.blocks[block_index]
  first_unit = sum(len(b.units) for b in model.blocks[:block_index])
  layers = [('the stem', block.stem)] if block.stem is not None else []
  layers += [(f'unit {first_unit + i} ({type(unit).__name__})', unit)
             for i, unit in enumerate(block.units)]
  x = jax.ShapeDtypeStruct(x.shape, x.dtype)
  key = jax.eval_shape(lambda: jax.random.key(0))
  for label, layer in layers:
    layer = layer.clone(parent=None)
    try:
      x = jax.eval_shape(lambda k, v, layer=layer: layer.init_with_output(k, v, train=False)[0],
                         key, x)
    except Exception as e:  # pylint: disable=broad-except
      raise layer_failure(label, e, x.shape) from None
  head = block.head.clone(parent=None)
  extra = {'image_shape': image_shape} if isinstance(head, models.heads.Objective) else {}
  try:
    jax.eval_shape(lambda k, v: head.init(k, v, train=False, **extra), key, x)
  except Exception as e:  # pylint: disable=broad-except
    reason = str(e) if isinstance(e, UsageError) else error_summary(e)
    raise UsageError(f'block {block_index + 1}\'s head ({type(block.head).__name__}) cannot '
                     f'read its features of shape {list(x.shape)}: {reason}') from None


def block_unit_counts(model: PartitionedModel) -> tuple:
  """Units per block, e.g. (3, 4, 6, 3) for ResNet-50 with K=4."""
  return tuple(len(block.units) for block in model.blocks)
