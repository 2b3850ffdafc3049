"""bwbpf_jax.cache: the one folder for what the library derives and can rebuild."""

import os
from unittest import mock

from absl.testing import absltest

from bwbpf_jax import cache


class CacheDirTest(absltest.TestCase):

  def test_environment_variable_wins_and_is_read_at_each_call(self):
    folder = self.create_tempdir().full_path
    with mock.patch.dict(os.environ, {'BWBPF_CACHE_DIR': folder}):
      self.assertEqual(cache.cache_dir(), folder)
    with mock.patch.dict(os.environ, {'BWBPF_CACHE_DIR': os.path.join(folder, 'other')}):
      self.assertEqual(cache.cache_dir(), os.path.join(folder, 'other'))

  def test_unset_or_empty_falls_back_to_the_home_cache(self):
    home = self.create_tempdir().full_path
    expected = os.path.join(home, '.cache', 'bwbpf_jax')
    for value in (None, ''):
      environ = {name: v for name, v in os.environ.items() if name != 'BWBPF_CACHE_DIR'}
      environ['HOME'] = home
      if value is not None:
        environ['BWBPF_CACHE_DIR'] = value
      with mock.patch.dict(os.environ, environ, clear=True):
        self.assertEqual(cache.cache_dir(), expected, repr(value))


if __name__ == '__main__':
  absltest.main()
