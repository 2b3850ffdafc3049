"""bwbpf_jax: block-wise, backprop-free training of deep networks in JAX/Flax.

A network is cut into K blocks; each block learns from its own auxiliary head
and no gradient crosses a block boundary (Cheng et al., ICASSP 2024). The same
code also trains with deep supervision (the reference implementation's
behaviour) and with plain backprop, for honest comparisons.

    model = bwbpf_jax.build_model('vgg16', num_classes=10, num_blocks=4)
    # or a network of one's own: bwbpf_jax.build_model(bwbpf_jax.Network(units=...), ...)
    tx = bwbpf_jax.make_optimizer('sgd', learning_rate=0.1, total_steps=10_000)
    states = bwbpf_jax.init_block_states(model, tx, jax.random.key(0), (32, 32, 3))
    train_step = bwbpf_jax.make_train_step(model, tx)
    states, metrics = train_step(states, {'image': images, 'label': labels})

Sub-packages are attributes too: `bwbpf_jax.data` (datasets, batches),
`bwbpf_jax.cost` (FLOPs, activation memory), `bwbpf_jax.parallel` (meshes,
data and block parallelism), `bwbpf_jax.checkpoint` (orbax save/restore).
Blocks are numbered 1..K in messages and docstrings, as on the command line;
Python lists of blocks are indexed from 0 (block k is `model.blocks[k - 1]`).
"""

from bwbpf_jax.errors import UsageError
from bwbpf_jax.network import Network
from bwbpf_jax.models import ARCHITECTURES, HEADS
from bwbpf_jax.models.heads import LinearHead, pool_features
from bwbpf_jax.optimizers import OPTIMIZERS, make_optimizer
from bwbpf_jax.cost import (activation_balanced_split_points, aux_flop_fractions, flop_counts,
                            unit_activation_bytes)
from bwbpf_jax.partition import (LOSSES, MODES, PartitionedModel, build_model,
                                 default_split_points)
from bwbpf_jax.state import (BlockState, abstract_block_states, backbone_param_count,
                             init_block_states)
from bwbpf_jax.step import (eval_step, make_blockwise_train_step, make_eval_step,
                            make_train_step, train_step)
# Sub-packages, reachable as bwbpf_jax.data etc. without importing them by name.
from bwbpf_jax import checkpoint, cost, data, parallel  # pylint: disable=g-bad-import-order
