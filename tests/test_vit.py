"""The built-in ViTs (bwbpf_jax/models/vit.py) and the transformer head, through the public path.

The ViT is a registry entry like the VGGs and ResNets: a `Network` of a patch
embedding stem and one unit per transformer layer, cut and trained by the same
code as a user's network (tests/test_network.py).
"""

import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bwbpf_jax as bw
from bwbpf_jax.errors import UsageError
from bwbpf_jax.models import heads
from bwbpf_jax.models import vit
from fake_devices import NUM_DEVICES
import test_main
import test_network
import test_step
import user_networks

IMAGE = test_step.IMAGE  # (16, 16, 3): 16 tokens of patch 4.
SMALL = 'vit_tiny_d4'  # 4 layers...
WIDTH = 0.125  # ...24 wide, 1 head, MLP 96: traces and steps in seconds.
TOKEN_HEADS = ('linear', 'mlp', 'transformer', 'auglocal')


def _setup(num_blocks, mode='bwbpf', aux_head='linear', local_loss='xent', arch=SMALL):
  model = bw.build_model(arch, num_classes=10, num_blocks=num_blocks, mode=mode,
                         aux_head=aux_head, width=WIDTH, local_loss=local_loss)
  # SGD, not the ViT recipe's AdamW: the key projection's bias gets a gradient that is zero
  # up to rounding (softmax ignores a shift shared by every key), which Adam's normalisation
  # would turn into full-size steps that differ between two orders of summation.
  tx = bw.make_optimizer('sgd', learning_rate=0.05, total_steps=100)
  return model, tx, bw.init_block_states(model, tx, jax.random.key(0), IMAGE)


def _count(tree):
  return sum(leaf.size for leaf in jax.tree_util.tree_leaves(tree))


def hand_count(dim, depth, mlp_dim, patch, tokens, num_classes, channels=3):
  """Parameters of a mean-pooled pre-norm ViT, counted by hand.

  Per layer: q, k, v and output projections (4 D^2 weights + 4 D biases), the
  MLP (2 D M weights + M + D biases), two LayerNorms (4 D). Plus the patch
  embedding (p^2 C D + D), the position embedding (T D), the final LayerNorm
  (2 D) and the classifier (D classes + classes).
  """
  per_layer = 4 * dim * dim + 4 * dim + 2 * dim * mlp_dim + mlp_dim + dim + 4 * dim
  return (depth * per_layer + patch * patch * channels * dim + dim + tokens * dim + 2 * dim
          + dim * num_classes + num_classes)


class ArchitectureTest(parameterized.TestCase):

  @parameterized.parameters(('vit_tiny', 192, 768, 5_362_378), ('vit_small', 384, 1536, 21_341_578))
  def test_parameter_count_of_deit_sizes_on_cifar(self, arch, dim, mlp_dim, expected):
    self.assertEqual(hand_count(dim, 12, mlp_dim, patch=4, tokens=64, num_classes=10), expected)
    model = bw.build_model(arch, num_classes=10, num_blocks=1)
    states = bw.abstract_block_states(
        model, bw.make_optimizer('sgd', learning_rate=0.1, total_steps=1), (32, 32, 3))
    self.assertEqual(_count(states[0].params), expected)

  def test_imagenet_stem_is_patch_8_for_64_pixel_images(self):
    network = bw.models.network('vit_tiny_d4', stem='imagenet')
    self.assertEqual(network.stem.patch, 8)
    model = bw.build_model(network, num_classes=200, num_blocks=2)
    states = bw.abstract_block_states(
        model, bw.make_optimizer('sgd', learning_rate=0.1, total_steps=1), (64, 64, 3))
    self.assertEqual(states[0].params['stem']['position'].shape, (64, 192))  # 8x8 tokens.
    self.assertEqual(_count(states[0].params) + _count(states[1].params)
                     - (192 * 200 + 200),  # Block 1's auxiliary linear head.
                     hand_count(192, 4, 768, patch=8, tokens=64, num_classes=200))

  def test_width_scales_sizes_and_heads_and_the_suffix_sets_depth(self):
    self.assertEqual(vit.scaled_sizes('vit_tiny', 1.0), (192, 3, 768))
    self.assertEqual(vit.scaled_sizes('vit_tiny', 0.5), (96, 2, 384))
    self.assertEqual(vit.scaled_sizes('vit_tiny', 0.125), (24, 1, 96))
    self.assertEqual(vit.scaled_sizes('vit_small', 0.5), (192, 3, 768))
    for width in np.linspace(0.05, 2.0, 40):  # Every width gives whole heads.
      dim, num_heads, _ = vit.scaled_sizes('vit_small', float(width))
      self.assertEqual(dim % num_heads, 0, width)
    network = bw.models.network('vit_small_d6', width=0.5)
    self.assertEqual(network.num_units, 6)
    self.assertEqual([u.final_norm for u in network.units], [False] * 5 + [True])
    self.assertEqual(network.stem.dim, 192)
    self.assertEqual(bw.models.network('vit_tiny').num_units, 12)

  def test_default_cut_spreads_layers_evenly(self):
    self.assertEqual(bw.build_model('vit_tiny', num_classes=10, num_blocks=4).split_points,
                     (3, 6, 9))
    self.assertEqual(bw.build_model('vit_tiny_d6', num_classes=10, num_blocks=4).split_points,
                     (2, 3, 5))

  def test_units_say_they_keep_their_token_count(self):
    unit = bw.models.network(SMALL).units[0]
    self.assertFalse(unit.downsamples)
    self.assertIsNot(unit.with_downsampling(False), unit)
    with self.assertRaisesRegex(UsageError, 'cannot downsample'):
      unit.with_downsampling(True)


class BadInputTest(parameterized.TestCase):

  def _init(self, image=IMAGE, **kwargs):
    model = bw.build_model(SMALL, num_classes=10, width=WIDTH, **kwargs)
    bw.abstract_block_states(model, bw.make_optimizer('sgd', learning_rate=0.1, total_steps=1),
                             image)

  def test_patch_that_does_not_divide_the_image(self):
    with self.assertRaisesRegex(UsageError, r'^the stem: patch size 4 does not divide the image '
                                r'size 18x18'):
      self._init(image=(18, 18, 3), num_blocks=2)

  def test_depth_smaller_than_num_blocks(self):
    with self.assertRaisesRegex(UsageError, 'cannot cut 4 units into 5 blocks'):
      self._init(num_blocks=5)

  @parameterized.parameters('dgl', 'infopro')
  def test_heads_that_cannot_read_tokens(self, aux_head):
    with self.assertRaisesRegex(UsageError, rf"^block 1's head .* cannot read its features of "
                                rf"shape \[1, 16, 24\]: the {aux_head} head reads \[B, H, W, C\]"):
      self._init(num_blocks=2, aux_head=aux_head)

  def test_reconstruction_loss_cannot_read_tokens(self):
    with self.assertRaisesRegex(UsageError, 'reconstruction decoder head reads'):
      self._init(num_blocks=2, local_loss='xent_recon')

  def test_unknown_names(self):
    with self.assertRaisesRegex(UsageError, 'unknown architecture'):
      bw.build_model('vit_huge', num_classes=10)
    with self.assertRaisesRegex(UsageError, 'unknown stem'):
      bw.build_model(SMALL, num_classes=10, stem='patch2')

  @pytest.mark.slow  # Four command-line runs in a process; the fast check: the library errors.
  def test_command_line_errors_are_one_line_and_exit_2(self):
    cases = (
        (['--image_size=18'], 'patch size 4 does not divide the image size 18x18'),
        (['--num_blocks=5'], 'cannot cut 4 units into 5 blocks'),
        (['--aux_head=dgl'], 'the dgl head reads [B, H, W, C]'),
        (['--local_loss=xent_recon'], 'reconstruction decoder head reads'),
    )
    test_main.check_flag_errors(self, [(['--dataset=digits', f'--arch={SMALL}', '--width=0.125',
                                         '--num_blocks=2', *flags], expected)
                                       for flags, expected in cases])


class TransformerHeadTest(parameterized.TestCase):

  def test_reads_tokens_and_maps_and_refuses_vectors(self):
    head = heads.TransformerHead(10)
    for shape in ((2, 5, 24), (2, 3, 4, 24)):
      logits, _ = head.init_with_output(jax.random.key(0), jnp.ones(shape), train=False)
      self.assertEqual(logits.shape, (2, 10))
    with self.assertRaisesRegex(UsageError, 'the transformer head reads tokens'):
      head.init(jax.random.key(0), jnp.ones((2, 24)), train=False)

  def test_a_map_is_read_as_its_positions_tokens(self):
    head = heads.TransformerHead(10)
    x = jax.random.normal(jax.random.key(1), (2, 3, 4, 24))
    variables = head.init(jax.random.key(0), x, train=False)
    chex.assert_trees_all_close(head.apply(variables, x, train=False),
                                head.apply(variables, x.reshape(2, 12, 24), train=False))

  def test_attention_heads_divide_the_width(self):
    self.assertEqual([heads.attention_heads(d) for d in (24, 64, 192, 384, 200)], [1, 1, 3, 6, 2])

  @pytest.mark.slow
  def test_on_a_cnn_and_refused_on_an_mlp_at_init(self):
    model = bw.build_model('vgg11', num_classes=10, num_blocks=2, width=0.125,
                           aux_head='transformer')
    tx = bw.make_optimizer('sgd', learning_rate=0.05, total_steps=10)
    states = bw.init_block_states(model, tx, jax.random.key(0), IMAGE)
    _, metrics = bw.make_train_step(model, tx)(states, test_step._batch())
    self.assertTrue(np.all(np.isfinite(metrics['loss'])))
    with self.assertRaisesRegex(UsageError, r"^block 1's head \(TransformerHead\) cannot read its "
                                r'features of shape \[1, 32\]: the transformer head reads tokens'):
      bw.abstract_block_states(bw.build_model(user_networks.mlp(), num_classes=10, num_blocks=2,
                                              aux_head='transformer'), tx, IMAGE)


class ModeTest(parameterized.TestCase):
  """The fast tier keeps the transformer head's isolation; the rest is marked slow."""

  def test_bwbpf_transformer_head_is_isolated(self):
    test_step.check_bwbpf_isolation(self, _setup(4, aux_head='transformer'))

  @pytest.mark.slow
  def test_bp_equals_jax_grad_of_the_plain_network(self):
    test_step.check_plain_backprop(self, SMALL, 2, width=WIDTH)

  @pytest.mark.slow
  def test_deep_supervision_reaches_earlier_blocks(self):
    test_step.check_deep_supervision(self, _setup(2, mode='deep_supervision',
                                                  aux_head='transformer'))

  @pytest.mark.slow
  def test_blockwise_step_equals_fused_step(self):
    test_step.check_blockwise_equals_fused(_setup(4, aux_head='transformer'), rtol=1e-5,
                                           atol=1e-6)


@pytest.mark.slow
class MoreHeadsTest(parameterized.TestCase):
  """Isolation with the other token heads and with the contrastive loss (slow tier)."""

  @parameterized.parameters(*(head for head in TOKEN_HEADS if head != 'transformer'))
  def test_bwbpf_every_other_token_head_is_isolated(self, aux_head):
    test_step.check_bwbpf_isolation(self, _setup(4, aux_head=aux_head))

  @parameterized.parameters('transformer', 'linear')
  def test_bwbpf_isolated_with_a_contrastive_loss(self, aux_head):
    model, tx, states = _setup(2, aux_head=aux_head, local_loss='supcon')
    self.assertIsInstance(model.blocks[0].head, heads.Objective)
    test_step.check_bwbpf_isolation(self, (model, tx, states))


class SwitchBenchTest(absltest.TestCase):

  @pytest.mark.slow
  def test_switch_and_stacked_weights_give_the_plain_gradient_and_are_timed(self):
    from benchmarks import switch_bench  # pylint: disable=g-import-not-at-top
    result = switch_bench.measure(SMALL, WIDTH, num_blocks=4, batch_size=4, image_size=16,
                                  steps=1)
    self.assertEqual(result['block_input'], [4, 16, 24])
    for name in ('plain', 'switch', 'stacked'):
      self.assertGreater(result[f'{name}_ms'], 0)
    with self.assertRaisesRegex(UsageError, 'needs at least 2 alike middle blocks'):
      switch_bench.measure(SMALL, WIDTH, num_blocks=3, batch_size=4, image_size=16, steps=1)

  def test_a_bad_flag_is_one_line_and_exit_2(self):
    proc = subprocess.run([sys.executable, '-m', 'benchmarks.switch_bench', '--steps=abc'],
                          cwd=test_main.REPO, capture_output=True, text=True, timeout=120)
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertEqual(proc.stderr.splitlines(), ["error: flag --steps=abc: invalid literal for "
                                                "int() with base 10: 'abc'"])


class RecipeTest(parameterized.TestCase):

  @parameterized.parameters('vit_cifar10_tiny', 'vit_cifar10_small', 'cpu_cifar10_vit')
  def test_presets_use_adamw_warmup_cosine_and_weight_decay(self, name):
    from experiments import config as config_lib  # pylint: disable=g-import-not-at-top
    config = config_lib.make_config({}, name)
    self.assertIn(config.arch, vit.ARCHITECTURES)
    self.assertEqual((config.optimizer, config.weight_decay, config.augment),
                     ('adamw', 0.05, 'crop_flip'))
    self.assertGreater(config.warmup_epochs, 0)


class MultiDeviceTest(parameterized.TestCase):
  """Needs 8 devices; tests/test_multi_device.py runs it on 8 fake CPU devices."""

  def setUp(self):
    super().setUp()
    if jax.device_count() < NUM_DEVICES:
      self.skipTest(f'needs {NUM_DEVICES} devices, found {jax.device_count()}')

  def test_data_parallel_step_equals_one_device(self):
    test_network.check_data_parallel_equals_one_device(*_setup(2, aux_head='transformer'))

  def test_stage_pipeline_in_2_stages_equals_synchronous_steps(self):
    # One mesh, as each compiles anew (~30 s): two blocks per stage with transformer heads
    # on two data rows, whose layer norms take no statistics across rows. One block per
    # stage and one row are the pipeline's own cases (tests/test_stage_pipeline.py).
    model, tx, states = _setup(4, aux_head='transformer')
    batches = test_network._batches(2)
    expected = test_network._synchronous(model, tx, states, batches)
    trained = test_network._pipeline_train(model, tx, states, batches, num_stages=2,
                                           num_rows=2)
    chex.assert_trees_all_close(trained, expected, rtol=1e-4, atol=1e-5)


if __name__ == '__main__':
  absltest.main()
