"""Console scripts of an installed bwbpf_jax: the command-line programs under short names.

`pip install .` ships this folder as `bwbpf_jax.experiments` (pyproject.toml), so the
runner is `bwbpf-train` or `python -m bwbpf_jax.experiments.main`; from a clone of
the repository it stays `python -m experiments.main`. Each script runs its module as
`python -m` would, so the module's own `__main__` block stays the one entry point.
"""

import runpy


def _run_as_main(module: str) -> None:
  runpy.run_module(f'{__package__}.{module}', run_name='__main__', alter_sys=True)


def train() -> None:
  """`bwbpf-train`: experiments/main.py (train and evaluate; --help lists the flags)."""
  _run_as_main('main')


def summarize() -> None:
  """`bwbpf-summarize`: experiments/summarize.py (a markdown table of finished runs)."""
  _run_as_main('summarize')


def export_imagefolder() -> None:
  """`bwbpf-export-imagefolder`: experiments/export_imagefolder.py (a tfds dataset as images)."""
  _run_as_main('export_imagefolder')
