"""Per-block optimizers. Every block owns one optax state; the transformation is shared."""

from typing import Optional

import optax

from bwbpf_jax.errors import UsageError

OPTIMIZERS = ('sgd', 'adamw')
# Each optimizer's peak learning rate when none is given: SGD's is the paper's, AdamW's the
# usual one for Adam-type updates (SGD's 0.1 makes AdamW diverge).
DEFAULT_LEARNING_RATES = {'sgd': 0.1, 'adamw': 1e-3}
# `make_optimizer` arguments only some optimizers use (the others ignore them).
OPTIMIZER_ARGUMENTS = {'momentum': ('sgd',), 'nesterov': ('sgd',)}


def learning_rate_schedule(learning_rate: float, *, total_steps: int,
                           warmup_steps: int = 0) -> optax.Schedule:
  """Linear warm-up from 0 over `warmup_steps`, then cosine decay to 0 at `total_steps`.

  The optimizers below use it; it is public so a training loop can build it once,
  train with it (`make_optimizer(learning_rate=schedule)`) and log the rate that
  update `count` used, `schedule(count)`, from the same object.
  """
  if total_steps < 1:
    raise UsageError(f'the schedule needs at least one step, got total_steps={total_steps}')
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup_steps else learning_rate, peak_value=learning_rate,
      warmup_steps=warmup_steps, decay_steps=max(total_steps, warmup_steps + 1))


def make_optimizer(name: str = 'sgd', *, learning_rate: float | optax.Schedule | None = None,
                   total_steps: Optional[int] = None, momentum: float = 0.9,
                   weight_decay: float = 5e-4, warmup_steps: int = 0,
                   nesterov: bool = False) -> optax.GradientTransformation:
  """The paper's recipe by default: SGD, momentum 0.9, weight decay 5e-4, cosine decay.

  `learning_rate=None` is the optimizer's own default (`DEFAULT_LEARNING_RATES`).
  A float `learning_rate` is the peak of `learning_rate_schedule(learning_rate,
  total_steps=..., warmup_steps=...)`. A schedule (a function of the update
  count) is used as it is, so a training loop can build it once, train with it
  and log the rate from the same object; `total_steps` and `warmup_steps` then
  stay unset.

  SGD's weight decay is added to the gradient before momentum, as PyTorch's
  `SGD(weight_decay=...)` does (coupled L2), so hyper-parameters carry over from
  the reference code. AdamW decouples it, as its name says. `nesterov` is
  PyTorch's `SGD(nesterov=True)`, part of InfoPro's recipe (optax's Nesterov
  step is PyTorch's: g + momentum * new velocity).
  """
  if name not in OPTIMIZERS:
    raise UsageError(f'unknown optimizer {name!r}; choose one of {", ".join(OPTIMIZERS)}')
  if learning_rate is None:
    learning_rate = DEFAULT_LEARNING_RATES[name]
  if callable(learning_rate):
    if total_steps is not None or warmup_steps:
      raise ValueError('a learning-rate schedule fixes its own steps; leave total_steps and '
                       'warmup_steps unset')
    schedule = learning_rate
  elif total_steps is None:
    raise ValueError('a float learning_rate needs total_steps for its cosine decay')
  else:
    schedule = learning_rate_schedule(learning_rate, total_steps=total_steps,
                                      warmup_steps=warmup_steps)
  if name == 'sgd':
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
  return optax.adamw(schedule, weight_decay=weight_decay)  # 'adamw'
