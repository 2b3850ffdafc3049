"""The oneDNN convolution (XLA FFI on CPU) against XLA's, and where the library uses it."""

import os
import platform
import shutil
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
from jax import lax
import jax.numpy as jnp
import pytest

from bwbpf_jax.models import layers
from bwbpf_jax.models import onednn_conv

_NHWC = ('NHWC', 'HWIO', 'NHWC')


# Why the oneDNN convolution may rightly be missing; any other reason (a failed
# build, say) is a failure, not a skip.
_EXPECTED_ABSENCES = ('oneDNN not installed', 'no C++ compiler', 'disabled by')


def setUpModule():
  # requirements.txt installs oneDNN on Linux x86-64 only; elsewhere, or without a
  # C++ compiler or the oneDNN wheels, the library keeps XLA's convolution and
  # there is nothing here to test.
  if not (sys.platform.startswith('linux') and platform.machine() == 'x86_64'):
    raise absltest.SkipTest(f'oneDNN is installed on Linux x86-64 only, not on '
                            f'{sys.platform} {platform.machine()}')
  if shutil.which(os.environ.get('CXX', 'g++')) is None:
    raise absltest.SkipTest('no C++ compiler to build the oneDNN convolution')
  reason = onednn_conv.unavailable_reason()
  if reason.startswith(_EXPECTED_ABSENCES):
    raise absltest.SkipTest(f'oneDNN convolution unavailable: {reason}')


def _compiled_hlo(fn, *args) -> str:
  """The optimised HLO XLA:CPU compiles `fn` to: what actually runs."""
  return jax.jit(fn).lower(*args).compile().as_text()


class OnednnConvolutionTest(parameterized.TestCase):

  def test_builds_and_registers(self):
    self.assertEqual(onednn_conv.unavailable_reason(), '')
    self.assertTrue(onednn_conv.available())

  @parameterized.named_parameters(
      ('3x3_same', (4, 9, 9, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1))),
      ('3x3_stride2', (2, 8, 8, 6), (3, 3, 6, 4), (2, 2), ((1, 1), (1, 1))),
      ('1x1', (2, 8, 8, 6), (1, 1, 6, 16), (1, 1), ((0, 0), (0, 0))),
      ('1x1_projection', (2, 7, 8, 4), (1, 1, 4, 16), (2, 2), ((0, 0), (0, 0))),
      ('map_smaller_than_kernel', (3, 2, 2, 8), (3, 3, 8, 8), (1, 1), ((1, 1), (1, 1))),
      ('7x7_stem', (2, 15, 15, 3), (7, 7, 3, 4), (2, 2), ((3, 3), (3, 3))),
      ('asymmetric', (2, 7, 6, 5), (3, 2, 5, 3), (1, 2), ((0, 2), (1, 0))),
  )
  def test_values_and_gradients_match_xla(self, x_shape, w_shape, strides, padding):
    key_x, key_w = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, x_shape)
    w = jax.random.normal(key_w, w_shape)

    def loss(convolution, x, w):
      return jnp.sum(jnp.sin(convolution(x, w)))

    ours = lambda x, w: onednn_conv.conv(x, w, strides, padding)
    xla = lambda x, w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                                precision='highest')
    chex.assert_trees_all_close(
        jax.jit(jax.value_and_grad(lambda x, w: loss(ours, x, w), (0, 1)))(x, w),
        jax.jit(jax.value_and_grad(lambda x, w: loss(xla, x, w), (0, 1)))(x, w),
        rtol=1e-5, atol=1e-4)

  def test_strided_1x1_never_reaches_onednn_strided(self):
    # oneDNN 3.2 writes past its scratchpad on these (see onednn_conv.handles).
    zero, one = ((0, 0), (0, 0)), ((1, 1), (1, 1))
    self.assertTrue(onednn_conv.handles((1, 1, 4, 8), (2, 2), zero))
    self.assertFalse(onednn_conv.handles((1, 1, 4, 8), (2, 2), one))
    self.assertTrue(onednn_conv.handles((3, 3, 4, 8), (2, 2), one))
    with self.assertRaisesRegex(ValueError, 'padded 1x1 kernel with strides'):
      onednn_conv.conv(jnp.zeros((2, 8, 8, 4)), jnp.zeros((1, 1, 4, 8)), (2, 2), one)
    conv = lambda x, w: onednn_conv.conv(x, w, (2, 2), zero)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(conv(x, w)), (0, 1)))(
        jnp.zeros((2, 8, 8, 4)), jnp.zeros((1, 1, 4, 8))))
    self.assertIn("('stride_h', np.int64(1))", jaxpr)
    self.assertNotIn("('stride_h', np.int64(2))", jaxpr)

  def test_vmap_matches_xla(self):
    """Under vmap (one handler call per item) values and gradients are XLA's."""
    xs = jax.random.normal(jax.random.key(1), (3, 2, 6, 6, 4))
    ws = jax.random.normal(jax.random.key(2), (3, 3, 3, 4, 5))
    strides, padding = (2, 1), ((1, 1), (0, 1))
    ours = lambda x, w: onednn_conv.conv(x, w, strides, padding)
    xla = lambda x, w: lax.conv_general_dilated(x, w, strides, padding,
                                                dimension_numbers=_NHWC, precision='highest')
    per_item = lambda conv: jax.jit(jax.vmap(jax.value_and_grad(
        lambda x, w: jnp.sum(jnp.sin(conv(x, w))), (0, 1))))
    chex.assert_trees_all_close(per_item(ours)(xs, ws), per_item(xla)(xs, ws),
                                rtol=1e-5, atol=1e-4)
    # A batched input with one shared kernel.
    chex.assert_trees_all_close(jax.jit(jax.vmap(lambda x: ours(x, ws[0])))(xs),
                                jax.jit(jax.vmap(lambda x: xla(x, ws[0])))(xs),
                                rtol=1e-5, atol=1e-4)


class LibraryConvolutionTest(absltest.TestCase):
  """`layers.conv_general_dilated` takes oneDNN on one CPU device, XLA elsewhere."""

  def _lowered(self, x, platform='cpu'):
    conv = layers.conv(8, 3, use_bias=False, dtype=x.dtype)
    variables = conv.init(jax.random.key(0), x)
    return jax.jit(conv.apply).trace(variables, x).lower(
        lowering_platforms=(platform,)).as_text()

  def _compiled(self, x):
    """What XLA:CPU compiles the convolution layer to."""
    conv = layers.conv(8, 3, use_bias=False, dtype=x.dtype)
    return _compiled_hlo(conv.apply, conv.init(jax.random.key(0), x), x)

  def test_float32_on_cpu_is_the_onednn_custom_call(self):
    compiled = self._compiled(jnp.zeros((2, 8, 8, 4)))
    self.assertIn('custom_call_target="bwbpf_onednn_conv_forward"', compiled)
    self.assertNotIn('convolution(', compiled)

  def test_strided_1x1_runs_as_a_subsample_and_a_unit_stride_1x1(self):
    """A projection shortcut: oneDNN at unit stride on every 2nd pixel, forward and backward."""
    x = jax.random.normal(jax.random.key(0), (2, 7, 8, 4))  # Odd height: the edge counts.
    shortcut = layers.conv(8, 1, 2, use_bias=False, dtype=jnp.float32)
    variables = shortcut.init(jax.random.key(1), x)
    loss = lambda v, x: jnp.sum(jnp.sin(shortcut.apply(v, x)))
    compiled = _compiled_hlo(jax.grad(loss, (0, 1)), variables, x)
    self.assertNotIn('convolution(', compiled)
    for target in ('forward', 'input_grad', 'kernel_grad'):
      self.assertIn(f'bwbpf_onednn_conv_{target}', compiled)
    with layers.xla_convolutions():
      expected = jax.jit(jax.value_and_grad(loss, (0, 1)))(variables, x)
    chex.assert_trees_all_close(jax.jit(jax.value_and_grad(loss, (0, 1)))(variables, x),
                                expected, rtol=1e-5, atol=1e-5)

  def test_accelerators_and_bfloat16_keep_xla(self):
    # No GPU or TPU compiler here: their lowering is what can be read.
    for platform_name in ('cuda', 'tpu'):
      lowered = self._lowered(jnp.zeros((2, 8, 8, 4)), platform_name)
      self.assertIn('convolution', lowered)
      self.assertNotIn('bwbpf_onednn', lowered)
    compiled = self._compiled(jnp.zeros((2, 8, 8, 4), jnp.bfloat16))
    self.assertIn('convolution(', compiled)
    self.assertNotIn('bwbpf_onednn', compiled)

  def test_xla_convolutions_context_keeps_xla(self):
    with layers.xla_convolutions():
      compiled = self._compiled(jnp.zeros((2, 8, 8, 4)))
    self.assertIn('convolution(', compiled)
    self.assertNotIn('bwbpf_onednn', compiled)
    self.assertIn('bwbpf_onednn', self._compiled(jnp.zeros((2, 8, 8, 4))))  # Restored after.

  def test_train_step_gradients_go_through_onednn(self):
    conv = layers.conv(8, 3, stride=2, use_bias=False, dtype=jnp.float32)
    x = jnp.ones((2, 8, 8, 4))
    variables = conv.init(jax.random.key(0), x)
    grad = jax.jit(jax.grad(lambda v, x: jnp.sum(conv.apply(v, x) ** 2), argnums=(0, 1)))
    text = grad.lower(variables, x).as_text()
    self.assertIn('bwbpf_onednn_conv_input_grad', text)
    self.assertIn('bwbpf_onednn_conv_kernel_grad', text)

  @pytest.mark.slow
  def test_environment_switch_keeps_xla(self):
    # What XLA:CPU compiles, with the switch off (XLA's convolution) and on (oneDNN's).
    code = ('import jax, jax.numpy as jnp; from bwbpf_jax.models import layers, onednn_conv as o; '
            'conv = layers.conv(4, 3, use_bias=False, dtype=jnp.float32); x = jnp.ones((1, 4, 4, 2)); '
            'v = conv.init(jax.random.key(0), x); '
            'hlo = jax.jit(conv.apply).lower(v, x).compile().as_text(); '
            'print(o.available(), "convolution(" in hlo, "bwbpf_onednn" in hlo)')
    for switch, expected in (('0', 'False True False'), ('1', 'True False True')):
      output = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                              check=True, env={**os.environ, 'BWBPF_ONEDNN_CONV': switch}).stdout
      self.assertEqual(output.strip(), expected, f'BWBPF_ONEDNN_CONV={switch}')

  def test_without_a_compiler_the_library_falls_back_to_xla(self):
    code = ('import jax, jax.numpy as jnp; from bwbpf_jax.models import layers, onednn_conv as o; '
            'conv = layers.conv(4, 3, use_bias=False, dtype=jnp.float32); x = jnp.ones((1, 4, 4, 2)); '
            'v = conv.init(jax.random.key(0), x); '
            'print(o.available(), "convolution" in jax.jit(conv.apply).lower(v, x).as_text())')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            check=True, env={**os.environ, 'CXX': 'no-such-compiler'})
    self.assertEqual(result.stdout.strip(), 'False True')
    self.assertIn('no C++ compiler (no-such-compiler)', result.stderr)


@pytest.mark.slow  # Compiles the library with g++.
class CachedBuildTest(absltest.TestCase):

  def test_an_empty_cached_library_is_rebuilt_and_used(self):
    # An interrupted copy leaves a 0-byte .so at the cached path; loading it fails,
    # and the library must compile it again rather than keep XLA's convolution.
    code = ('import jax, jax.numpy as jnp; from bwbpf_jax.models import onednn_conv as o; '
            'path = o._library_path(); path.parent.mkdir(parents=True, exist_ok=True); path.write_bytes(b""); '
            'available = o.available(); '
            'y = jax.jit(lambda x, w: o.conv(x, w, (1, 1), ((1, 1), (1, 1))))('
            'jnp.ones((1, 3, 3, 1)), jnp.ones((3, 3, 1, 1))); '
            'print(available, path.stat().st_size > 0, float(y[0, 1, 1, 0]))')
    cache_dir = self.create_tempdir().full_path
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            check=False, env={**os.environ, 'BWBPF_CACHE_DIR': cache_dir})
    self.assertEqual(result.returncode, 0, result.stderr)
    self.assertEqual(result.stdout.strip(), 'True True 9.0')
    self.assertIn('rebuilding it', result.stderr)


if __name__ == '__main__':
  absltest.main()
