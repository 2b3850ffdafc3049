"""`Network`: the library's description of a network to cut into blocks.

A network is a value, not a name: an optional stem and a sequence of units,
each a Flax linen module called as `unit(x, train=...)`. The built-in VGGs and
ResNets are `Network`s made by a registry (`bwbpf_jax.models.network`); a
user's CNN, MLP or transformer is the same kind of value. Everything
downstream (cuts, costs, heads, steps, pipeline, runner, checkpoints) takes the
value and asks it what it needs: shapes through `jax.eval_shape`, never the
type of a unit.

What a unit must do:
- accept `(x, train: bool)` and return the next unit's input; `train` is
  True in the training step (BatchNorm uses batch statistics, dropout is
  on) and False in evaluation;
- keep its variables in 'params' and, if it has running statistics,
  'batch_stats' (as `flax.linen.BatchNorm` does); no other collections;
- be deterministic given its variables (the training step passes no PRNG key).

Optional, for the `auglocal` head that copies later units: a unit that
changes resolution says so with a `downsamples` attribute and gives a fresh
copy with or without its downsampling through `with_downsampling(bool)`.
"""

import dataclasses
import importlib
from typing import Optional, Sequence

from flax import linen as nn

from bwbpf_jax.errors import UsageError


@dataclasses.dataclass(frozen=True, eq=False)
class Network:
  """An optional stem and the units that follow it, in order.

  Attributes:
    units: Flax modules, each called as `unit(x, train=...)`; blocks are
      contiguous runs of them. At least one.
    stem: an optional module run before unit 0 (same call); it always belongs
      to block 1, so no cut can fall between it and unit 0.
    stage_of_unit: optional stage index of each unit, non-decreasing; the
      default cut (`partition.default_split_points`) cuts at stage boundaries
      first. Without it every unit is its own stage, so the default cut gives
      blocks of near-equal unit counts.
    name: how the runner's outputs name the network (workdirs, plots, results).
  """
  units: Sequence[nn.Module]
  stem: Optional[nn.Module] = None
  stage_of_unit: Optional[Sequence[int]] = None
  name: str = 'network'

  def __post_init__(self):
    units = tuple(self.units)
    if not units:
      raise UsageError('a Network needs at least one unit')
    for index, unit in enumerate(units):
      if not isinstance(unit, nn.Module):
        raise UsageError(f'unit {index} of the network is a {type(unit).__name__}, not a Flax '
                         f'module (a flax.linen.Module called as unit(x, train=...))')
    if self.stem is not None and not isinstance(self.stem, nn.Module):
      raise UsageError(f'the network\'s stem is a {type(self.stem).__name__}, not a Flax module')
    object.__setattr__(self, 'units', units)
    if self.stage_of_unit is not None:
      stages = tuple(int(s) for s in self.stage_of_unit)
      if len(stages) != len(units):
        raise UsageError(f'stage_of_unit has {len(stages)} entries for {len(units)} units')
      if list(stages) != sorted(stages):
        raise UsageError(f'stage_of_unit must be non-decreasing, got {list(stages)}')
      object.__setattr__(self, 'stage_of_unit', stages)

  @property
  def num_units(self) -> int:
    return len(self.units)

  def stages(self) -> tuple:
    """`stage_of_unit`, or one stage per unit when the network names none."""
    return self.stage_of_unit or tuple(range(len(self.units)))


def is_import_spec(name: str) -> bool:
  """Whether `name` has the form 'package.module:function' (a user's network by import path)."""
  module, sep, function = name.partition(':')
  return (bool(sep) and ':' not in function
          and all(part.isidentifier() for part in module.split('.'))
          and function.isidentifier())


def import_network(spec: str) -> Network:
  """The `Network` that `package.module:function` returns when called with no arguments.

  The module is imported by name, as big_vision imports its models, so a user's
  network needs no change to the library: `--arch=my_nets:small_cnn`.
  """
  if not is_import_spec(spec):
    raise UsageError(f'arch {spec!r} is not of the form package.module:function')
  module_name, _, function_name = spec.partition(':')
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise UsageError(f'cannot import {module_name!r} for arch {spec!r}: {e}') from None
  function = getattr(module, function_name, None)
  if not callable(function):
    raise UsageError(f'module {module_name!r} has no function {function_name!r} (arch {spec!r})')
  try:
    network = function()
  except TypeError as e:
    raise UsageError(f'{spec} must be callable with no arguments: {e}') from None
  if not isinstance(network, Network):
    raise UsageError(f'{spec}() returned a {type(network).__name__}, not a bwbpf_jax.Network')
  if network.name == Network.name:
    network = dataclasses.replace(network, name=function_name)
  return network


def error_summary(error: Exception) -> str:
  """'ErrorType: first line of the message', for one-line errors."""
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'.rstrip(': ')


def layer_failure(label: str, error: Exception, input_shape) -> UsageError:
  """The one-line error for a unit (or stem) that fails on its input.

  A `TypeError` about `train` means the unit does not take the call every unit
  gets; anything else is a unit that cannot read what the one before it made
  (units that do not chain), named by its index.
  """
  if isinstance(error, UsageError):
    return UsageError(f'{label}: {error}')
  if isinstance(error, TypeError) and 'train' in str(error):
    return UsageError(f'{label} does not accept train=...: every unit is called as '
                      f'unit(x, train=...) ({error_summary(error)})')
  return UsageError(f'{label} fails on an input of shape {list(input_shape)}: '
                    f'{error_summary(error)}')


def unit_label(network_units: Sequence[nn.Module], index: int) -> str:
  return f'unit {index} ({type(network_units[index]).__name__})'
