"""Engines: where block states and batches live, and which jitted steps run on them.

The loop in train.py is the same for every engine; only placement differs.
"""

import dataclasses
from typing import Callable

import jax

import bwbpf_jax as bw
from experiments.config import Config


@dataclasses.dataclass(frozen=True)
class Engine:
  """How states and batches are placed and which jitted steps run on them."""
  name: str
  num_devices: int
  put_states: Callable
  put_batch: Callable
  train_step: Callable
  eval_step: Callable


def make_engine(config: Config, model, tx) -> Engine:
  """Single-device training: the fused step, or the block-wise one for bwbpf."""
  use_blockwise = config.train_step == 'blockwise' or (
      config.train_step == 'auto' and config.mode == 'bwbpf' and model.num_blocks > 1)
  skip = config.skip_nonfinite
  train_step = (bw.make_blockwise_train_step(model, tx, skip_nonfinite=skip) if use_blockwise
                else bw.make_train_step(model, tx, skip_nonfinite=skip))
  return Engine(name='none', num_devices=1, put_states=jax.device_put,
                put_batch=jax.device_put, train_step=train_step,
                eval_step=bw.make_eval_step(model))
