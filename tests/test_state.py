"""bwbpf_jax.state: per-block initialisation, its shape-only twin, parameter counts."""

import functools

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp

import bwbpf_jax as bw
from bwbpf_jax import state as state_lib

_INPUT_SHAPE = (8, 8, 3)


@functools.lru_cache(maxsize=None)
def _model_tx_states():
  model = bw.build_model('vgg11', num_classes=10, num_blocks=2, width=0.125)
  tx = bw.make_optimizer('sgd', learning_rate=0.1, total_steps=10)
  return model, tx, bw.init_block_states(model, tx, jax.random.key(3), _INPUT_SHAPE)


class InitBlockStatesTest(absltest.TestCase):

  def test_block_k_is_initialised_from_the_kth_key_on_the_previous_blocks_output(self):
    model, tx, states = _model_tx_states()
    keys = jax.random.split(jax.random.key(3), model.num_blocks)
    x = jnp.zeros((1,) + _INPUT_SHAPE)
    for k, (block, state) in enumerate(zip(model.blocks, states)):
      variables = block.init(keys[k], x, train=False)
      chex.assert_trees_all_close(state.params, variables['params'], rtol=1e-6, atol=0,
                                  custom_message=f'block {k}')
      chex.assert_trees_all_equal(state.batch_stats, variables['batch_stats'])
      chex.assert_trees_all_equal(state.opt_state, tx.init(state.params))  # Its own, fresh.
      x = block.apply(variables, x, train=False)[0]

  def test_a_batch_shape_gives_the_same_states_as_one_image_shape(self):
    model, tx, states = _model_tx_states()
    chex.assert_trees_all_equal(
        bw.init_block_states(model, tx, jax.random.key(3), (4,) + _INPUT_SHAPE), states)

  def test_abstract_states_are_the_shapes_and_dtypes_of_the_real_ones(self):
    model, tx, states = _model_tx_states()
    abstract = bw.abstract_block_states(model, tx, _INPUT_SHAPE)
    self.assertEqual(jax.tree_util.tree_structure(abstract), jax.tree_util.tree_structure(states))
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract, states)

  def test_backbone_count_leaves_out_only_the_auxiliary_heads(self):
    model, _, states = _model_tx_states()
    every_param = state_lib.count_params([s.params for s in states])
    aux_head = state_lib.count_params(states[0].params['head'])
    self.assertEqual(aux_head, 32 * 10 + 10)  # Block 0 ends in the third stage: 256 x 0.125 channels.
    self.assertEqual(bw.backbone_param_count(model, states), every_param - aux_head)


if __name__ == '__main__':
  absltest.main()
