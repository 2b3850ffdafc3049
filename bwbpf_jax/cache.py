"""Where the library keeps what it derives and can rebuild: decoded datasets, compiled kernels."""

import os


def cache_dir() -> str:
  """`$BWBPF_CACHE_DIR`, else ~/.cache/bwbpf_jax."""
  return os.environ.get('BWBPF_CACHE_DIR') or os.path.join(
      os.path.expanduser('~'), '.cache', 'bwbpf_jax')
