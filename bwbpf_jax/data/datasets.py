"""Whole datasets as numpy arrays in host memory.

Every dataset this project trains on fits in memory (CIFAR-10 is 180 MB as
uint8), so the loaders return plain arrays and `batches.py`
shuffles, augments and batches them with numpy. Images stay uint8
[N, H, W, C] until a batch is made, and labels are int32 [N].

Sources:
  digits         scikit-learn's bundled 8x8 digits, upsampled to 32x32 so the
                 CIFAR models' five poolings still fit; for tests and demos.
  cifar10/100    tensorflow-datasets, prepared under `data_dir` (downloaded and
                 prepared there on first use; without network access the load
                 fails within seconds, naming the host it could not reach).
  tiny_imagenet  the `tiny-imagenet-200` folder as distributed; val/ is the
                 test split, labelled by val/val_annotations.txt.
  imagefolder    train/<class>/* and test/<class>/* image files.

Folder datasets are decoded once, by a pool of threads (PIL releases the GIL
in its C decoders; for 32x32 JPEGs, though, most of the time goes to PIL's
Python header parsing, so expect ~100-200 us per image whatever the thread
count), and the arrays are cached as one uncompressed .npz in `cache_dir`,
keyed by the folder's path, every file's size and mtime, and the image size:
a changed file means a fresh decode rather than stale data, and a second load
only reads the .npz (CIFAR-10: ~1.3 s instead of ~15 s on two cores).
Nothing is ever written into `data_dir`. The digits are kept there too (70 kB,
keyed by scikit-learn's version and the image size): a later load skips
importing scikit-learn, which cost every short run about 1.5 s.
"""

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import tempfile
from typing import Optional, Sequence
import warnings
import zipfile

from absl import logging
import numpy as np
from PIL import Image

from bwbpf_jax import cache
from bwbpf_jax.errors import UsageError

DATASET_NAMES = ('digits', 'cifar10', 'cifar100', 'tiny_imagenet', 'imagefolder')

_TFDS_NAMES = ('cifar10', 'cifar100')
_TFDS_BATCH = 10_000
# Seconds to wait for a dataset's download host before calling the network unreachable.
_REACHABLE_TIMEOUT_S = 10
_DIGITS_IMAGE_SIZE = 32
_TINY_IMAGENET_FOLDER = 'tiny-imagenet-200'
# Bump when the cached arrays' meaning changes, so old cache files are ignored.
_CACHE_FORMAT_VERSION = 1
_CACHE_KEYS = ('train_images', 'train_labels', 'test_images', 'test_labels', 'class_names')
# Images per decoding task: large enough that scheduling costs nothing, small
# enough that all threads stay busy to the end.
_DECODE_CHUNK = 512
# Small images spend most of their decoding time in PIL's Python code, under
# the GIL; more threads than this only contend for it.
_MAX_DECODE_THREADS = 8


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A labelled train/test pair held in memory.

  Attributes:
    name: the name it was loaded by (one of `DATASET_NAMES`).
    train_images: uint8 [N_train, H, W, C].
    train_labels: int32 [N_train], values in [0, num_classes).
    test_images: uint8 [N_test, H, W, C].
    test_labels: int32 [N_test].
    num_classes: number of classes, also for classes absent from a split; at
      least two, since one class leaves nothing to learn (every loss is 0 and
      every accuracy 100%).
    class_names: `num_classes` names; label i is `class_names[i]`.
    cache_path: the .npz a folder dataset's decoded images are kept in (None for
      digits and tfds datasets, which keep no copy of their own).
  """
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  class_names: tuple
  cache_path: Optional[str] = None

  def __post_init__(self):
    for split in ('train', 'test'):
      images = getattr(self, f'{split}_images')
      labels = getattr(self, f'{split}_labels')
      if images.dtype != np.uint8 or images.ndim != 4:
        raise UsageError(f'{split}_images must be uint8 [N, H, W, C], '
                         f'got {images.dtype} {images.shape}.')
      if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
        raise UsageError(f'{split}_labels must be int32 [{images.shape[0]}], '
                         f'got {labels.dtype} {labels.shape}.')
    if self.train_images.shape[1:] != self.test_images.shape[1:]:
      raise UsageError(f'train and test images differ in shape: {self.train_images.shape[1:]} '
                       f'vs {self.test_images.shape[1:]}.')
    if len(self.class_names) != self.num_classes:
      raise UsageError(f'{len(self.class_names)} class names for {self.num_classes} classes.')
    if self.num_classes < 2:
      raise UsageError(f'{self.name} has {self.num_classes} class; a classifier needs at '
                       f'least two.')
    for split in ('train', 'test'):
      if not len(getattr(self, f'{split}_labels')):
        raise UsageError(f'{self.name} has no {split} images.')

  @property
  def image_shape(self):
    """(H, W, C) of one image: what a model is initialised with."""
    return tuple(self.train_images.shape[1:])


def load_dataset(name: str,
                 data_dir: Optional[str] = None,
                 cache_dir: Optional[str] = None,
                 image_size: Optional[int] = None) -> Dataset:
  """Loads a whole dataset into memory.

  Args:
    name: one of `DATASET_NAMES`.
    data_dir: where the data lives: the tfds data directory for cifar10/100
      (tfds' default when None), the dataset folder for tiny_imagenet (the
      tiny-imagenet-200 folder or its parent) and imagefolder. Unused by digits.
    cache_dir: where folder datasets and digits keep their .npz; default
      `$BWBPF_CACHE_DIR`, else ~/.cache/bwbpf_jax.
    image_size: side of the square images returned; images of another size are
      resized (bilinear). Default: 32 for digits, the native size for tfds
      datasets, the first train image's size for folder datasets.

  Returns:
    A `Dataset`.

  Raises:
    UsageError: unknown name, missing or malformed data, unreadable images.
  """
  if name not in DATASET_NAMES:
    raise UsageError(f'Unknown dataset {name!r}; choose one of {", ".join(DATASET_NAMES)}.')
  if image_size is not None and (not isinstance(image_size, (int, np.integer))
                                 or isinstance(image_size, bool) or image_size < 1):
    raise UsageError(f'image_size must be a positive integer, got {image_size!r}.')
  image_size = None if image_size is None else int(image_size)
  data_dir = None if data_dir is None else os.path.expanduser(data_dir)
  if name == 'digits':
    return _load_digits(image_size or _DIGITS_IMAGE_SIZE, _resolve_cache_dir(cache_dir))
  if name in _TFDS_NAMES:
    return _load_tfds(name, data_dir, image_size)
  if data_dir is None:
    raise UsageError(f'Dataset {name} needs data_dir=FOLDER.')
  if not os.path.isdir(data_dir):
    raise UsageError(f'data_dir {data_dir} does not exist or is not a folder.')
  if name == 'tiny_imagenet':
    splits, class_names, root = _tiny_imagenet_files(data_dir)
  else:
    splits, class_names, root = _imagefolder_files(data_dir)
  return _load_folder_dataset(name, root, splits, class_names, image_size,
                              _resolve_cache_dir(cache_dir))


def _load_digits(image_size: int, cache_dir: str) -> Dataset:
  """scikit-learn's 1,797 digits, 0..16 scaled to 0..255, split 80/20 by class (cached)."""
  try:
    version = importlib.metadata.version('scikit-learn')
  except importlib.metadata.PackageNotFoundError:
    raise UsageError('the digits dataset comes with scikit-learn, which is not installed: '
                     'pip install scikit-learn (or the library\'s experiments extra)') from None
  cache_path = os.path.join(cache_dir, f'digits-{image_size}px-sklearn{version}.npz')
  arrays = _read_cache(cache_path)
  if arrays is None:
    arrays = _split_digits(image_size)
    _write_cache(cache_path, arrays, warn=False)  # Unwritable: ~1.5 s a load, no news.
  return Dataset(
      name='digits',
      train_images=arrays['train_images'], train_labels=arrays['train_labels'],
      test_images=arrays['test_images'], test_labels=arrays['test_labels'],
      num_classes=10, class_names=tuple(str(name) for name in arrays['class_names']))


def _split_digits(image_size: int) -> dict:
  """The digits' arrays (`_CACHE_KEYS`), from scikit-learn."""
  # Imported here: scikit-learn takes ~1.5 s to import, which other datasets need not pay.
  from sklearn import datasets as sk_datasets
  from sklearn import model_selection

  digits = sk_datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  images = _resize_all(images[..., None], image_size)
  labels = digits.target.astype(np.int32)
  train_index, test_index = model_selection.train_test_split(
      np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
  train_index, test_index = np.sort(train_index), np.sort(test_index)
  return {'train_images': images[train_index], 'train_labels': labels[train_index],
          'test_images': images[test_index], 'test_labels': labels[test_index],
          'class_names': np.asarray([str(digit) for digit in range(10)], dtype=str)}


@contextlib.contextmanager
def _only_errors_logged():
  """tfds warns about every empty version folder it probes; a failure's UsageError says more."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def _load_tfds(name: str, data_dir: Optional[str], image_size: Optional[int]) -> Dataset:
  """A tfds image-classification dataset, prepared (or downloaded) under data_dir."""
  # Imported here: TensorFlow takes seconds to import and only these datasets need it.
  import tensorflow as tf
  try:
    # TF would otherwise reserve accelerator memory that JAX needs.
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    pass  # TF's devices were initialised earlier by someone else; nothing left to hide.
  import tensorflow_datasets as tfds

  with _only_errors_logged():
    builder = tfds.builder(name, data_dir=data_dir)
    prepared = builder.is_prepared()
  if not prepared:
    try:
      # tfds retries an unreachable host for minutes; one quick request says the same.
      _check_reachable(type(builder).url_infos or {})
      with _only_errors_logged():
        builder.download_and_prepare()
    except ImportError as error:
      raise UsageError(f'Dataset {name} cannot be downloaded: tensorflow-datasets needs a '
                       f'missing package ({error}); pip install -r requirements.txt') from error
    except Exception as error:  # pylint: disable=broad-except
      reason = ': '.join([type(error).__name__] + str(error).strip().splitlines()[:1])
      raise UsageError(
          f'Dataset {name} is not prepared under {builder.data_dir_root} and could not be '
          f'downloaded ({reason}); run `tfds build {name} --data_dir=DIR` on a machine with '
          f'network access and copy DIR here (pass --data_dir=DIR), or use '
          f'--dataset=imagefolder --data_dir=FOLDER with train/<class>/ and test/<class>/ '
          f'image folders.') from error
  arrays = {}
  for split in ('train', 'test'):
    # Fixed-size batches rather than batch_size=-1, which batches by the split's
    # recorded size and aborts TensorFlow when that is unknown (tfds' mock data).
    batches = list(tfds.as_numpy(builder.as_dataset(split=split, batch_size=_TFDS_BATCH)))
    images = np.concatenate([batch['image'] for batch in batches]).astype(np.uint8, copy=False)
    if image_size is not None and images.shape[1:3] != (image_size, image_size):
      images = _resize_all(images, image_size)
    arrays[f'{split}_images'] = images
    arrays[f'{split}_labels'] = np.concatenate(
        [batch['label'] for batch in batches]).astype(np.int32)
  label_feature = builder.info.features['label']
  return Dataset(name=name, num_classes=label_feature.num_classes,
                 class_names=tuple(label_feature.names), **arrays)


def _check_reachable(urls):
  """Raises ConnectionError (or requests' subclass of it) if a download host does not answer.

  One HEAD request per host, through the same `requests` library (and so the
  same HTTPS_PROXY settings) that tfds downloads with. Any HTTP answer counts as
  reachable; only a failed connection or a timeout does not.
  """
  import requests  # A dependency of tensorflow-datasets.
  checked = set()
  for url in urls:
    host = url.split('/')[2] if '://' in url else url
    if host in checked:
      continue
    checked.add(host)
    try:
      requests.head(url, timeout=_REACHABLE_TIMEOUT_S, allow_redirects=False)
    except (requests.ConnectionError, requests.Timeout) as error:
      raise ConnectionError(f'{host} is unreachable: {type(error).__name__}') from error


def _resize_all(images: np.ndarray, image_size: int) -> np.ndarray:
  """Bilinear resize of uint8 [N, H, W, C] (C = 1 or 3) to [N, S, S, C]."""
  resized = np.empty((len(images), image_size, image_size, images.shape[-1]), np.uint8)
  for i, image in enumerate(images):
    pil_image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    resized[i] = np.asarray(
        pil_image.resize((image_size, image_size), Image.BILINEAR)).reshape(resized.shape[1:])
  return resized


# ---------------------------------------------------------------------------
# Folder datasets: finding the files.


@dataclasses.dataclass(frozen=True)
class _SplitFiles:
  """One split of a folder dataset: image paths and their labels, in order."""
  paths: tuple
  labels: np.ndarray  # int32 [N]


def _image_extensions():
  """File extensions PIL can open (lower case, with the dot)."""
  return frozenset(extension.lower() for extension in Image.registered_extensions())


def _visible_subfolders(folder: str):
  """Sorted names of the sub-folders of `folder`, hidden ones (.*) left out."""
  return sorted(entry.name for entry in os.scandir(folder)
                if entry.is_dir() and not entry.name.startswith('.'))


def _image_files_under(folder: str, extensions) -> list:
  """Image files anywhere below `folder`, in a sorted, reproducible order."""
  found = []
  for parent, subfolders, filenames in os.walk(folder):
    subfolders[:] = sorted(name for name in subfolders if not name.startswith('.'))
    found.extend(os.path.join(parent, filename) for filename in sorted(filenames)
                 if not filename.startswith('.')
                 and os.path.splitext(filename)[1].lower() in extensions)
  return found


def _class_folder_split(split_dir: str, class_names: Sequence[str], extensions) -> _SplitFiles:
  """Images of `split_dir/<class>/...`, labelled by the class's index in class_names."""
  paths, labels = [], []
  for class_name in _visible_subfolders(split_dir):
    class_dir = os.path.join(split_dir, class_name)
    files = _image_files_under(class_dir, extensions)
    if not files:
      raise UsageError(f'Class folder {class_dir} holds no image files; add images or remove it.')
    paths.extend(files)
    labels.extend([class_names.index(class_name)] * len(files))
  return _SplitFiles(tuple(paths), np.asarray(labels, np.int32))


def _require_folder(path: str, what: str):
  if not os.path.isdir(path):
    raise UsageError(f'{path} not found; {what}.')


def _imagefolder_files(data_dir: str):
  """Files of data_dir/train/<class>/* and data_dir/test/<class>/*."""
  layout = 'imagefolder expects data_dir/train/<class>/<images> and data_dir/test/<class>/<images>'
  root = os.path.abspath(data_dir)
  train_dir, test_dir = os.path.join(root, 'train'), os.path.join(root, 'test')
  _require_folder(train_dir, layout)
  _require_folder(test_dir, layout)
  class_names = _visible_subfolders(train_dir)
  if not class_names:
    raise UsageError(f'{train_dir} has no class folders; {layout}.')
  if len(class_names) < 2:
    raise UsageError(f'{train_dir} has one class folder ({class_names[0]}); a classifier needs '
                     f'at least two: add a folder of images for each class.')
  unknown = sorted(set(_visible_subfolders(test_dir)) - set(class_names))
  if unknown:
    raise UsageError(f'{test_dir} has classes not in {train_dir}: {", ".join(unknown)}; '
                     f'every test class needs a train folder.')
  extensions = _image_extensions()
  splits = {'train': _class_folder_split(train_dir, class_names, extensions),
            'test': _class_folder_split(test_dir, class_names, extensions)}
  if not splits['test'].paths:
    raise UsageError(f'{test_dir} has no class folders with images; {layout}.')
  return splits, tuple(class_names), root


def _tiny_imagenet_files(data_dir: str):
  """Files of tiny-imagenet-200: train/<wnid>/images/*.JPEG, and val/ as the test split."""
  root = os.path.abspath(data_dir)
  if os.path.isdir(os.path.join(root, _TINY_IMAGENET_FOLDER)):
    root = os.path.join(root, _TINY_IMAGENET_FOLDER)
  layout = 'pass the tiny-imagenet-200 folder (or its parent) as data_dir'
  train_dir, val_dir = os.path.join(root, 'train'), os.path.join(root, 'val')
  _require_folder(train_dir, layout)
  _require_folder(val_dir, layout)
  annotations_path = os.path.join(val_dir, 'val_annotations.txt')
  if not os.path.isfile(annotations_path):
    raise UsageError(f'{annotations_path} not found; tiny_imagenet needs it to label val/ '
                     f'(restore it from the original tiny-imagenet-200.zip).')
  class_names = _visible_subfolders(train_dir)
  if not class_names:
    raise UsageError(f'{train_dir} has no class (wnid) folders; {layout}.')
  class_index = {wnid: index for index, wnid in enumerate(class_names)}
  train = _class_folder_split(train_dir, class_names, _image_extensions())
  val_paths, val_labels = [], []
  with open(annotations_path) as annotations:
    for line_number, line in enumerate(annotations, start=1):
      if not line.strip():
        continue
      fields = line.rstrip('\n').split('\t')
      if len(fields) < 2:
        raise UsageError(f'{annotations_path} line {line_number} is not '
                         f'"filename<TAB>wnid<TAB>...": {line.strip()!r}.')
      filename, wnid = fields[0], fields[1]
      if wnid not in class_index:
        raise UsageError(f'{annotations_path} line {line_number} names class {wnid}, '
                         f'which has no folder in {train_dir}.')
      val_paths.append(os.path.join(val_dir, 'images', filename))
      val_labels.append(class_index[wnid])
  if not val_paths:
    raise UsageError(f'{annotations_path} lists no images.')
  splits = {'train': train,
            'test': _SplitFiles(tuple(val_paths), np.asarray(val_labels, np.int32))}
  return splits, tuple(class_names), root


# ---------------------------------------------------------------------------
# Folder datasets: decoding and caching.


def _resolve_cache_dir(cache_dir: Optional[str]) -> str:
  return os.path.expanduser(cache_dir) if cache_dir is not None else cache.cache_dir()


def _file_stats(paths: Sequence[str], root: str) -> list:
  """[relative path, size, mtime_ns] per file: what identifies its content cheaply."""
  stats = []
  for path in paths:
    try:
      stat = os.stat(path)
    except OSError as error:
      raise UsageError(f'Cannot read image file {path} ({error.strerror}); restore it or remove '
                       f'it from the dataset.') from error
    # Paths were joined onto root: slicing gives the relative path 10x faster than relpath.
    if path.startswith(root + os.sep):
      relative = path[len(root) + 1:]
    else:
      relative = os.path.relpath(path, root)
    stats.append([relative, stat.st_size, stat.st_mtime_ns])
  return stats


def _cache_key(name, root, splits, class_names, image_size) -> str:
  """A hash of everything the decoded arrays depend on."""
  description = {
      'version': _CACHE_FORMAT_VERSION, 'name': name, 'root': root,
      'image_size': image_size, 'class_names': list(class_names),
      'splits': {split: {'files': _file_stats(files.paths, root),
                         'labels': files.labels.tolist()}
                 for split, files in sorted(splits.items())},
  }
  return hashlib.sha256(json.dumps(description).encode()).hexdigest()


def _first_image_size(path: str) -> int:
  """The side of the first train image, the default size for a folder dataset."""
  try:
    with Image.open(path) as image:
      width, height = image.size
  except (OSError, ValueError) as error:
    raise UsageError(f'Cannot read image {path} ({error}); fix or remove the file.') from error
  if width != height:
    raise UsageError(f'The first train image {path} is {width}x{height}, not square; '
                     f'pass image_size=N to choose the size of all images.')
  return width


def _decode_image(path: str, image_size: int) -> np.ndarray:
  """One image file as uint8 [S, S, 3]: any mode converted to RGB, resized if needed."""
  try:
    with Image.open(path) as image:
      if image.mode != 'RGB':
        image = image.convert('RGB')
      if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
      return np.asarray(image)
  except (OSError, ValueError, Image.DecompressionBombError) as error:
    raise UsageError(f'Cannot read image {path} ({error}); fix or remove the file.') from error


def _decode_into(images: np.ndarray, paths: Sequence[str], start: int, image_size: int):
  for offset, path in enumerate(paths):
    images[start + offset] = _decode_image(path, image_size)


def _decode_all(paths: Sequence[str], image_size: int) -> np.ndarray:
  """uint8 [N, S, S, 3], decoded by a thread per core (at most _MAX_DECODE_THREADS)."""
  images = np.empty((len(paths), image_size, image_size, 3), np.uint8)
  executor = concurrent.futures.ThreadPoolExecutor(
      max_workers=min(_MAX_DECODE_THREADS, os.cpu_count() or 1))
  try:
    futures = [executor.submit(_decode_into, images, paths[start:start + _DECODE_CHUNK],
                               start, image_size)
               for start in range(0, len(paths), _DECODE_CHUNK)]
    for future in futures:
      future.result()  # Re-raises a worker's UsageError here.
  finally:
    executor.shutdown(wait=True, cancel_futures=True)
  return images


def _read_cache(path: str) -> Optional[dict]:
  """The cached arrays, or None when there is no usable cache file."""
  try:
    with np.load(path, allow_pickle=False) as cached:
      return {key: cached[key] for key in _CACHE_KEYS}
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    return None  # Missing or damaged: decode again and overwrite it.


def _write_cache(path: str, arrays: dict, warn: bool = True):
  """Writes the .npz under a temporary name and renames it, so readers never see half a file."""
  folder = os.path.dirname(path)
  temp_path = None
  try:
    os.makedirs(folder, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + '.',
                                         suffix='.tmp')
    with os.fdopen(handle, 'wb') as file:
      np.savez(file, **arrays)
    os.replace(temp_path, path)
  except OSError as error:
    if temp_path is not None and os.path.exists(temp_path):
      os.remove(temp_path)
    if warn:
      warnings.warn(f'Could not cache decoded images in {folder} ({error}); the next load will '
                    f'decode them again. Set BWBPF_CACHE_DIR or cache_dir to a writable '
                    f'folder.')


def _load_folder_dataset(name, root, splits, class_names, image_size, cache_dir) -> Dataset:
  """Decodes a folder dataset's images, or reads them from the cache."""
  if not splits['train'].paths:
    raise UsageError(f'No train images found under {root}.')
  if image_size is None:
    image_size = _first_image_size(splits['train'].paths[0])
  key = _cache_key(name, root, splits, class_names, image_size)
  cache_path = os.path.join(cache_dir, f'{name}-{image_size}px-{key[:20]}.npz')
  arrays = _read_cache(cache_path)
  if arrays is None:
    arrays = {'class_names': np.asarray(class_names, dtype=str)}
    for split, files in splits.items():
      arrays[f'{split}_images'] = _decode_all(files.paths, image_size)
      arrays[f'{split}_labels'] = files.labels
    _write_cache(cache_path, arrays)
  return Dataset(
      name=name,
      train_images=arrays['train_images'], train_labels=arrays['train_labels'],
      test_images=arrays['test_images'], test_labels=arrays['test_labels'],
      num_classes=len(class_names), class_names=tuple(class_names), cache_path=cache_path)
