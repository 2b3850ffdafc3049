"""The package's surface: what `import bwbpf_jax as bw` makes reachable."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sub_packages_are_attributes_of_a_fresh_import():
  # A fresh process: in the test session other modules may have imported them already.
  code = ('import bwbpf_jax as bw; '
          'print(bw.data.load_dataset.__name__, bw.parallel.__name__, bw.cost.__name__, '
          'bw.checkpoint.__name__)')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, 'PYTHONPATH': REPO}, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ['load_dataset', 'bwbpf_jax.parallel', 'bwbpf_jax.cost',
                                 'bwbpf_jax.checkpoint']
