"""experiments.export_imagefolder: a tfds dataset written as an image folder, without network.

tfds' mock data stands in for CIFAR-10 (random images and labels, nothing downloaded);
the loader's network check is switched off, since the mock replaces the download.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bwbpf_jax import data
from bwbpf_jax.data import datasets
from experiments import export_imagefolder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The command, run as `python -m experiments.export_imagefolder` would, inside tfds' mock.
_MOCKED_COMMAND = '''
import sys
import tensorflow_datasets as tfds
from absl import app
from bwbpf_jax.data import datasets
from experiments import export_imagefolder
datasets._check_reachable = lambda urls: None
with tfds.testing.mock_data(num_examples=12):
  app.run(export_imagefolder.main, argv=['export_imagefolder', *sys.argv[1:]],
          flags_parser=export_imagefolder._parse_flags)
'''


def _export(*flags):
  return subprocess.run([sys.executable, '-c', _MOCKED_COMMAND, *flags], cwd=REPO,
                        env={**os.environ, 'PYTHONPATH': REPO}, capture_output=True, text=True,
                        timeout=300)


def _image_files(root):
  return sorted(os.path.relpath(os.path.join(parent, name), root)
                for parent, _, names in os.walk(root) for name in names
                if name != export_imagefolder.MANIFEST_FILE)


@pytest.mark.slow  # The export command in a subprocess (tfds import included).
def test_command_writes_jpeg_folder_and_manifest(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  out = tmp_path / 'cifar10-jpeg'
  proc = _export('--dataset=cifar10', f'--out={out}', '--format=jpeg', '--jpeg_quality=90',
                 f'--data_dir={tmp_path / "tfds"}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'--dataset=imagefolder --data_dir={out}' in proc.stdout
  with open(out / 'manifest.json') as f:
    manifest = json.load(f)
  assert (manifest['dataset'], manifest['format'], manifest['jpeg_quality']) == (
      'cifar10', 'jpeg', 90)
  assert manifest['tfds_version'] and manifest['image_shape'] == [32, 32, 3]
  assert len(manifest['classes']) == 10
  files = _image_files(out)
  assert len(files) == 24 and all(name.endswith('.jpg') for name in files)
  for split in ('train', 'test'):
    assert manifest['splits'][split]['images'] == 12
    assert sum(manifest['splits'][split]['images_per_class']) == 12
    assert sum(name.startswith(split + os.sep) for name in files) == 12

  again = _export('--dataset=cifar10', f'--out={out}')  # Not over an earlier export.
  assert again.returncode == 2
  assert again.stderr.strip() == (f'error: --out={out} exists and is not an empty folder; '
                                  f'choose a new folder')


def test_png_folder_loads_back_as_the_same_images(tmp_path, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  monkeypatch.setattr(datasets, '_check_reachable', lambda urls: None)
  with tfds.testing.mock_data(num_examples=12):
    source = data.load_dataset('cifar10', data_dir=str(tmp_path / 'tfds'))
  out = str(tmp_path / 'cifar10-png')
  manifest = export_imagefolder.export(source, out)
  assert (manifest['format'], manifest['jpeg_quality']) == ('png', None)
  folder = data.load_dataset('imagefolder', out, cache_dir=str(tmp_path / 'cache'))
  for split in ('train', 'test'):
    images, labels = getattr(source, f'{split}_images'), getattr(source, f'{split}_labels')
    loaded_images = getattr(folder, f'{split}_images')
    loaded_names = [folder.class_names[label] for label in getattr(folder, f'{split}_labels')]
    # The folder is sorted by class, then by index: the split's order within each class.
    order = sorted(range(len(labels)), key=lambda i: (source.class_names[labels[i]], i))
    assert loaded_names == [source.class_names[labels[i]] for i in order]
    np.testing.assert_array_equal(loaded_images, images[order])  # PNG is lossless.
