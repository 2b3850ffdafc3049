"""tests/conftest.py's persistent compilation cache: the session and its subprocesses share it."""

import os
import subprocess
import sys
import time
import uuid

import conftest
import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_session_and_a_subprocess_use_one_cache_folder():
  if os.environ.get('JAX_ENABLE_COMPILATION_CACHE', '').lower() in ('false', '0'):
    pytest.skip('the cache is turned off (JAX_ENABLE_COMPILATION_CACHE)')
  folder = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  assert folder, 'conftest set no cache folder (or could not create it)'
  assert jax.config.jax_compilation_cache_dir == folder
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
  # A program no run compiled before (a constant of its own), compiled in a fresh process
  # that inherits only the environment: its entry lands in the session's folder.
  marker = uuid.uuid4().int % 1_000_003
  code = (f'import jax, jax.numpy as jnp; '
          f'print(float(jax.jit(lambda x: x * {marker}.0 + 1.0)(jnp.float32(2))))')
  before = set(os.listdir(folder))
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, 'PYTHONPATH': REPO}, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert float(proc.stdout.split()[-1]) == marker * 2.0 + 1.0
  assert any(name.startswith('jit_') for name in set(os.listdir(folder)) - before)


def test_trim_keeps_the_newest_entries_under_half_the_limit(tmp_path):
  now = time.time()
  for age in range(10):
    path = tmp_path / f'entry{age}'
    path.write_bytes(b'x' * 100)
    os.utime(path, (now - age, now - age))
  conftest._trim_cache(str(tmp_path), max_bytes=1000)  # 1000 bytes: within the limit.
  assert len(os.listdir(tmp_path)) == 10
  conftest._trim_cache(str(tmp_path), max_bytes=900)
  assert sorted(os.listdir(tmp_path)) == [f'entry{age}' for age in range(4)]
