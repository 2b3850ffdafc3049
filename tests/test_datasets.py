"""Dataset loaders: shapes, dtypes, label order, folder errors and the decode cache."""

import os

import numpy as np
from PIL import Image
import pytest

from bwbpf_jax import data
from bwbpf_jax.data import datasets
from bwbpf_jax.errors import UsageError

# Distinct solid colours, so every decoded image says which file it came from.
# PNG is lossless: solid colours come back exactly, also after a bilinear resize.
COLOURS = {
    ('train', 'cat'): [(200, 10, 10), (190, 20, 20)],
    ('train', 'dog'): [(10, 200, 10), (20, 190, 20), (30, 180, 30)],
    ('test', 'cat'): [(210, 0, 0)],
    ('test', 'dog'): [(0, 210, 0), (0, 220, 0)],
}


def _save(path, colour=(0, 0, 0), size=(8, 8), mode='RGB'):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new(mode, size, colour).save(path)


@pytest.fixture
def folder(tmp_path):
  """An imagefolder tree: 8x8 RGB PNGs, plus one grayscale and one odd-sized image."""
  root = tmp_path / 'images'
  for (split, class_name), colours in COLOURS.items():
    for i, colour in enumerate(colours):
      _save(str(root / split / class_name / f'{i}.png'), colour)
  _save(str(root / 'train' / 'cat' / 'gray.png'), 77, mode='L')
  _save(str(root / 'train' / 'dog' / 'odd.png'), (5, 6, 7), size=(13, 9))
  (root / 'train' / 'dog' / 'notes.txt').write_text('not an image, ignored')
  return root


def _load(root, tmp_path, **kwargs):
  return data.load_dataset('imagefolder', str(root), cache_dir=str(tmp_path / 'cache'), **kwargs)


def _tree(root):
  return sorted((parent, tuple(sorted(folders)), tuple(sorted(files)))
                for parent, folders, files in os.walk(root))


def test_digits_shapes_split_and_classes():
  dataset = data.load_dataset('digits')
  assert dataset.train_images.shape == (1437, 32, 32, 1)
  assert dataset.test_images.shape == (360, 32, 32, 1)
  assert dataset.train_images.dtype == dataset.test_images.dtype == np.uint8
  assert dataset.train_labels.dtype == dataset.test_labels.dtype == np.int32
  assert dataset.num_classes == 10
  assert dataset.class_names == tuple('0123456789')
  assert dataset.image_shape == (32, 32, 1)
  # Scaled from 0..16 to the full uint8 range.
  assert dataset.train_images.min() == 0 and dataset.train_images.max() == 255
  # Stratified: every class has 20% (35 to 37 of ~180) of its examples in test.
  test_counts = np.bincount(dataset.test_labels, minlength=10)
  assert test_counts.sum() == 360 and test_counts.min() >= 35 and test_counts.max() <= 37


def test_digits_split_is_fixed():
  first, second = data.load_dataset('digits'), data.load_dataset('digits')
  np.testing.assert_array_equal(first.train_images, second.train_images)
  np.testing.assert_array_equal(first.test_labels, second.test_labels)


def test_digits_are_kept_in_the_cache_folder(tmp_path, monkeypatch):
  first = data.load_dataset('digits', cache_dir=str(tmp_path))
  (path,) = tmp_path.glob('digits-32px-sklearn*.npz')
  fresh = datasets._split_digits(32)  # pylint: disable=protected-access
  np.testing.assert_array_equal(first.train_images, fresh['train_images'])
  np.testing.assert_array_equal(first.test_labels, fresh['test_labels'])

  def no_scikit_learn(image_size):
    raise AssertionError(f'scikit-learn asked again for {image_size}px digits')
  monkeypatch.setattr(datasets, '_split_digits', no_scikit_learn)
  second = data.load_dataset('digits', cache_dir=str(tmp_path))  # From the file alone.
  for name in ('train_images', 'train_labels', 'test_images', 'test_labels'):
    np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
  assert second.class_names == tuple('0123456789')
  # A damaged file is made again, and another size is another file.
  path.write_bytes(b'not an npz')
  monkeypatch.undo()
  np.testing.assert_array_equal(data.load_dataset('digits', cache_dir=str(tmp_path)).train_images,
                                first.train_images)
  data.load_dataset('digits', cache_dir=str(tmp_path), image_size=16)
  assert len(list(tmp_path.glob('digits-*.npz'))) == 2


def test_digits_without_scikit_learn_is_one_line(tmp_path, monkeypatch):
  def not_installed(name):
    raise datasets.importlib.metadata.PackageNotFoundError(name)
  monkeypatch.setattr(datasets.importlib.metadata, 'version', not_installed)
  with pytest.raises(UsageError, match='the digits dataset comes with scikit-learn, which is '
                                       'not installed: pip install scikit-learn'):
    data.load_dataset('digits', cache_dir=str(tmp_path))


def test_digits_image_size():
  assert data.load_dataset('digits', image_size=16).train_images.shape == (1437, 16, 16, 1)


def test_dataset_checks_its_arrays():
  images = np.zeros((3, 4, 4, 1), np.uint8)
  labels = np.zeros(3, np.int32)
  with pytest.raises(UsageError, match='train_labels must be int32'):
    data.Dataset('toy', images, labels[:2], images, labels, 2, ('a', 'b'))
  with pytest.raises(UsageError, match='test_images must be uint8'):
    data.Dataset('toy', images, labels, images.astype(np.float32), labels, 2, ('a', 'b'))
  with pytest.raises(UsageError, match='class names'):
    data.Dataset('toy', images, labels, images, labels, 3, ('a', 'b'))
  # One class leaves nothing to learn; an empty split nothing to train or test on.
  with pytest.raises(UsageError, match='toy has 1 class; a classifier needs at least two'):
    data.Dataset('toy', images, labels, images, labels, 1, ('a',))
  with pytest.raises(UsageError, match='toy has no test images'):
    data.Dataset('toy', images, labels, images[:0], labels[:0], 2, ('a', 'b'))


def test_one_class_folder_is_refused(folder, tmp_path):
  _remove_tree(folder / 'train' / 'dog')
  _remove_tree(folder / 'test' / 'dog')
  with pytest.raises(UsageError, match=r'has one class folder \(cat\); a classifier needs at '
                     'least two'):
    _load(folder, tmp_path)


def test_unknown_name_lists_valid_names():
  with pytest.raises(UsageError, match='digits, cifar10, cifar100, tiny_imagenet, imagefolder'):
    data.load_dataset('mnist')


@pytest.mark.parametrize('image_size', [0, -3, 2.5, True])
def test_bad_image_size(image_size):
  with pytest.raises(UsageError, match='image_size'):
    data.load_dataset('digits', image_size=image_size)


def test_imagefolder_contents(folder, tmp_path):
  dataset = _load(folder, tmp_path)
  assert dataset.name == 'imagefolder'
  assert dataset.class_names == ('cat', 'dog') and dataset.num_classes == 2
  # Files in sorted order within each class: cat/0 cat/1 cat/gray, dog/0 dog/1 dog/2 dog/odd.
  assert dataset.train_images.shape == (7, 8, 8, 3)
  assert dataset.train_images.dtype == np.uint8
  np.testing.assert_array_equal(dataset.train_labels, [0, 0, 0, 1, 1, 1, 1])
  assert dataset.train_labels.dtype == np.int32
  expected_colours = (COLOURS['train', 'cat'] + [(77, 77, 77)] + COLOURS['train', 'dog']
                      + [(5, 6, 7)])
  expected_images = np.broadcast_to(np.asarray(expected_colours, np.uint8)[:, None, None],
                                    (7, 8, 8, 3))
  np.testing.assert_array_equal(dataset.train_images, expected_images)
  np.testing.assert_array_equal(dataset.test_labels, [0, 1, 1])
  np.testing.assert_array_equal(dataset.test_images[:, 0, 0],
                                COLOURS['test', 'cat'] + COLOURS['test', 'dog'])


def test_imagefolder_image_size_resizes_all(folder, tmp_path):
  dataset = _load(folder, tmp_path, image_size=4)
  assert dataset.train_images.shape == (7, 4, 4, 3)
  assert dataset.test_images.shape == (3, 4, 4, 3)
  np.testing.assert_array_equal(dataset.train_images[2], np.full((4, 4, 3), 77, np.uint8))


def test_test_classes_may_be_a_subset(folder, tmp_path):
  for name in os.listdir(folder / 'test' / 'cat'):
    os.remove(folder / 'test' / 'cat' / name)
  os.rmdir(folder / 'test' / 'cat')
  dataset = _load(folder, tmp_path)
  assert dataset.class_names == ('cat', 'dog')
  np.testing.assert_array_equal(dataset.test_labels, [1, 1])


def test_corrupt_image_is_named(folder, tmp_path):
  (folder / 'train' / 'dog' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
  with pytest.raises(UsageError, match='broken.png'):
    _load(folder, tmp_path)


def test_non_square_first_image_asks_for_image_size(tmp_path):
  root = tmp_path / 'images'
  for class_name in ('a', 'b'):
    _save(str(root / 'train' / class_name / '0.png'), size=(6, 4))
    _save(str(root / 'test' / class_name / '0.png'), size=(6, 4))
  with pytest.raises(UsageError, match='image_size'):
    _load(root, tmp_path)
  assert _load(root, tmp_path, image_size=5).train_images.shape == (2, 5, 5, 3)


@pytest.mark.parametrize('break_tree, message', [
    (lambda root: root / 'nowhere', 'does not exist'),
    (lambda root: _remove_tree(root / 'train') or root, 'train not found'),
    (lambda root: _remove_tree(root / 'test') or root, 'test not found'),
    (lambda root: (root / 'train' / 'empty').mkdir() or root, 'empty holds no image files'),
    (lambda root: _empty_folder(root / 'test' / 'cat') or root, 'cat holds no image files'),
    (lambda root: _save(str(root / 'test' / 'bird' / '0.png')) or root, 'bird'),
])
def test_folder_errors(folder, tmp_path, break_tree, message):
  with pytest.raises(UsageError, match=message):
    _load(break_tree(folder), tmp_path)


def _empty_folder(path):
  for name in os.listdir(path):
    os.remove(os.path.join(path, name))


def _remove_tree(path):
  for parent, folders, files in os.walk(path, topdown=False):
    for name in files:
      os.remove(os.path.join(parent, name))
    for name in folders:
      os.rmdir(os.path.join(parent, name))
  os.rmdir(path)


def test_folder_datasets_need_data_dir():
  with pytest.raises(UsageError, match='data_dir'):
    data.load_dataset('imagefolder')


def test_dataset_names_its_cache_file(folder, tmp_path):
  dataset = _load(folder, tmp_path)
  assert os.path.dirname(dataset.cache_path) == str(tmp_path / 'cache')
  assert os.path.isfile(dataset.cache_path)
  assert data.load_dataset('digits').cache_path is None


def test_nothing_is_written_into_data_dir(folder, tmp_path):
  before = _tree(folder)
  _load(folder, tmp_path)
  _load(folder, tmp_path)
  assert _tree(folder) == before


def _count_decodes(monkeypatch):
  calls = []
  decode = datasets._decode_image

  def counting_decode(path, image_size):
    calls.append(path)
    return decode(path, image_size)

  monkeypatch.setattr(datasets, '_decode_image', counting_decode)
  return calls


def test_second_load_reads_the_cache(folder, tmp_path, monkeypatch):
  decoded = _count_decodes(monkeypatch)
  first = _load(folder, tmp_path)
  assert len(decoded) == 10
  second = _load(folder, tmp_path)
  assert len(decoded) == 10  # Nothing decoded the second time.
  for field in ('train_images', 'train_labels', 'test_images', 'test_labels'):
    np.testing.assert_array_equal(getattr(first, field), getattr(second, field))
  assert second.class_names == first.class_names
  cache_files = os.listdir(tmp_path / 'cache')
  assert len(cache_files) == 1 and cache_files[0].endswith('.npz')  # No temporary left over.


def test_changed_file_invalidates_the_cache(folder, tmp_path, monkeypatch):
  decoded = _count_decodes(monkeypatch)
  _load(folder, tmp_path)
  changed = folder / 'test' / 'cat' / '0.png'
  _save(str(changed), (1, 2, 3))
  os.utime(changed, ns=(1, 1))
  dataset = _load(folder, tmp_path)
  assert len(decoded) == 20
  np.testing.assert_array_equal(dataset.test_images[0, 0, 0], (1, 2, 3))


def test_other_image_size_is_cached_separately(folder, tmp_path, monkeypatch):
  decoded = _count_decodes(monkeypatch)
  _load(folder, tmp_path)
  _load(folder, tmp_path, image_size=8)  # The default size, spelled out: same cache entry.
  assert len(decoded) == 10
  assert _load(folder, tmp_path, image_size=4).train_images.shape[1] == 4
  assert len(decoded) == 20


def test_damaged_cache_file_is_rebuilt(folder, tmp_path, monkeypatch):
  _load(folder, tmp_path)
  (cache_file,) = (tmp_path / 'cache').iterdir()
  cache_file.write_bytes(b'truncated')
  decoded = _count_decodes(monkeypatch)
  assert _load(folder, tmp_path).train_images.shape == (7, 8, 8, 3)
  assert len(decoded) == 10


def test_unwritable_cache_only_warns(folder, tmp_path):
  (tmp_path / 'a_file').write_text('')
  with pytest.warns(UserWarning, match='Could not cache'):
    dataset = data.load_dataset('imagefolder', str(folder),
                                cache_dir=str(tmp_path / 'a_file' / 'cache'))
  assert dataset.train_images.shape == (7, 8, 8, 3)


def test_cache_dir_defaults_to_environment(folder, tmp_path, monkeypatch):
  monkeypatch.setenv('BWBPF_CACHE_DIR', str(tmp_path / 'from_env'))
  data.load_dataset('imagefolder', str(folder))
  assert len(os.listdir(tmp_path / 'from_env')) == 1


# Tiny ImageNet: train/<wnid>/images/*.JPEG, val/images/*.JPEG + val/val_annotations.txt.
WNIDS = ('n02', 'n01', 'n03')  # Deliberately unsorted: class order is sorted wnids.


@pytest.fixture
def tiny_imagenet(tmp_path):
  root = tmp_path / 'download' / 'tiny-imagenet-200'
  for index, wnid in enumerate(WNIDS):
    for i in range(2):
      _save(str(root / 'train' / wnid / 'images' / f'{wnid}_{i}.JPEG'), (index * 100, 0, 0))
    (root / 'train' / wnid / f'{wnid}_boxes.txt').write_text(f'{wnid}_0.JPEG\t0\t0\t8\t8\n')
  val_wnids = ['n03', 'n01', 'n01', 'n02']
  for i in range(len(val_wnids)):
    _save(str(root / 'val' / 'images' / f'val_{i}.JPEG'), 50, mode='L')
  (root / 'val' / 'val_annotations.txt').write_text(
      ''.join(f'val_{i}.JPEG\t{wnid}\t0\t0\t8\t8\n' for i, wnid in enumerate(val_wnids)))
  (root / 'wnids.txt').write_text('\n'.join(WNIDS) + '\n')
  return root


@pytest.mark.parametrize('use_parent', [False, True])
def test_tiny_imagenet(tiny_imagenet, tmp_path, use_parent):
  data_dir = tiny_imagenet.parent if use_parent else tiny_imagenet
  dataset = data.load_dataset('tiny_imagenet', str(data_dir), cache_dir=str(tmp_path / 'cache'))
  assert dataset.class_names == ('n01', 'n02', 'n03') and dataset.num_classes == 3
  assert dataset.train_images.shape == (6, 8, 8, 3)
  assert dataset.test_images.shape == (4, 8, 8, 3)
  np.testing.assert_array_equal(dataset.train_labels, [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(dataset.test_labels, [2, 0, 0, 1])  # Annotation order.
  # n01 was drawn with red 100, n02 with red 0 (JPEG: within a few levels).
  np.testing.assert_allclose(dataset.train_images[:, 0, 0, 0], [100, 100, 0, 0, 200, 200],
                             atol=3)


def test_tiny_imagenet_without_annotations(tiny_imagenet, tmp_path):
  os.remove(tiny_imagenet / 'val' / 'val_annotations.txt')
  with pytest.raises(UsageError, match='val_annotations.txt'):
    data.load_dataset('tiny_imagenet', str(tiny_imagenet), cache_dir=str(tmp_path / 'cache'))


def test_tiny_imagenet_unknown_wnid(tiny_imagenet, tmp_path):
  with open(tiny_imagenet / 'val' / 'val_annotations.txt', 'a') as annotations:
    annotations.write('val_0.JPEG\tn99\t0\t0\t8\t8\n')
  with pytest.raises(UsageError, match='n99'):
    data.load_dataset('tiny_imagenet', str(tiny_imagenet), cache_dir=str(tmp_path / 'cache'))


def test_tiny_imagenet_missing_val_image(tiny_imagenet, tmp_path):
  os.remove(tiny_imagenet / 'val' / 'images' / 'val_2.JPEG')
  with pytest.raises(UsageError, match='val_2.JPEG'):
    data.load_dataset('tiny_imagenet', str(tiny_imagenet), cache_dir=str(tmp_path / 'cache'))


# tensorflow-datasets (imported only here; the loaders import it lazily).


@pytest.fixture
def tfds_mock_offline(monkeypatch):
  """The test replaces tfds' download, so the download host need not answer."""
  monkeypatch.setattr(datasets, '_check_reachable', lambda urls: None)
  return pytest.importorskip('tensorflow_datasets')


@pytest.mark.parametrize('name, num_classes', [('cifar10', 10), ('cifar100', 100)])
def test_tfds_cifar(tmp_path, name, num_classes, tfds_mock_offline):
  tfds = tfds_mock_offline
  with tfds.testing.mock_data(num_examples=6):
    dataset = data.load_dataset(name, data_dir=str(tmp_path))
  for images, labels in ((dataset.train_images, dataset.train_labels),
                         (dataset.test_images, dataset.test_labels)):
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (6,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < num_classes
  assert dataset.num_classes == num_classes and len(dataset.class_names) == num_classes


def test_tfds_image_size(tmp_path, tfds_mock_offline):
  tfds = tfds_mock_offline
  with tfds.testing.mock_data(num_examples=3):
    dataset = data.load_dataset('cifar10', data_dir=str(tmp_path), image_size=16)
  assert dataset.train_images.shape == (3, 16, 16, 3)


def test_tfds_not_prepared_and_no_network(tmp_path, monkeypatch, tfds_mock_offline):
  tfds = tfds_mock_offline

  def no_network(self, *args, **kwargs):
    raise OSError('network is unreachable')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', no_network)
  with pytest.raises(UsageError) as raised:
    data.load_dataset('cifar10', data_dir=str(tmp_path / 'empty'))
  message = str(raised.value)
  assert 'not prepared under' in message and str(tmp_path / 'empty') in message
  assert 'tfds build cifar10' in message and '--dataset=imagefolder' in message
  assert 'network is unreachable' in message and '\n' not in message


def test_tfds_download_path_without_network_is_one_line(tmp_path, monkeypatch):
  """tfds' own download_and_prepare runs; only its network call is replaced by a failing one.

  This is the path a fresh install takes online; a package tfds imports on the way
  (importlib_resources) would surface here as an import error instead of this line.
  """
  pytest.importorskip('tensorflow_datasets')
  from tensorflow_datasets.core.download import downloader  # pylint: disable=g-import-not-at-top

  def no_network(url, **kwargs):
    raise ConnectionError(f'network is unreachable (test): {url}')

  monkeypatch.setattr(downloader, '_open_url', no_network)
  monkeypatch.setattr(datasets, '_check_reachable', lambda urls: None)  # Straight to tfds.
  with pytest.raises(UsageError) as raised:
    data.load_dataset('cifar10', data_dir=str(tmp_path / 'tfds'))
  message = str(raised.value)
  assert 'No module named' not in message and 'ImportError' not in message, message
  assert 'ConnectionError: network is unreachable (test): https://' in message, message
  assert 'tfds build cifar10' in message and '\n' not in message


def test_tfds_unreachable_host_fails_before_tfds_retries(tmp_path, monkeypatch):
  pytest.importorskip('tensorflow_datasets')
  import requests  # pylint: disable=g-import-not-at-top
  tfds_download_started = []
  from tensorflow_datasets.core import dataset_builder  # pylint: disable=g-import-not-at-top

  def no_route(url, **kwargs):
    raise requests.ConnectionError(f'no route to host (test): {url}')

  monkeypatch.setattr(requests, 'head', no_route)
  monkeypatch.setattr(dataset_builder.DatasetBuilder, 'download_and_prepare',
                      lambda *args, **kwargs: tfds_download_started.append(True))
  with pytest.raises(UsageError, match=r'ConnectionError: www\.cs\.toronto\.edu is unreachable'):
    data.load_dataset('cifar10', data_dir=str(tmp_path / 'tfds'))
  assert not tfds_download_started
