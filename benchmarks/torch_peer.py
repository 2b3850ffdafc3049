"""The PyTorch peer of bwbpf_jax's train step, for `benchmarks.bench --compare_torch`.

Same network as `bwbpf_jax.build_model`: VGG with BatchNorm and conv bias, or a
ResNet (basic or bottleneck units, CIFAR or ImageNet stem), the same width
multiplier (`layers.scaled`), the same split points (`default_split_points` on
the architecture's stages) and the same heads (global average pool + linear).
Every block has its own SGD optimizer (momentum 0.9, weight decay 5e-4), as the
reference code's `optimizer_1..K`. The modes:

  bwbpf             each block's input is detached. Two programs of the same update
                    (`BWBPF_STEPS`): 'per_block', the reference's loop (block k's
                    loss backpropagated and block k stepped before block k+1 runs, so
                    one block's graph is alive at a time), and 'summed' (every block
                    forward, one backward over the sum of the detached losses, then
                    every block's step), the plain PyTorch program of it.
  deep_supervision  nothing detached; the sum of all heads' losses, one backward.
  bp                the output loss trains the backbone; the auxiliary heads are
                    probes on detached features (their losses added to the sum).

torch is a benchmark-only dependency (`pip install torch==2.13.0`); only this
module and tests/test_torch_peer.py import it. From bwbpf_jax it uses only the
pure-Python parts (architecture tables, split points, width scaling).
"""

import os

import torch
from torch import nn
import torch.nn.functional as F

from benchmarks import harness
from bwbpf_jax import partition
from bwbpf_jax.models import layers
from bwbpf_jax.models import resnet
from bwbpf_jax.models import vgg

BN_MOMENTUM = 0.1  # PyTorch's convention; 0.9 in Flax's.
BN_EPSILON = 1e-5


def _conv(in_features, out_features, kernel, stride=1, bias=False):
  conv = nn.Conv2d(in_features, out_features, kernel, stride, padding=kernel // 2, bias=bias)
  nn.init.kaiming_normal_(conv.weight, mode='fan_out', nonlinearity='relu')
  if bias:
    nn.init.zeros_(conv.bias)
  return conv


def _bn(features):
  return nn.BatchNorm2d(features, eps=BN_EPSILON, momentum=BN_MOMENTUM)


class ConvUnit(nn.Module):
  """3x3 conv (with bias) -> BN -> ReLU [-> 2x2 max-pool], as `vgg.ConvUnit`."""

  def __init__(self, in_features, features, pool):
    super().__init__()
    self.conv, self.bn, self.pool = _conv(in_features, features, 3, bias=True), _bn(features), pool

  def forward(self, x):
    x = F.relu(self.bn(self.conv(x)))
    if self.pool and x.shape[-2] > 1:
      x = F.max_pool2d(x, 2, 2)
    return x


class Stem(nn.Module):
  """As `resnet.Stem`: 3x3 conv-BN-ReLU ('cifar') or 7x7/2 conv-BN-ReLU + 3x3/2 max-pool."""

  def __init__(self, features, kind):
    super().__init__()
    self.kind = kind
    self.conv = _conv(3, features, 3 if kind == 'cifar' else 7, 1 if kind == 'cifar' else 2)
    self.bn = _bn(features)

  def forward(self, x):
    x = F.relu(self.bn(self.conv(x)))
    return x if self.kind == 'cifar' else F.max_pool2d(x, 3, 2, padding=1)


class ResidualUnit(nn.Module):
  """As `resnet.ResidualUnit`: basic or bottleneck (stride on the 3x3), projection shortcut."""

  def __init__(self, in_features, features, stride, bottleneck):
    super().__init__()
    if bottleneck:
      self.out_features = 4 * features
      self.convs = nn.ModuleList([_conv(in_features, features, 1),
                                  _conv(features, features, 3, stride),
                                  _conv(features, self.out_features, 1)])
    else:
      self.out_features = features
      self.convs = nn.ModuleList([_conv(in_features, features, 3, stride),
                                  _conv(features, features, 3)])
    self.bns = nn.ModuleList([_bn(c.out_channels) for c in self.convs])
    self.shortcut = None
    if stride != 1 or in_features != self.out_features:
      self.shortcut = nn.Sequential(_conv(in_features, self.out_features, 1, stride),
                                    _bn(self.out_features))

  def forward(self, x):
    y = x
    for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
      y = bn(conv(y))
      if i < len(self.convs) - 1:
        y = F.relu(y)
    shortcut = x if self.shortcut is None else self.shortcut(x)
    return F.relu(shortcut + y)


class LinearHead(nn.Module):
  """[B, C, H, W] -> global average pool -> linear logits [B, num_classes]."""

  def __init__(self, in_features, num_classes):
    super().__init__()
    self.dense = nn.Linear(in_features, num_classes)

  def forward(self, x):
    return self.dense(x.mean(dim=(2, 3)))


class Block(nn.Module):
  """Units of one block and its head; `forward` returns (features, logits)."""

  def __init__(self, units, head, stem=None):
    super().__init__()
    self.stem, self.units, self.head = stem, nn.Sequential(*units), head

  def forward(self, x, detach_head_input=False):
    if self.stem is not None:
      x = self.stem(x)
    x = self.units(x)
    return x, self.head(x.detach() if detach_head_input else x)


def architecture_units(arch, width=1.0, stem='cifar'):
  """(stem or None, units, stage_of_unit) as torch modules, mirroring models.architecture_units."""
  units, stages = [], []
  if arch in vgg.CONVS_PER_STAGE:
    in_features = 3
    for stage, (channels, count) in enumerate(zip(vgg.STAGE_CHANNELS,
                                                  vgg.CONVS_PER_STAGE[arch])):
      for i in range(count):
        features = layers.scaled(channels, width)
        units.append(ConvUnit(in_features, features, pool=(i == count - 1)))
        stages.append(stage)
        in_features = features
    return None, units, stages
  if arch in resnet.UNITS_PER_STAGE:
    stem_module = Stem(layers.scaled(resnet.STAGE_CHANNELS[0], width), stem)
    in_features = stem_module.conv.out_channels
    for stage, (channels, count) in enumerate(zip(resnet.STAGE_CHANNELS,
                                                  resnet.UNITS_PER_STAGE[arch])):
      for i in range(count):
        stride = 2 if (stage > 0 and i == 0) else 1
        unit = ResidualUnit(in_features, layers.scaled(channels, width), stride,
                            resnet.BOTTLENECK[arch])
        units.append(unit)
        stages.append(stage)
        in_features = unit.out_features
    return stem_module, units, stages
  raise ValueError(f'unknown architecture {arch!r}')


def _out_features(unit):
  return unit.out_features if isinstance(unit, ResidualUnit) else unit.conv.out_channels


class Peer(nn.Module):
  """A network cut into blocks for one training mode, as `partition.build_model`."""

  def __init__(self, arch, *, num_classes, num_blocks=4, mode='bwbpf', width=1.0,
               stem='cifar'):
    super().__init__()
    if mode not in partition.MODES:
      raise ValueError(f'unknown mode {mode!r}')
    stem_module, units, stages = architecture_units(arch, width, stem)
    self.mode = mode
    self.split_points = partition.default_split_points(tuple(stages), num_blocks)
    bounds = (0,) + self.split_points + (len(units),)
    self.blocks = nn.ModuleList([
        Block(units[start:end], LinearHead(_out_features(units[end - 1]), num_classes),
              stem_module if k == 0 else None)
        for k, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]))])

  def losses(self, images, labels):
    """Every head's cross-entropy, with this mode's detaches; a list of K scalars."""
    x, losses = images, []
    for k, block in enumerate(self.blocks):
      if self.mode == 'bwbpf':
        x = x.detach()
      probe = self.mode == 'bp' and k < len(self.blocks) - 1
      x, logits = block(x, detach_head_input=probe)
      losses.append(F.cross_entropy(logits, labels))
    return losses


def make_optimizers(peer, learning_rate=0.01, momentum=0.9, weight_decay=5e-4):
  """One SGD per block, as the reference code (coupled weight decay, as optimizers.make_optimizer)."""
  return [torch.optim.SGD(block.parameters(), lr=learning_rate, momentum=momentum,
                          weight_decay=weight_decay) for block in peer.blocks]


BWBPF_STEPS = ('per_block', 'summed')
# The fastest faithful program on the CPU it was measured on (docs/results.md, "JAX against
# PyTorch"): the benchmark's default peer.
DEFAULT_BWBPF_STEP = 'summed'
DEFAULT_CHANNELS_LAST = True


def train_step(peer, optimizers, images, labels, bwbpf_step=DEFAULT_BWBPF_STEP):
  """One training step of `peer.mode`; returns the K losses (detached tensors).

  `bwbpf_step` picks the bwbpf program (`BWBPF_STEPS`); both compute the same update.
  """
  if bwbpf_step not in BWBPF_STEPS:
    raise ValueError(f'unknown bwbpf step {bwbpf_step!r}; choose one of {BWBPF_STEPS}')
  if peer.mode == 'bwbpf' and bwbpf_step == 'per_block':
    # Block by block: backward and step block k before block k+1 runs, so block
    # k's graph is freed first. The next block reads the detached features,
    # computed before the step, exactly as the fused JAX step sees them.
    x, losses = images, []
    for block, optimizer in zip(peer.blocks, optimizers):
      features, logits = block(x.detach())
      loss = F.cross_entropy(logits, labels)
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      optimizer.step()
      losses.append(loss.detach())
      x = features
    return losses
  losses = peer.losses(images, labels)
  for optimizer in optimizers:
    optimizer.zero_grad(set_to_none=True)
  torch.stack(losses).sum().backward()
  for optimizer in optimizers:
    optimizer.step()
  return [loss.detach() for loss in losses]


def _synchronize(device):
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


def measure(mode, *, arch, width, batch_size, image_size, num_classes, num_blocks, steps,
            stem='cifar', channels_last=DEFAULT_CHANNELS_LAST, bwbpf_step=DEFAULT_BWBPF_STEP,
            seed=0) -> dict:
  """Times `steps` train steps of the peer after two warm-up steps.

  Returns a dict like benchmarks.bench's JAX worker: framework, step
  ('blockwise' for bwbpf's per-block loop, whose blocks run backward one at a
  time, else 'fused'), bwbpf_step and channels_last (which program ran),
  images_per_sec (batch / median step time), cpu_seconds_per_step (process CPU
  time over the timed steps, user + system; steadier than wall time on a shared
  CPU), step_memory_bytes (CUDA: peak allocated during the timed steps; CPU: -1,
  PyTorch keeps no account of CPU allocations, compare peak_rss_bytes instead),
  device and platform.
  """
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(seed)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  peer = Peer(arch, num_classes=num_classes, num_blocks=num_blocks, mode=mode, width=width,
              stem=stem).to(device=device, memory_format=memory_format)
  peer.train()
  optimizers = make_optimizers(peer)
  images = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(
      memory_format=memory_format)
  labels = torch.randint(0, num_classes, (batch_size,), device=device)
  run = lambda _: train_step(peer, optimizers, images, labels, bwbpf_step)
  wait = lambda _: _synchronize(device)
  # Warm-up: oneDNN primitive creation, allocator caches.
  harness.time_steps(run, None, steps=1, warmup=1, block=wait)
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)
  timing, _ = harness.time_steps(run, None, steps=steps, warmup=0, block=wait)
  memory = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else -1
  blockwise = mode == 'bwbpf' and bwbpf_step == 'per_block'
  return {'framework': 'torch', 'step': 'blockwise' if blockwise else 'fused',
          'bwbpf_step': bwbpf_step if mode == 'bwbpf' else None,
          'images_per_sec': timing.per_second(batch_size),
          'cpu_seconds_per_step': timing.cpu_seconds_per_call,
          'step_memory_bytes': int(memory), 'platform': device.type,
          'device': (torch.cuda.get_device_name(device) if device.type == 'cuda'
                     else f'cpu ({torch.get_num_threads()} threads)'),
          'torch_version': torch.__version__, 'channels_last': channels_last}
