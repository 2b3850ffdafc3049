"""Test-wide settings, applied before JAX starts.

Tests check values, not speed, so XLA compiles with little optimisation: on the
2-core CPU this roughly halves compile time, which dominates the suite.
"""

import os

os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_backend_optimization_level=0']).strip()

import jax  # pylint: disable=g-import-not-at-top

jax.config.update('jax_default_matmul_precision', 'highest')

from absl import flags  # pylint: disable=g-import-not-at-top

# absltest's create_tempdir reads absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()
