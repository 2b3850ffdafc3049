r"""Writes a tensorflow-datasets dataset as an image folder, for machines without network.

    python -m experiments.export_imagefolder --dataset=cifar10 --out=~/data/cifar10-png
    python -m experiments.export_imagefolder --dataset=cifar10 --out=~/data/cifar10-jpeg \
        --format=jpeg --jpeg_quality=95

Run it once where tfds can download (or with --data_dir holding a prepared
copy); then copy the folder anywhere and train on it with

    python -m experiments.main --dataset=imagefolder --data_dir=~/data/cifar10-png ...

The folder holds `train/<class>/<index>.<ext>` and `test/<class>/<index>.<ext>`
(index: the image's position in the tfds split, zero-padded, so the folder's
sorted order is the split's order within each class) and `manifest.json`: the
dataset, its tfds version, the image format, the JPEG quality (null for PNG),
and the images and classes of each split. PNG (the default) is lossless: the
folder trains on exactly tfds' pixels. JPEG at quality 95 is about half the size
and moves pixels by about 0.8 grey levels on average (measured on 100 CIFAR-10
images); runs on it compare with each other, not bit for bit with runs on tfds.

Exit codes: 0 written, 2 a usage error (unknown dataset, --out not empty, no
network and no prepared copy), each with one line on stderr.
"""

import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Before TensorFlow is imported.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import numpy as np
from PIL import Image

from bwbpf_jax import data
from bwbpf_jax.errors import UsageError

FORMATS = {'png': '.png', 'jpeg': '.jpg'}
MANIFEST_FILE = 'manifest.json'
TFDS_DATASETS = ('cifar10', 'cifar100')

FLAGS = flags.FLAGS
flags.DEFINE_enum('dataset', None, TFDS_DATASETS, 'The tensorflow-datasets dataset to write.')
flags.DEFINE_string('out', None, 'Folder to write (created; must be empty or absent).')
flags.DEFINE_string('data_dir', None, 'tfds data directory (default: tfds\' own).')
flags.DEFINE_enum('format', 'png', tuple(FORMATS), 'Image format: png (lossless) or jpeg.')
flags.DEFINE_integer('jpeg_quality', 95, 'JPEG quality, 1-95 (with --format=jpeg).')


def export(dataset: data.Dataset, out: str, *, image_format: str = 'png',
           jpeg_quality: int = 95, source: dict = None) -> dict:
  """Writes `dataset` under `out` as train/<class>/ and test/<class>/ files; returns the manifest.

  Raises:
    UsageError: `out` is a file or a folder that is not empty, or a bad format/quality.
  """
  if image_format not in FORMATS:
    raise UsageError(f'format must be one of {", ".join(FORMATS)}, got {image_format!r}')
  if image_format == 'jpeg' and not 1 <= jpeg_quality <= 95:
    raise UsageError(f'--jpeg_quality must be in 1..95 (Pillow\'s useful range), '
                     f'got {jpeg_quality}')
  out = os.path.expanduser(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise UsageError(f'--out={out} exists and is not an empty folder; choose a new folder')
  extension = FORMATS[image_format]
  options = {'quality': jpeg_quality} if image_format == 'jpeg' else {}
  splits = {}
  for split in ('train', 'test'):
    images = getattr(dataset, f'{split}_images')
    labels = getattr(dataset, f'{split}_labels')
    digits = len(str(max(len(images) - 1, 0)))
    # A folder per class with images: an empty class folder is refused by the loader.
    for label in np.unique(labels):
      os.makedirs(os.path.join(out, split, dataset.class_names[label]), exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels)):
      path = os.path.join(out, split, dataset.class_names[label],
                          f'{index:0{digits}d}{extension}')
      Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(path, **options)
    splits[split] = {'images': int(len(images)),
                     'images_per_class': np.bincount(labels, minlength=dataset.num_classes)
                                         .tolist()}
  manifest = {'dataset': dataset.name, **(source or {}), 'format': image_format,
              'jpeg_quality': jpeg_quality if image_format == 'jpeg' else None,
              'image_shape': list(dataset.image_shape), 'classes': list(dataset.class_names),
              'splits': splits}
  with open(os.path.join(out, MANIFEST_FILE), 'w') as f:
    json.dump(manifest, f, indent=2)
  return manifest


def _tfds_version(name: str, data_dir) -> str:
  import tensorflow_datasets as tfds
  return str(tfds.builder(name, data_dir=data_dir).info.version)


def main(argv):
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]} (flags look like --name=value)',
          file=sys.stderr)
    sys.exit(2)
  try:
    if FLAGS.dataset is None or FLAGS.out is None:
      raise UsageError('give --dataset (cifar10 or cifar100) and --out=FOLDER')
    out = os.path.expanduser(FLAGS.out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
      # Checked before the download, which may take minutes.
      raise UsageError(f'--out={out} exists and is not an empty folder; choose a new folder')
    dataset = data.load_dataset(FLAGS.dataset, FLAGS.data_dir)
    manifest = export(dataset, out, image_format=FLAGS.format, jpeg_quality=FLAGS.jpeg_quality,
                      source={'tfds_version': _tfds_version(FLAGS.dataset, FLAGS.data_dir)})
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'wrote {manifest["splits"]["train"]["images"]:,} train and '
        f'{manifest["splits"]["test"]["images"]:,} test images of {len(manifest["classes"])} '
        f'classes to {out} ({FLAGS.format}'
        + (f', quality {FLAGS.jpeg_quality}' if FLAGS.format == 'jpeg' else '') + '); train on '
        f'it with: python -m experiments.main --dataset=imagefolder --data_dir={out}')


def _parse_flags(argv):
  """absl's parser; a bad flag is one line and exit code 2, help exits 0."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except SystemExit as e:
    if e.code == 1 and any(arg.split('=')[0] in ('--help', '--helpfull', '-?', '--helpshort')
                           for arg in argv[1:]):
      sys.exit(0)
    raise


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
