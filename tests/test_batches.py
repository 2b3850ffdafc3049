"""Batches: reproducible order and augmentation, resume, process slices, eval padding, prefetch."""

import itertools
import threading
import time

import numpy as np
import pytest

from bwbpf_jax import data
from bwbpf_jax.errors import UsageError

NUM_EXAMPLES = 100
IMAGE_SIZE = 16  # Pad 2 for the crop.


@pytest.fixture
def dataset():
  """Random images whose label is their index, so a batch's labels say which examples it holds."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (NUM_EXAMPLES, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  labels = np.arange(NUM_EXAMPLES, dtype=np.int32)
  mean, std = data.normalization_stats(images)
  return images, labels, mean, std


def _train(dataset, **kwargs):
  images, labels, mean, std = dataset
  arguments = dict(batch_size=8, seed=3, epoch=0, mean=mean, std=std)
  arguments.update(kwargs)
  return list(data.train_batches(images, labels, **arguments))


def _assert_batches_equal(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_steps_per_epoch():
  assert data.steps_per_epoch(100, 8) == 12
  assert data.steps_per_epoch(96, 8) == 12
  assert data.steps_per_epoch(7, 8) == 0
  with pytest.raises(UsageError):
    data.steps_per_epoch(100, 0)


def test_train_batches_shapes_and_dtypes(dataset):
  batches = _train(dataset)
  assert len(batches) == 12  # 100 // 8; the incomplete last batch is dropped.
  for batch in batches:
    assert batch.keys() == {'image', 'label'}
    assert batch['image'].shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch['image'].dtype == np.float32
    assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32


def test_epoch_sees_distinct_examples(dataset):
  labels = np.concatenate([batch['label'] for batch in _train(dataset)])
  assert len(np.unique(labels)) == len(labels) == 96


def test_same_seed_and_epoch_give_identical_batches(dataset):
  _assert_batches_equal(_train(dataset), _train(dataset))


def test_other_epoch_or_seed_gives_another_order(dataset):
  order = np.concatenate([batch['label'] for batch in _train(dataset)])
  for kwargs in ({'epoch': 1}, {'seed': 4}):
    other = np.concatenate([batch['label'] for batch in _train(dataset, **kwargs)])
    assert not np.array_equal(order, other)


def test_start_step_resumes_exactly(dataset):
  _assert_batches_equal(_train(dataset, start_step=5), _train(dataset)[5:])
  assert _train(dataset, start_step=12) == []


@pytest.mark.parametrize('augment', [False, 'none'])
def test_without_augmentation_images_are_normalised_originals(dataset, augment):
  images, _, mean, std = dataset
  for batch in _train(dataset, augment=augment):
    np.testing.assert_array_equal(batch['image'], data.normalize(images[batch['label']], mean, std))


def test_augmented_images_are_crops_or_flips_of_their_source(dataset):
  images, _, mean, std = dataset
  pad = IMAGE_SIZE // 8
  offsets = np.array(list(itertools.product(range(2 * pad + 1), repeat=2)))
  seen_offsets, seen_flips = set(), set()
  for batch in _train(dataset)[:4]:
    for image, label in zip(batch['image'], batch['label']):
      # Every crop and flip of the source; exactly one should be this image.
      candidates = {}
      for flip in (False, True):
        variants = data.crop_and_flip(np.repeat(images[label][None], len(offsets), 0), offsets,
                                      np.full(len(offsets), flip), pad)
        for offset, variant in zip(offsets, data.normalize(variants, mean, std)):
          if np.array_equal(variant, image):
            candidates[tuple(offset), flip] = True
      assert candidates, f'example {label} is no crop or flip of its source'
      for offset, flip in candidates:
        seen_offsets.add(offset)
        seen_flips.add(flip)
  # Over 32 images both flips and many offsets occur (a fixed seed, so no flakiness).
  assert seen_flips == {False, True} and len(seen_offsets) > 10


@pytest.mark.parametrize('process_count', [2, 4])
@pytest.mark.parametrize('augment', [False, True])
def test_process_slices_make_up_the_global_batch(dataset, process_count, augment):
  global_batches = _train(dataset, augment=augment)
  per_process = [_train(dataset, augment=augment, process_index=index,
                        process_count=process_count) for index in range(process_count)]
  for step, global_batch in enumerate(global_batches):
    for key in ('image', 'label'):
      slices = [batches[step][key] for batches in per_process]
      assert all(len(part) == 8 // process_count for part in slices)
      np.testing.assert_array_equal(np.concatenate(slices), global_batch[key])


@pytest.mark.parametrize('kwargs, message', [
    ({'batch_size': 6, 'process_count': 4}, 'not divisible'),
    ({'process_index': 2, 'process_count': 2}, 'process_index'),
    ({'batch_size': 101}, 'larger than'),
    ({'batch_size': 0}, 'positive'),
    ({'start_step': 13}, 'start_step'),
    ({'start_step': -1}, 'start_step'),
    ({'seed': -1}, 'seed'),
    ({'mean': [0.5], 'std': [0.2]}, 'one value per channel'),
    ({'std': [0.2, 0.0, 0.2]}, 'positive'),
])
def test_train_batches_usage_errors(dataset, kwargs, message):
  with pytest.raises(UsageError, match=message):
    _train(dataset, **kwargs)


def test_wrong_image_dtype(dataset):
  images, labels, mean, std = dataset
  with pytest.raises(UsageError, match='uint8'):
    data.train_batches(images.astype(np.float32), labels, batch_size=8, seed=0, epoch=0,
                       mean=mean, std=std)


def test_normalization_stats_exact(dataset):
  images = dataset[0]
  mean, std = data.normalization_stats(images)
  assert mean.dtype == std.dtype == np.float32 and mean.shape == std.shape == (3,)
  scaled = images.astype(np.float64) / 255.0
  np.testing.assert_allclose(mean, scaled.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(std, scaled.std(axis=(0, 1, 2)), rtol=1e-5)


def test_constant_channel_gets_unit_std():
  images = np.zeros((2, 4, 4, 2), np.uint8)
  images[..., 1] = np.arange(4)
  mean, std = data.normalization_stats(images)
  assert std[0] == 1.0 and mean[0] == 0.0 and std[1] < 1.0


def test_normalised_batches_have_zero_mean_unit_std(dataset):
  # batch_size 20 divides 100: the epoch covers the whole training set.
  images = np.concatenate([batch['image'] for batch in _train(dataset, batch_size=20,
                                                               augment=False)])
  assert images.shape[0] == NUM_EXAMPLES
  np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(images.std(axis=(0, 1, 2)), 1.0, atol=1e-5)


def test_crop_only_crops_as_crop_flip_does_and_never_flips(dataset):
  images, _, mean, std = dataset
  pad = IMAGE_SIZE // 8
  offsets = np.array(list(itertools.product(range(2 * pad + 1), repeat=2)))
  cropped, crop_flipped = _train(dataset, augment='crop')[:4], _train(dataset)[:4]
  same = 0
  for crop_batch, crop_flip_batch in zip(cropped, crop_flipped):
    for image, label in zip(crop_batch['image'], crop_batch['label']):
      crops = data.crop_and_flip(np.repeat(images[label][None], len(offsets), 0), offsets,
                                 np.zeros(len(offsets), bool), pad)
      assert any(np.array_equal(crop, image) for crop in data.normalize(crops, mean, std)), (
          f'example {label} is no unflipped crop of its source')
    same += np.all(crop_batch['image'] == crop_flip_batch['image'], axis=(1, 2, 3)).sum()
  # The same crops: only crop_flip's flipped images differ (about half of 32).
  assert 0 < same < 32


def test_unknown_augmentation_is_refused(dataset):
  with pytest.raises(UsageError, match='augment must be one of crop_flip, crop, none'):
    _train(dataset, augment='flip')


def test_crop_and_flip_exact():
  rng = np.random.default_rng(1)
  images = rng.integers(1, 256, (5, 6, 7, 2), dtype=np.uint8)  # No zeros: padding is visible.
  pad = 2
  centre = np.full((5, 2), pad)
  no_flip, all_flip = np.zeros(5, bool), np.ones(5, bool)
  np.testing.assert_array_equal(data.crop_and_flip(images, centre, no_flip, pad), images)
  np.testing.assert_array_equal(data.crop_and_flip(images, centre, all_flip, pad),
                                images[:, :, ::-1])
  # The top-left crop shifts the image down and right by pad, with zeros above and left.
  shifted = data.crop_and_flip(images, np.zeros((5, 2), int), no_flip, pad)
  np.testing.assert_array_equal(shifted[:, pad:, pad:], images[:, :-pad, :-pad])
  assert not shifted[:, :pad].any() and not shifted[:, :, :pad].any()
  # Random offsets and flips against a per-image reference.
  offsets = rng.integers(0, 2 * pad + 1, (5, 2))
  flips = rng.random(5) < 0.5
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  expected = [padded[i, row:row + 6, column:column + 7] for i, (row, column) in enumerate(offsets)]
  expected = np.stack([image[:, ::-1] if flip else image for image, flip in zip(expected, flips)])
  result = data.crop_and_flip(images, offsets, flips, pad)
  assert result.shape == images.shape and result.dtype == np.uint8
  np.testing.assert_array_equal(result, expected)


def _eval(dataset, num_examples=10, **kwargs):
  images, labels, mean, std = dataset
  arguments = dict(batch_size=4, mean=mean, std=std)
  arguments.update(kwargs)
  return list(data.eval_batches(images[:num_examples], labels[:num_examples], **arguments))


def test_eval_batches_pad_the_last_batch(dataset):
  images, _, mean, std = dataset
  batches = _eval(dataset)
  assert len(batches) == 3
  for batch in batches:
    assert batch.keys() == {'image', 'label', 'mask'}
    assert batch['image'].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch['image'].dtype == np.float32 and batch['mask'].dtype == np.float32
    assert batch['label'].dtype == np.int32
  np.testing.assert_array_equal(np.concatenate([batch['mask'] for batch in batches]),
                                [1] * 10 + [0] * 2)
  # Every example exactly once, in order, and unaugmented.
  real = [(batch['image'][i], batch['label'][i]) for batch in batches
          for i in range(4) if batch['mask'][i]]
  np.testing.assert_array_equal([label for _, label in real], np.arange(10))
  np.testing.assert_array_equal(np.stack([image for image, _ in real]),
                                data.normalize(images[:10], mean, std))
  assert not batches[-1]['image'][2:].any() and not batches[-1]['label'][2:].any()


def test_eval_batches_exact_fit_still_have_mask(dataset):
  batches = _eval(dataset, num_examples=8)
  assert len(batches) == 2 and all(batch['mask'].all() for batch in batches)


@pytest.mark.parametrize('process_count', [2, 4])
def test_eval_process_slices(dataset, process_count):
  global_batches = _eval(dataset)
  per_process = [_eval(dataset, process_index=index, process_count=process_count)
                 for index in range(process_count)]
  assert all(len(batches) == len(global_batches) for batches in per_process)
  for step, global_batch in enumerate(global_batches):
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(
          np.concatenate([batches[step][key] for batches in per_process]), global_batch[key])


def test_eval_batch_size_must_divide_by_processes(dataset):
  with pytest.raises(UsageError, match='not divisible'):
    _eval(dataset, batch_size=6, process_count=4)


def test_prefetch_keeps_order_and_applies_put():
  assert list(data.prefetch(range(20), size=3)) == list(range(20))
  assert list(data.prefetch(range(5), put=lambda x: x * 10)) == [0, 10, 20, 30, 40]
  assert list(data.prefetch([])) == []


def test_prefetch_reraises_producer_errors():

  def failing():
    yield from range(3)
    raise RuntimeError('disk on fire')

  batches = data.prefetch(failing())
  assert [next(batches) for _ in range(3)] == [0, 1, 2]
  with pytest.raises(RuntimeError, match='disk on fire'):
    next(batches)
  assert list(batches) == []  # Finished for good.


def test_prefetch_reraises_put_errors():

  def put(item):
    if item == 2:
      raise ValueError('bad batch')
    return item

  with pytest.raises(ValueError, match='bad batch'):
    list(data.prefetch(range(5), put=put))


def test_prefetch_is_bounded_and_closes():
  produced = []

  def endless():
    for i in itertools.count():
      produced.append(i)
      yield i

  with data.prefetch(endless(), size=2) as batches:
    assert next(batches) == 0
    time.sleep(0.3)
    # One handed over, two queued, one waiting for room: the producer runs no further.
    assert len(produced) <= 4
    thread = batches._thread
  thread.join(timeout=2)
  assert not thread.is_alive()
  assert list(batches) == []


def test_prefetch_close_waits_for_the_item_in_flight():
  # A daemon thread still inside put (jax.device_put) at interpreter exit aborts the
  # process, so close() must return only once the producer has left put.
  in_put, leaving_put = threading.Event(), []

  def slow_put(item):
    in_put.set()
    time.sleep(0.5)
    leaving_put.append(item)
    return item

  batches = data.prefetch(itertools.count(), size=1, put=slow_put)
  assert in_put.wait(timeout=5)
  batches.close()
  assert leaving_put
  assert not batches._thread.is_alive()


def test_prefetch_thread_is_a_daemon():
  batches = data.prefetch(itertools.count())
  assert batches._thread.daemon
  batches.close()


def test_prefetch_size_must_be_positive():
  with pytest.raises(UsageError, match='size'):
    data.prefetch(range(3), size=0)
