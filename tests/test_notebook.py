"""The Colab notebook executes top to bottom (on CPU, with its smoke setting).

Its install helpers (code from a git URL or an uploaded zip, the JAX check) are
exercised on their own: the notebook's CPU run skips them, as it is not in Colab.
"""

import ast
import os
import subprocess
import sys
import types
import zipfile

from absl.testing import absltest
import nbclient
import nbformat
import pytest

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        'notebooks', 'bwbpf_colab_tpu.ipynb')

# Runs the whole notebook in a kernel of its own: minutes, not an edit-test loop's seconds.
pytestmark = pytest.mark.slow


class NotebookTest(absltest.TestCase):

  def test_notebook_runs_sharded_and_plots(self):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    saved = dict(os.environ)
    # The kernel inherits the environment: 8 emulated CPU devices, as on a TPU v2-8, so
    # parallel='auto' takes the sharded data-parallel step, and the block-parallel
    # section runs the stage pipeline on 4 stages x 2 data rows.
    os.environ['BWBPF_NOTEBOOK_SMOKE'] = '1'
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               ' --xla_force_host_platform_device_count=8')
    try:
      nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                              resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}}
                              ).execute()
    finally:
      os.environ.clear()
      os.environ.update(saved)
    outputs = [o for cell in notebook.cells if cell.cell_type == 'code'
               for o in cell.get('outputs', [])]
    texts = ''.join(o.get('text', '') + str(o.get('data', {}).get('text/plain', ''))
                    for o in outputs)
    self.assertIn('test_accuracy', texts)
    self.assertIn("'num_devices': 8, 'parallel': 'data'", texts)
    self.assertIn("'mesh': {'data': 2, 'stage': 4}, 'num_devices': 8, 'parallel': 'blocks'",
                  texts)
    self.assertTrue(any('image/png' in o.get('data', {}) for o in outputs))


def _install_helpers(**names) -> dict:
  """fetch_code and check_jax from the notebook's first code cell, with `names` as its globals."""
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  cell = next(c for c in notebook.cells if c.cell_type == 'code')
  tree = ast.parse(cell.source)
  functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
  namespace = {'os': os, 'subprocess': subprocess, 'sys': sys, **names}
  exec(compile(ast.Module(body=functions, type_ignores=[]), NOTEBOOK, 'exec'), namespace)  # pylint: disable=exec-used
  return namespace


class NotebookInstallTest(absltest.TestCase):

  def _repository(self) -> str:
    """A small git repository with the project's layout."""
    root = self.create_tempdir().full_path
    os.makedirs(os.path.join(root, 'bwbpf_jax'))
    with open(os.path.join(root, 'bwbpf_jax', '__init__.py'), 'w') as f:
      f.write('')
    git = lambda *args: subprocess.run(['git', '-C', root, *args], check=True,
                                       capture_output=True)
    git('init', '-q')
    git('add', '-A')
    git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'layout')
    return root

  def test_code_from_a_git_url(self):
    code = os.path.join(self.create_tempdir().full_path, 'code')
    helpers = _install_helpers(REPO_URL=self._repository(), CODE=code, ZIP='/nonexistent.zip')
    helpers['fetch_code']()
    self.assertTrue(os.path.isfile(os.path.join(code, 'bwbpf_jax', '__init__.py')))

  def test_a_bad_git_url_says_what_to_do(self):
    helpers = _install_helpers(REPO_URL=os.path.join(self.create_tempdir().full_path, 'none'),
                               CODE=os.path.join(self.create_tempdir().full_path, 'code'),
                               ZIP='/nonexistent.zip')
    with self.assertRaisesRegex(SystemExit, 'Check the URL .* or leave REPO_URL empty and '
                                'upload a zip'):
      helpers['fetch_code']()

  def test_code_from_an_uploaded_zip_of_the_folder(self):
    repository = self._repository()
    archive = os.path.join(self.create_tempdir().full_path, 'bwbpf_jax.zip')
    with zipfile.ZipFile(archive, 'w') as f:  # The folder itself zipped: one top folder.
      f.write(os.path.join(repository, 'bwbpf_jax', '__init__.py'),
              'bwbpf_jax-main/bwbpf_jax/__init__.py')
    code = os.path.join(self.create_tempdir().full_path, 'code')
    helpers = _install_helpers(REPO_URL='', CODE=code, ZIP=archive)
    helpers['fetch_code']()
    self.assertTrue(os.path.isfile(os.path.join(code, 'bwbpf_jax', '__init__.py')))

  def test_neither_url_nor_zip_says_what_to_give(self):
    colab = types.ModuleType('google.colab')
    colab.files = types.SimpleNamespace(upload=lambda: {})  # The user cancelled the upload.
    saved = {name: sys.modules.get(name) for name in ('google', 'google.colab')}
    sys.modules['google.colab'] = colab
    try:
      folder = self.create_tempdir().full_path
      helpers = _install_helpers(REPO_URL='', ZIP=os.path.join(folder, 'absent.zip'),
                                 CODE=os.path.join(folder, 'code'))
      with self.assertRaisesRegex(SystemExit, 'Neither REPO_URL nor a zip was given: fill in '
                                  'REPO_URL .* or upload bwbpf_jax.zip'):
        helpers['fetch_code']()
    finally:
      for name, module in saved.items():
        if module is None:
          sys.modules.pop(name, None)
        else:
          sys.modules[name] = module

  def test_jax_older_than_the_pin_says_what_to_do(self):
    from importlib.metadata import version  # pylint: disable=g-import-not-at-top
    requirements = os.path.join(self.create_tempdir().full_path, 'requirements.txt')
    helpers = _install_helpers()
    with open(requirements, 'w') as f:
      f.write('# pins\njax==99.0.0\nflax==1\n')
    with self.assertRaisesRegex(SystemExit, f"This runtime's JAX is {version('jax')}, older "
                                f"than the project's 99.0.0. Pick the newest runtime"):
      helpers['check_jax'](requirements)
    with open(requirements, 'w') as f:
      f.write('jax==0.0.1\n')
    self.assertEqual(helpers['check_jax'](requirements), (version('jax'), '0.0.1'))


if __name__ == '__main__':
  absltest.main()
