"""Per-block training state: each block's parameters, batch statistics and optimizer state."""

import contextlib
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from bwbpf_jax.partition import PartitionedModel, explain_block_failure


@flax.struct.dataclass
class BlockState:
  """Everything one block needs to train by itself; a pytree."""
  params: Any
  batch_stats: Any
  opt_state: Any


def _init_block(block, tx, key, x, image_shape):
  variables = block.init(key, x, train=False, image_shape=image_shape)
  params = variables['params']
  return BlockState(params=params, batch_stats=variables.get('batch_stats', {}),
                    opt_state=tx.init(params))


def _block_output(block, state, x):
  return block.apply({'params': state.params, 'batch_stats': state.batch_stats}, x,
                     train=False, method='features')


def _compile_options():
  # Initialisation runs once: on CPU, where compiling random-number kernels with full
  # LLVM optimisation takes seconds per block, compile it cheaply instead.
  return {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None


def init_block_states(model: PartitionedModel, tx: optax.GradientTransformation,
                      rng: jax.Array, input_shape) -> tuple:
  """Initialises every block, in order, on the output shape of the block before.

  Args:
    model: the partitioned network.
    tx: the optimizer every block uses (each block gets its own state of it).
    rng: a PRNG key; block k's parameters come from the k-th split of it.
    input_shape: one input's shape ([H, W, C] for an image, [T, D] tokens, [D]), or
      a batch's [B, H, W, C].

  Returns:
    A tuple of K `BlockState`s.
  """
  x = jnp.zeros(_batch_shape(input_shape), jnp.float32)
  image_shape = x.shape[1:]
  states = []
  for index, (block, key) in enumerate(zip(model.blocks,
                                            jax.random.split(rng, model.num_blocks))):
    with _explained_failures(model, index, x, image_shape):
      init = jax.jit(functools.partial(_init_block, block, tx,
                                       image_shape=image_shape)).lower(key, x)
    states.append(init.compile(_compile_options())(key, x))
    x = jax.eval_shape(functools.partial(_block_output, block), states[-1], x)
    x = jnp.zeros(x.shape, x.dtype)
  return tuple(states)


def abstract_block_states(model: PartitionedModel, tx: optax.GradientTransformation,
                          input_shape) -> tuple:
  """Shapes and dtypes of `init_block_states`'s result, computed without running it.

  Used to count parameters and as the target a checkpoint is restored into.
  """
  x = jax.ShapeDtypeStruct(_batch_shape(input_shape), jnp.float32)
  image_shape = x.shape[1:]
  key = jax.eval_shape(lambda: jax.random.key(0))
  states = []
  for index, block in enumerate(model.blocks):
    with _explained_failures(model, index, x, image_shape):
      states.append(jax.eval_shape(functools.partial(_init_block, block, tx,
                                                     image_shape=image_shape), key, x))
    x = jax.eval_shape(functools.partial(_block_output, block), states[-1], x)
  return tuple(states)


@contextlib.contextmanager
def _explained_failures(model, block_index, x, image_shape):
  """A block that fails to initialise is explained in one line (`explain_block_failure`).

  A failure the explanation cannot place (every part of the block runs on its
  own) is raised as it was.
  """
  try:
    yield
  except Exception:  # pylint: disable=broad-except
    explain_block_failure(model, block_index, x, image_shape)
    raise


def _batch_shape(input_shape) -> tuple:
  return tuple(input_shape) if len(input_shape) == 4 else (1,) + tuple(input_shape)


def count_params(tree) -> int:
  return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(tree))


def backbone_param_count(model: PartitionedModel, block_states) -> int:
  """Parameters of the network itself: all blocks minus the auxiliary heads.

  This is the count of the standard architecture (units plus output layer), so
  it can be checked against published figures.
  """
  total = count_params([s.params for s in block_states])
  aux = count_params([s.params['head'] for s in block_states[:-1]])
  return total - aux
