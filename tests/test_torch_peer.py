"""The PyTorch peer (benchmarks/torch_peer.py) builds the same network as bwbpf_jax.

Skipped where torch is not installed (it is a benchmark-only dependency).
"""

from absl.testing import parameterized
import optax

import bwbpf_jax as bw
from bwbpf_jax import state as state_lib

torch = __import__('pytest').importorskip('torch')
from benchmarks import torch_peer  # pylint: disable=g-import-not-at-top,wrong-import-position


def _jax_block_param_counts(arch, width, num_blocks, num_classes=10):
  model = bw.build_model(arch, num_classes=num_classes, num_blocks=num_blocks, width=width)
  states = bw.abstract_block_states(model, optax.sgd(0.1), (32, 32, 3))
  return model.split_points, [state_lib.count_params(s.params) for s in states]


def _torch_block_param_counts(peer):
  return [sum(p.numel() for p in block.parameters()) for block in peer.blocks]


class StructureTest(parameterized.TestCase):

  @parameterized.product(arch=('vgg11', 'resnet18', 'resnet50'), num_blocks=(1, 3, 4))
  def test_same_split_points_and_parameters_per_block(self, arch, num_blocks):
    split_points, counts = _jax_block_param_counts(arch, 0.25, num_blocks)
    peer = torch_peer.Peer(arch, num_classes=10, num_blocks=num_blocks, width=0.25)
    self.assertEqual(peer.split_points, split_points)
    self.assertEqual(_torch_block_param_counts(peer), counts)

  def test_same_output_shapes(self):
    peer = torch_peer.Peer('vgg11', num_classes=7, num_blocks=4, width=0.25)
    x = torch.zeros(2, 3, 32, 32)
    for block in peer.blocks:
      x, logits = block(x)
      self.assertEqual(tuple(logits.shape), (2, 7))
    self.assertEqual(tuple(x.shape), (2, 128, 1, 1))


class DetachTest(parameterized.TestCase):

  def _block0_grads_from_block1_loss(self, mode):
    torch.manual_seed(0)
    peer = torch_peer.Peer('vgg11', num_classes=10, num_blocks=3, mode=mode, width=0.25)
    losses = peer.losses(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    losses[1].backward()
    return [p.grad for p in peer.blocks[0].units.parameters()]

  def test_bwbpf_later_loss_does_not_reach_earlier_block(self):
    # Block 0's head never sees block 1's loss in any mode; its units do unless detached.
    self.assertTrue(all(g is None for g in self._block0_grads_from_block1_loss('bwbpf')))

  def test_deep_supervision_later_loss_reaches_earlier_block(self):
    grads = self._block0_grads_from_block1_loss('deep_supervision')
    self.assertTrue(all(g is not None for g in grads))
    self.assertGreater(sum(float(g.abs().sum()) for g in grads), 0.0)

  def test_bp_aux_heads_are_probes(self):
    # An auxiliary head's loss trains its head only, not the backbone.
    peer = torch_peer.Peer('vgg11', num_classes=10, num_blocks=3, mode='bp', width=0.25)
    losses = peer.losses(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    losses[1].backward()
    self.assertTrue(all(p.grad is None for p in peer.blocks[0].parameters()))
    self.assertTrue(all(p.grad is None for p in peer.blocks[1].units.parameters()))
    self.assertTrue(all(p.grad is not None for p in peer.blocks[1].head.parameters()))

  def test_bwbpf_step_changes_every_block(self):
    torch.manual_seed(0)
    peer = torch_peer.Peer('resnet18', num_classes=10, num_blocks=2, width=0.25)
    before = [[p.detach().clone() for p in b.parameters()] for b in peer.blocks]
    torch_peer.train_step(peer, torch_peer.make_optimizers(peer),
                          torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    for block, old in zip(peer.blocks, before):
      self.assertTrue(any(not torch.equal(p, q) for p, q in zip(block.parameters(), old)))


class BwbpfProgramsTest(parameterized.TestCase):
  """The per-block loop and the single backward over summed detached losses: one update."""

  def _after_two_steps(self, bwbpf_step, channels_last):
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    peer = torch_peer.Peer('resnet18', num_classes=10, num_blocks=3, width=0.125).to(
        memory_format=memory_format)
    optimizers = torch_peer.make_optimizers(peer)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
      images = torch.randn(8, 3, 16, 16, generator=generator).contiguous(
          memory_format=memory_format)
      labels = torch.randint(0, 10, (8,), generator=generator)
      losses = torch_peer.train_step(peer, optimizers, images, labels, bwbpf_step)
    return torch.stack(losses), peer.state_dict()

  @parameterized.parameters(('summed', True), ('summed', False), ('per_block', False))
  def test_same_update_as_the_reference_loop(self, bwbpf_step, channels_last):
    reference_losses, reference = self._after_two_steps('per_block', True)
    losses, state = self._after_two_steps(bwbpf_step, channels_last)
    torch.testing.assert_close(losses, reference_losses, rtol=1e-5, atol=1e-6)
    for name, value in reference.items():
      torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-6, msg=name)

  @parameterized.parameters(*torch_peer.BWBPF_STEPS)
  def test_a_few_steps_on_one_batch_lower_every_loss(self, bwbpf_step):
    torch.manual_seed(0)
    peer = torch_peer.Peer('vgg11', num_classes=10, num_blocks=3, width=0.125)
    optimizers = torch_peer.make_optimizers(peer, learning_rate=0.05)
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    first = torch.stack(torch_peer.train_step(peer, optimizers, images, labels, bwbpf_step))
    for _ in range(10):
      last = torch.stack(torch_peer.train_step(peer, optimizers, images, labels, bwbpf_step))
    self.assertTrue(bool(torch.all(last < first)), f'{first} -> {last}')


class MeasureTest(parameterized.TestCase):

  @parameterized.parameters('bwbpf', 'deep_supervision', 'bp')
  def test_returns_the_bench_fields(self, mode):
    result = torch_peer.measure(mode, arch='vgg11', width=0.125, batch_size=4, image_size=32,
                                num_classes=10, num_blocks=3, steps=1)
    self.assertEqual(result['framework'], 'torch')
    # The default bwbpf program is one backward over the summed losses (the fastest measured).
    self.assertEqual(result['step'], 'fused')
    self.assertEqual(result['bwbpf_step'], 'summed' if mode == 'bwbpf' else None)
    self.assertGreater(result['images_per_sec'], 0)
    self.assertIsInstance(result['step_memory_bytes'], int)
    self.assertIn('device', result)
