"""The built wheel: only bwbpf_jax lands in site-packages, with its dependencies declared.

A user's own `experiments/` or `benchmarks/` must not be shadowed by ours, and
`pip install .` alone must give a library that imports; the command-line
programs come along inside the package (bwbpf_jax.experiments, console scripts).
"""

import email.parser
import os
import shutil
import subprocess
import sys
import zipfile

import packaging.requirements
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the wheel is built from: everything else in the repository stays out of it.
_SOURCES = ('pyproject.toml', 'README.md', 'bwbpf_jax', 'experiments')


def _requirement_name(requirement: str) -> str:
  for separator in '<>=!~;[ ':
    requirement = requirement.split(separator)[0]
  return requirement.lower().replace('_', '-')


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
  """Builds the wheel from a copy of the sources (the build writes folders beside them)."""
  source = tmp_path_factory.mktemp('source')
  for name in _SOURCES:
    path = os.path.join(REPO, name)
    if os.path.isdir(path):
      shutil.copytree(path, source / name, ignore=shutil.ignore_patterns('__pycache__', '*.so'))
    else:
      shutil.copy(path, source / name)
  out = tmp_path_factory.mktemp('wheel')
  proc = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                         '--no-index', '-q', str(source), '-w', str(out)],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (path,) = out.glob('*.whl')
  return path


@pytest.mark.slow  # Builds the wheel (about 15 s here) and imports it in a fresh process.
def test_wheel_holds_only_bwbpf_jax_with_its_dependencies_and_runner(wheel, tmp_path):
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    (metadata_name,) = [n for n in names if n.endswith('.dist-info/METADATA')]
    metadata = email.parser.Parser().parsestr(archive.read(metadata_name).decode())
    (entry_points_name,) = [n for n in names if n.endswith('.dist-info/entry_points.txt')]
    entry_points = archive.read(entry_points_name).decode()

  # One top-level name: no `experiments`, `benchmarks` or `tests` beside the library.
  dist_info = '-'.join(wheel.name.split('-')[:2]) + '.dist-info'
  assert {name.split('/')[0] for name in names} == {'bwbpf_jax', dist_info}
  # Every sub-package of the library (a new one must be listed in pyproject.toml), the
  # oneDNN source it compiles, and the command-line programs as bwbpf_jax.experiments.
  packages = sorted(os.path.relpath(root, REPO).replace(os.sep, '/')
                    for root, _, files in os.walk(os.path.join(REPO, 'bwbpf_jax'))
                    if '__init__.py' in files)
  for package in packages:
    assert f'{package}/__init__.py' in names, package
  assert 'bwbpf_jax/models/onednn_conv.cc' in names
  programs = sorted(name for name in os.listdir(os.path.join(REPO, 'experiments'))
                    if name.endswith('.py'))
  assert sorted(n[len('bwbpf_jax/experiments/'):] for n in names
                if n.startswith('bwbpf_jax/experiments/')) == programs

  # What `import bwbpf_jax` needs is required; the heavy parts are extras.
  required = {_requirement_name(r) for r in metadata.get_all('Requires-Dist')
              if 'extra ==' not in r}
  assert required == {'jax', 'flax', 'optax', 'orbax-checkpoint', 'absl-py', 'numpy', 'pillow'}
  extras = {}
  for requirement in metadata.get_all('Requires-Dist'):
    if 'extra ==' in requirement:
      extra = requirement.split('extra ==')[1].strip().strip('"\'')
      extras.setdefault(extra, set()).add(_requirement_name(requirement))
  assert extras == {
      'experiments': {'scikit-learn', 'matplotlib', 'tensorboardx'},
      'tfds': {'tensorflow-datasets', 'tensorflow-cpu', 'importlib-resources'},
      'onednn': {'onednn-cpu-gomp', 'onednn-devel-cpu-gomp'},
      'torch': {'torch'},
  }
  onednn = [r for r in metadata.get_all('Requires-Dist') if 'onednn' in r]
  assert all("platform_machine == \"x86_64\"" in r and 'sys_platform == "linux"' in r
             for r in onednn), onednn
  # The one-command install (requirements*.txt) lists each, its pins in the declared ranges.
  listed, pins = set(), {}
  for requirements in ('requirements.txt', 'requirements-bench.txt'):
    with open(os.path.join(REPO, requirements)) as f:
      for line in f:
        line = line.split('#')[0].strip()
        if line:
          listed.add(_requirement_name(line))
        if '==' in line:
          pins[_requirement_name(line)] = line.split('==')[1].split(';')[0].strip()
  for requirement in map(packaging.requirements.Requirement, metadata.get_all('Requires-Dist')):
    name = _requirement_name(requirement.name)
    assert name in listed or name == 'numpy', f'{name} is not in requirements*.txt'  # numpy: jax's.
    if name in pins:
      assert requirement.specifier.contains(pins[name]), (requirement, pins[name])
  for script in ('bwbpf-train', 'bwbpf-summarize', 'bwbpf-export-imagefolder'):
    assert f'{script} = bwbpf_jax.experiments.scripts:' in entry_points, entry_points

  # Installed (unpacked into a folder of its own) and run from elsewhere, without the
  # repository on the path: the runner and the modules it uses import as
  # bwbpf_jax.experiments, none pulls in a top-level `experiments`, and the runner answers
  # --help through its console script. (export_imagefolder imports only the library; in
  # this process it would define flags the runner defines too.)
  site = tmp_path / 'site'
  with zipfile.ZipFile(wheel) as archive:
    archive.extractall(site)
  code = ('import sys\n'
          'import bwbpf_jax.experiments.train, bwbpf_jax.experiments.summarize\n'
          'from bwbpf_jax.experiments import scripts\n'
          'assert "experiments" not in sys.modules, sys.modules["experiments"]\n'
          'assert bwbpf_jax.experiments.train.__file__.startswith(sys.argv[1])\n'
          'sys.argv = ["bwbpf-train", "--help"]\n'
          'scripts.train()\n')
  environ = {name: value for name, value in os.environ.items() if name != 'PYTHONPATH'}
  proc = subprocess.run([sys.executable, '-c', code, str(site)], cwd=tmp_path,
                        env={**environ, 'PYTHONPATH': str(site)}, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '--num_blocks' in proc.stdout + proc.stderr, proc.stdout[-2000:]
