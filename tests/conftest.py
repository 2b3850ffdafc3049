"""Test-wide settings, applied before JAX starts.

Tests check values, not speed, so XLA compiles with little optimisation: on the
2-core CPU this roughly halves compile time, which dominates the suite.

Compiled programs go to a persistent JAX compilation cache, set in the
environment so that every process the tests start (command-line runs,
8-device re-runs, multi-process runs) reads and adds to the same one: many of
them compile the very programs another already compiled. It lives in
`$JAX_COMPILATION_CACHE_DIR` if set, else in `jax_test_cache` under the
library's cache folder (`$BWBPF_CACHE_DIR`, default ~/.cache/bwbpf_jax);
`JAX_ENABLE_COMPILATION_CACHE=false` turns it off. An entry is keyed on the
program, the XLA flags and the jax version, so a stale one is never used; the
folder is trimmed to its newest entries when it grows past `_CACHE_MAX_BYTES`.
The key also holds the folder's own path (jax names a folder inside it in the
compile options), so a copied or moved folder starts cold.
"""

import os
import signal

from experiments import xla_defaults  # pylint: disable=g-import-not-at-top

# Once: pytest-xdist's workers and the pytest processes tests start import this file again
# with the flag inherited. The cache key hashes XLA_FLAGS as written, so a repeated flag
# would keep `pytest -n auto` and `pytest tests/one_file.py` from sharing cached programs.
xla_defaults.add_flag('--xla_backend_optimization_level=0')
# The command line's convolution setting, in every test process from the start: whether
# a test module imported experiments.main before XLA started no longer decides it (nor,
# through XLA_FLAGS, the cache keys).
xla_defaults.apply()

# A full suite writes about 1,500 entries, 35-50 MB (measured); room for many versions.
_CACHE_MAX_BYTES = 2 << 30


def _trim_cache(folder: str, max_bytes: int) -> None:
  """Deletes the oldest entries until the folder holds at most `max_bytes / 2`."""
  entries = []
  with os.scandir(folder) as listing:
    for entry in listing:
      if entry.is_file():
        stat = entry.stat()
        entries.append((stat.st_mtime, stat.st_size, entry.path))
  total = sum(size for _, size, _ in entries)
  if total <= max_bytes:
    return
  for _, size, path in sorted(entries):
    if total <= max_bytes // 2:
      break
    try:
      os.remove(path)
      total -= size
    except FileNotFoundError:
      pass


def _use_persistent_compilation_cache() -> None:
  if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    # bwbpf_jax.cache.cache_dir(), which cannot be imported before JAX is configured.
    library_cache = os.environ.get('BWBPF_CACHE_DIR') or os.path.join(
        os.path.expanduser('~'), '.cache', 'bwbpf_jax')
    os.environ['JAX_COMPILATION_CACHE_DIR'] = os.path.join(library_cache, 'jax_test_cache')
  # Cache every program: most here compile in well under JAX's default 1 s threshold,
  # but a subprocess compiles hundreds of them.
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
  folder = os.environ['JAX_COMPILATION_CACHE_DIR']
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError:  # A read-only home: the suite runs, compiling everything.
    del os.environ['JAX_COMPILATION_CACHE_DIR']
    return
  # Once per run: in the controlling process, not in each pytest-xdist worker or re-run.
  if 'PYTEST_XDIST_WORKER' not in os.environ and 'BWBPF_TEST_CACHE_TRIMMED' not in os.environ:
    os.environ['BWBPF_TEST_CACHE_TRIMMED'] = '1'
    _trim_cache(folder, _CACHE_MAX_BYTES)


_use_persistent_compilation_cache()


def _receive_sigint_as_a_terminal_would() -> None:
  """Undoes an inherited 'SIGINT ignored' in this process, and so in those it starts.

  A suite started in the background of a script (`pytest ... &`) inherits SIGINT
  ignored; the command-line runs the tests start would then keep ignoring it, as a
  user's background run rightly does, and the tests that send one a Ctrl-C fail.
  """
  if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


_receive_sigint_as_a_terminal_would()

import jax  # pylint: disable=g-import-not-at-top

jax.config.update('jax_default_matmul_precision', 'highest')

from absl import flags  # pylint: disable=g-import-not-at-top

# absltest's create_tempdir reads absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()
