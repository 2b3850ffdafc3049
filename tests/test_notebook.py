"""The Colab notebook executes top to bottom (on CPU, with its smoke setting)."""

import os

from absl.testing import absltest
import nbclient
import nbformat

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        'notebooks', 'bwbpf_colab_tpu.ipynb')


class NotebookTest(absltest.TestCase):

  def test_notebook_runs_and_plots(self):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    os.environ['BWBPF_NOTEBOOK_SMOKE'] = '1'
    try:
      nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                              resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}}
                              ).execute()
    finally:
      del os.environ['BWBPF_NOTEBOOK_SMOKE']
    outputs = [o for cell in notebook.cells if cell.cell_type == 'code'
               for o in cell.get('outputs', [])]
    texts = ''.join(o.get('text', '') + str(o.get('data', {}).get('text/plain', ''))
                    for o in outputs)
    self.assertIn('test_accuracy', texts)
    self.assertTrue(any('image/png' in o.get('data', {}) for o in outputs))


if __name__ == '__main__':
  absltest.main()
