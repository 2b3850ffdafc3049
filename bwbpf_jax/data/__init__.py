"""Data: whole datasets in memory as numpy, and reproducible batches from them.

    dataset = load_dataset('cifar10', data_dir='~/tensorflow_datasets')
    mean, std = normalization_stats(dataset.train_images)
    batches = train_batches(dataset.train_images, dataset.train_labels, batch_size=128,
                            seed=0, epoch=epoch, mean=mean, std=std)
    for batch in prefetch(batches, put=lambda batch: jax.device_put(batch, sharding)):
      ...

Nothing here imports JAX: batches are numpy until `put` moves them.
"""

from bwbpf_jax.data.datasets import DATASET_NAMES, Dataset, load_dataset
from bwbpf_jax.data.batches import (AUGMENTATIONS, Prefetcher, crop_and_flip, eval_batches,
                                    normalization_stats, normalize, prefetch, steps_per_epoch,
                                    train_batches)

__all__ = [
    'AUGMENTATIONS', 'DATASET_NAMES', 'Dataset', 'Prefetcher', 'crop_and_flip', 'eval_batches',
    'load_dataset', 'normalization_stats', 'normalize', 'prefetch', 'steps_per_epoch',
    'train_batches',
]
