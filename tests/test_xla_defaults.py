"""XLA flags set before JAX starts: added once, and never over the user's own value."""

import os
from unittest import mock

from experiments import xla_defaults


def test_a_flag_is_added_once_and_the_users_value_wins():
  with mock.patch.dict(os.environ, {'XLA_FLAGS': '--xla_cpu_enable_fast_math=false'}):
    xla_defaults.add_flag('--xla_backend_optimization_level=0')
    xla_defaults.add_flag('--xla_backend_optimization_level=0')
    xla_defaults.add_flag('--xla_cpu_enable_fast_math=true')
    assert os.environ['XLA_FLAGS'] == ('--xla_cpu_enable_fast_math=false '
                                       '--xla_backend_optimization_level=0')
  with mock.patch.dict(os.environ, {'XLA_FLAGS': ''}):
    xla_defaults.apply()
    xla_defaults.apply()
    assert os.environ['XLA_FLAGS'] == xla_defaults.CPU_CONV_FLAG
