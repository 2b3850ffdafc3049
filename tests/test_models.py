"""Architectures: output shapes and parameter counts of the standard networks."""

from unittest import mock

from absl.testing import parameterized
import chex
from flax import linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import optax
import pytest

import bwbpf_jax as bw
from bwbpf_jax.errors import UsageError
from bwbpf_jax.models import architecture_units
from bwbpf_jax.models import layers


def _shapes_and_count(arch, stem, image_size, num_classes, width=1.0, num_blocks=4):
  """Block output shapes and backbone parameter count, from shapes only (no compile)."""
  model = bw.build_model(arch, num_classes=num_classes, num_blocks=num_blocks, stem=stem,
                         width=width)
  tx = optax.sgd(0.1)
  states = bw.abstract_block_states(model, tx, (image_size, image_size, 3))
  x = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
  shapes = []
  for block, state in zip(model.blocks, states):
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    x, outputs = jax.eval_shape(lambda v, x, b=block: b.apply(v, x, train=False), variables, x)
    shapes.append((x.shape, outputs['logits'].shape))
  return shapes, bw.backbone_param_count(model, states)


def _unit_output_sizes(arch, stem, image_size):
  """(height of every unit's output, stage of every unit), through the network (shapes only)."""
  stem_module, units, stage_of_unit = architecture_units(arch, width=0.125, stem=stem)
  key = jax.random.key(0)
  def output(module, x):
    return jax.eval_shape(lambda x: module.init_with_output(key, x, train=False)[0], x)
  x = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
  if stem_module is not None:
    x = output(stem_module, x)
  sizes = []
  for unit in units:
    x = output(unit, x)
    assert x.shape[1] == x.shape[2], x.shape
    sizes.append(x.shape[1])
  return sizes, stage_of_unit


def check_block_shapes(test, arch, stem_and_size, expected_count=None, num_classes=200):
  """Every block reports logits; every stage halves the resolution; the output block
  sees the lowest one. With `expected_count`, also the backbone's parameter count at
  full width, from the same trace (tracing a deep network is most of the cost)."""
  stem, size = stem_and_size
  width = 0.25 if expected_count is None else 1.0
  shapes, count = _shapes_and_count(arch, stem, size, num_classes, width=width)
  if expected_count is not None:
    test.assertEqual(count, expected_count)
  for features, logits in shapes:
    test.assertEqual(logits, (2, num_classes))
    test.assertLen(features, 4)
  # Every stage halves the resolution: a VGG stage in its last unit (the max-pool),
  # a ResNet stage after the first in its first unit (the stride); the first ResNet
  # stage keeps the stem's resolution (the cifar stem keeps the input's, the
  # imagenet stem quarters it).
  unit_sizes, stage_of_unit = _unit_output_sizes(arch, stem, size)
  for unit, (got, stage) in enumerate(zip(unit_sizes, stage_of_unit)):
    if arch.startswith('vgg'):
      last_of_stage = unit + 1 == len(stage_of_unit) or stage_of_unit[unit + 1] != stage
      expected = size // 2 ** (stage + 1 if last_of_stage else stage)
    else:
      expected = (size if stem == 'cifar' else size // 4) // 2 ** stage
    test.assertEqual(got, expected, f'unit {unit} (stage {stage})')
  test.assertEqual(shapes[-1][0][1:3], (unit_sizes[-1],) * 2)  # The output block's input.
  # The output block sees the lowest resolution: 32 / 2**4 (VGG: /2**5; CIFAR ResNets,
  # three stages: /2**2).
  final_hw = shapes[-1][0][1]
  family = ('vgg' if arch.startswith('vgg') else
            'cifar_resnet' if arch in bw.models.cifar_resnet.UNITS_PER_STAGE else 'resnet')
  expected = {('cifar', 32): {'vgg': 1, 'resnet': 4, 'cifar_resnet': 8},
              ('imagenet', 64): {'vgg': 2, 'resnet': 2, 'cifar_resnet': 4}}
  test.assertEqual(final_hw, expected[stem_and_size][family])


# The architectures tested in the fast tier: one of each family (VGG, basic-block
# and bottleneck ResNets, He et al.'s CIFAR ResNets); the slow tier tests the rest.
FAST_ARCHITECTURES = ('vgg11', 'resnet18', 'resnet50', 'resnet20')

# Counts of the standard architectures (torchvision / the common CIFAR variants).
PARAMETER_COUNTS = (
    # CIFAR variants: 3x3 stem, one linear classifier on 512 (or 2048) features.
    ('vgg11', 'cifar', 10, 9_231_114),
    ('vgg13', 'cifar', 10, 9_416_010),
    ('vgg16', 'cifar', 10, 14_728_266),
    ('vgg19', 'cifar', 10, 20_040_522),
    ('resnet18', 'cifar', 10, 11_173_962),
    ('resnet34', 'cifar', 10, 21_282_122),
    ('resnet50', 'cifar', 10, 23_520_842),
    ('resnet101', 'cifar', 10, 42_512_970),
    ('resnet152', 'cifar', 10, 58_156_618),
    # He et al.'s CIFAR ResNets with projection (option B) shortcuts: 0.27M/0.46M/0.85M/1.7M.
    ('resnet20', 'cifar', 10, 272_474),
    ('resnet32', 'cifar', 10, 466_906),
    ('resnet56', 'cifar', 10, 855_770),
    ('resnet110', 'cifar', 10, 1_730_714),
    # torchvision's ImageNet ResNets, 1000 classes.
    ('resnet18', 'imagenet', 1000, 11_689_512),
    ('resnet50', 'imagenet', 1000, 25_557_032),
    ('resnet101', 'imagenet', 1000, 44_549_160),
    ('resnet152', 'imagenet', 1000, 60_192_808),
)
STEMS_AND_SIZES = (('cifar', 32), ('imagenet', 64))


def _fast(arch):
  return arch in FAST_ARCHITECTURES


class ParameterCountTest(parameterized.TestCase):

  @parameterized.parameters(*[case for case in PARAMETER_COUNTS if _fast(case[0])])
  def test_backbone_count(self, arch, stem, num_classes, expected):
    _, count = _shapes_and_count(arch, stem, 32, num_classes)
    self.assertEqual(count, expected)


_COUNTS = {(arch, stem): (num_classes, expected)
           for arch, stem, num_classes, expected in PARAMETER_COUNTS}


@pytest.mark.slow
class DeepArchitectureShapeTest(parameterized.TestCase):
  """ShapeTest and ParameterCountTest on the other architectures, one trace for both (each
  deep count's architecture and stem is one of these cases)."""

  @parameterized.product(arch=[a for a in bw.ARCHITECTURES if not _fast(a)
                               and a not in bw.models.vit.ARCHITECTURES],  # Maps only.
                         stem_and_size=STEMS_AND_SIZES)
  def test_every_block_reports_logits_and_resolution_halves_and_the_count(self, arch,
                                                                         stem_and_size):
    num_classes, expected = _COUNTS.get((arch, stem_and_size[0]), (200, None))
    check_block_shapes(self, arch, stem_and_size, expected, num_classes)


class ShapeTest(parameterized.TestCase):

  @parameterized.product(arch=FAST_ARCHITECTURES, stem_and_size=STEMS_AND_SIZES)
  def test_every_block_reports_logits_and_resolution_halves(self, arch, stem_and_size):
    check_block_shapes(self, arch, stem_and_size)

  def test_width_multiplier_scales_channels(self):
    shapes, count = _shapes_and_count('resnet18', 'cifar', 32, 10, width=0.25)
    self.assertEqual(shapes[-1][0][-1], 128)  # 512 * 0.25
    self.assertLess(count, 11_173_962 / 10)

  def test_unknown_names_are_usage_errors(self):
    with self.assertRaisesRegex(UsageError, 'unknown architecture'):
      bw.build_model('alexnet', num_classes=10)
    with self.assertRaisesRegex(UsageError, 'unknown auxiliary head'):
      bw.build_model('vgg11', num_classes=10, aux_head='hebbian')
    with self.assertRaisesRegex(UsageError, 'unknown mode'):
      bw.build_model('vgg11', num_classes=10, mode='forward_forward')
    with self.assertRaisesRegex(UsageError, 'unknown stem'):
      bw.build_model('resnet18', num_classes=10, stem='patchify')


class SmallMapConvolutionTest(parameterized.TestCase):
  """The CPU im2col path for maps smaller than the kernel matches lax.conv exactly enough.

  It is the path where oneDNN is not built, so these tests turn oneDNN off.
  """

  def setUp(self):
    super().setUp()
    self.enter_context(mock.patch.object(layers, '_onednn_applies', return_value=False))

  @parameterized.parameters((1, 1), (2, 2), (2, 1))
  def test_values_and_gradients_match_lax(self, height, width):
    key_x, key_w = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (3, height, width, 5))
    w = jax.random.normal(key_w, (3, 3, 5, 7))
    padding = ((1, 1), (1, 1))
    numbers = lax.conv_dimension_numbers(x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC'))
    ours = lambda x, w: jnp.sum(jnp.sin(layers.conv_general_dilated(
        x, w, (1, 1), padding, dimension_numbers=numbers)))
    reference = lambda x, w: jnp.sum(jnp.sin(lax.conv_general_dilated(
        x, w, (1, 1), padding, dimension_numbers=numbers)))
    chex.assert_trees_all_close(jax.jit(jax.value_and_grad(ours, (0, 1)))(x, w),
                                jax.jit(jax.value_and_grad(reference, (0, 1)))(x, w),
                                rtol=1e-5, atol=1e-5)

  def test_accelerators_keep_the_plain_convolution(self):
    conv = layers.conv(8, 3, use_bias=False, dtype=jnp.float32)
    x = jnp.zeros((2, 2, 2, 4))
    variables = conv.init(jax.random.key(0), x)
    lowered = {platform: jax.jit(conv.apply).trace(variables, x).lower(
        lowering_platforms=(platform,)).as_text() for platform in ('cpu', 'cuda', 'tpu')}
    self.assertNotIn('convolution', lowered['cpu'])
    self.assertIn('dot_general', lowered['cpu'])
    for platform in ('cuda', 'tpu'):
      self.assertIn('convolution', lowered[platform])
      self.assertNotIn('dot_general', lowered[platform])


class MaxPoolTest(parameterized.TestCase):
  """The CPU max-pool (max of the four strided sub-grids) is nn.max_pool in values and gradients."""

  @parameterized.parameters((4, 6), (5, 7), (2, 2))
  def test_values_and_gradients_match_flax(self, height, width):
    x = jax.random.normal(jax.random.key(0), (3, height, width, 4))  # No ties.
    ours = lambda x: jnp.sum(jnp.sin(layers.max_pool_2x2(x)))
    reference = lambda x: jnp.sum(jnp.sin(nn.max_pool(x, (2, 2), strides=(2, 2))))
    chex.assert_trees_all_close(jax.jit(jax.value_and_grad(ours))(x),
                                jax.jit(jax.value_and_grad(reference))(x), rtol=1e-6, atol=1e-6)

  def test_tied_zeros_behind_relu_get_the_same_gradient(self):
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))  # About a quarter of windows all <= 0.
    ours = lambda x: jnp.sum(jnp.cos(layers.max_pool_2x2(nn.relu(x))))
    reference = lambda x: jnp.sum(jnp.cos(nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))))
    chex.assert_trees_all_close(jax.grad(ours)(x), jax.grad(reference)(x), rtol=1e-6, atol=1e-6)

  def test_accelerators_keep_reduce_window(self):
    lowered = {platform: jax.jit(layers.max_pool_2x2).trace(jnp.zeros((2, 4, 4, 3))).lower(
        lowering_platforms=(platform,)).as_text() for platform in ('cpu', 'cuda', 'tpu')}
    self.assertNotIn('reduce_window', lowered['cpu'])
    for platform in ('cuda', 'tpu'):
      self.assertIn('reduce_window', lowered[platform])


if __name__ == '__main__':
  from absl.testing import absltest
  absltest.main()
