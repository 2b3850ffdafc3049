"""The Colab notebook executes top to bottom (on CPU, with its smoke setting)."""

import os

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


if __name__ == '__main__':
  absltest.main()
