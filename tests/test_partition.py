"""Split points: the paper's defaults, explicit points, and impossible requests."""

from absl.testing import parameterized

import bwbpf_jax as bw
from bwbpf_jax import partition
from bwbpf_jax.errors import UsageError


def _block_sizes(arch, num_blocks):
  return partition.block_unit_counts(bw.build_model(arch, num_classes=10,
                                                    num_blocks=num_blocks))


class DefaultSplitTest(parameterized.TestCase):

  @parameterized.parameters(
      # ResNets with K=4 cut at the four stage boundaries.
      ('resnet18', 4, (2, 2, 2, 2)),
      ('resnet50', 4, (3, 4, 6, 3)),
      ('resnet101', 4, (3, 4, 23, 3)),
      ('resnet152', 4, (3, 8, 36, 3)),
      # The reference code's 8-output ResNet-101: the 33 bottlenecks cut 3,4,5,4,5,4,5,3.
      ('resnet101', 8, (3, 4, 5, 4, 5, 4, 5, 3)),
      # VGG cuts at pooling stages, merging stages to balance conv counts.
      ('vgg19', 4, (4, 4, 4, 4)),
      ('vgg19', 5, (2, 2, 4, 4, 4)),
      ('vgg16', 4, (4, 3, 3, 3)),
      ('vgg19', 16, (1,) * 16),
      ('resnet152', 16, (3, 3, 2, 3, 3, 4, 3, 3, 3, 4, 3, 3, 3, 4, 3, 3)),
      # CIFAR ResNets: the stem is unit 0 of stage 0, so 1 + 3n units.
      ('resnet20', 2, (4, 6)),
      ('resnet32', 2, (6, 10)),
      ('resnet32', 4, (3, 3, 5, 5)),
      ('resnet32', 8, (2, 2, 2, 2, 1, 2, 3, 2)),
      ('resnet32', 16, (1,) * 16),  # InfoPro's K=16: the stem alone, then one unit per block.
      ('resnet56', 4, (5, 5, 9, 9)),
      ('resnet110', 4, (10, 9, 18, 18)),
      ('resnet110', 8, (6, 7, 6, 6, 6, 6, 9, 9)),
      ('resnet110', 16, (3, 3, 4, 3, 3, 3, 4, 3, 4, 3, 4, 4, 3, 4, 3, 4)),
  )
  def test_sizes(self, arch, num_blocks, expected):
    self.assertEqual(_block_sizes(arch, num_blocks), expected)

  @parameterized.product(arch=bw.ARCHITECTURES, num_blocks=(1, 2, 4, 8, 12, 16))
  def test_every_unit_in_exactly_one_block_and_stages_kept(self, arch, num_blocks):
    stem, units, stages = bw.models.architecture_units(arch)
    if num_blocks > len(units):
      with self.assertRaisesRegex(UsageError, 'cannot cut'):
        partition.default_split_points(stages, num_blocks)
      return
    points = partition.default_split_points(stages, num_blocks)
    self.assertLen(points, num_blocks - 1)
    self.assertEqual(list(points), sorted(set(points)))
    stage_starts = [i for i in range(1, len(stages)) if stages[i] != stages[i - 1]]
    if num_blocks >= len(set(stages)):
      self.assertContainsSubset(stage_starts, points)  # Never merges two stages.
    else:
      self.assertContainsSubset(points, stage_starts)  # Cuts only at stage boundaries.

  def test_one_block_is_the_whole_network(self):
    model = bw.build_model('resnet50', num_classes=10, num_blocks=1)
    self.assertEqual(model.num_blocks, 1)
    self.assertLen(model.blocks[0].units, 16)
    self.assertIsNotNone(model.blocks[0].stem)


class ExplicitSplitTest(parameterized.TestCase):

  def test_explicit_points_set_num_blocks_and_must_agree_with_it(self):
    model = bw.build_model('resnet18', num_classes=10, split_points=(1, 5))
    self.assertEqual(partition.block_unit_counts(model), (1, 4, 3))
    model = bw.build_model('resnet18', num_classes=10, num_blocks=3, split_points=(1, 5))
    self.assertEqual(model.num_blocks, 3)
    with self.assertRaisesRegex(UsageError, 'split_points=1,5 makes 3 blocks but num_blocks=4'):
      bw.build_model('resnet18', num_classes=10, num_blocks=4, split_points=(1, 5))

  @parameterized.parameters(
      (dict(width=-1), 'width must be positive, got -1'),
      (dict(width=0.0), 'width must be positive, got 0.0'),
      (dict(num_classes=1), 'num_classes must be at least 2, got 1'),
      (dict(num_blocks=0), 'num_blocks must be at least 1, got 0'))
  def test_refuses_what_the_command_line_refuses(self, change, message):
    with self.assertRaisesRegex(UsageError, f'^{message}$'):
      bw.build_model('vgg11', **{'num_classes': 10, **change})

  @parameterized.parameters(((0, 3),), ((3, 3),), ((5, 2),), ((8,),))
  def test_bad_points(self, points):
    with self.assertRaisesRegex(UsageError, 'strictly increasing'):
      bw.build_model('resnet18', num_classes=10, split_points=points)

  def test_too_many_blocks(self):
    with self.assertRaisesRegex(UsageError, 'cannot cut 8 units into 9 blocks'):
      bw.build_model('resnet18', num_classes=10, num_blocks=9)


class ModeWiringTest(parameterized.TestCase):

  @parameterized.parameters(
      ('bwbpf', (True, True, True), (False, False, False)),
      ('deep_supervision', (False, False, False), (False, False, False)),
      ('bp', (False, False, False), (True, True, False)),
  )
  def test_where_gradients_are_cut(self, mode, detach_input, detach_head_input):
    model = bw.build_model('vgg11', num_classes=10, num_blocks=3, mode=mode)
    self.assertEqual(tuple(b.detach_input for b in model.blocks), detach_input)
    self.assertEqual(tuple(b.detach_head_input for b in model.blocks), detach_head_input)

  def test_output_head_is_linear_whatever_the_aux_head(self):
    model = bw.build_model('vgg11', num_classes=10, num_blocks=3, aux_head='mlp')
    self.assertEqual([type(b.head).__name__ for b in model.blocks],
                     ['MLPHead', 'MLPHead', 'LinearHead'])


if __name__ == '__main__':
  from absl.testing import absltest
  absltest.main()
