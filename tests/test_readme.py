"""The README's library snippet runs as written."""

import os
import re

import numpy as np
import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')


def _python_blocks(text):
  return re.findall(r'^```python\n(.*?)^```$', text, flags=re.DOTALL | re.MULTILINE)


@pytest.mark.slow  # Trains small networks in the README's own words.
def test_readme_library_snippets_run_as_written():
  with open(README) as f:
    blocks = _python_blocks(f.read())
  assert len(blocks) == 2, 'the README has two python snippets; check each one if that changes'
  own_network, library = blocks
  namespace = {}
  exec(compile(own_network, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  assert namespace['model'].arch == 'mixer' and namespace['model'].num_blocks == 2
  assert np.all(np.isfinite(np.asarray(namespace['metrics']['loss'])))
  namespace = {}
  exec(compile(library, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  losses = np.asarray(namespace['metrics']['loss'])
  assert losses.shape == (namespace['model'].num_blocks,) and np.all(np.isfinite(losses))
  assert np.asarray(namespace['sums']['correct']).shape == losses.shape
