"""XLA settings for the command-line programs, applied before JAX starts.

XLA's CPU convolutions default to YNNPACK, which computes weight gradients
several times slower than XLA's Eigen convolutions on x86 (33-37 against
97-139 GFLOP/s measured for VGG layers); this routes them to Eigen. The flag
is read by the CPU backend only, so GPU and TPU runs are unaffected. A flag
the installed jaxlib does not know aborts XLA: re-check it when upgrading jax.
"""

import os

CPU_CONV_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'


def add_flag(flag: str) -> None:
  """Adds `--option=value` to XLA_FLAGS unless the option is there already (the user's
  value wins, and a process that inherits the flag does not repeat it)."""
  flags = os.environ.get('XLA_FLAGS', '')
  if flag.split('=')[0] + '=' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {flag}'.strip()


def apply():
  """Adds the CPU convolution flag to XLA_FLAGS unless the user set that option."""
  add_flag(CPU_CONV_FLAG)
