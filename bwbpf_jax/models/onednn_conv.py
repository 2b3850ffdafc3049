"""oneDNN convolutions for XLA:CPU, through XLA's FFI.

XLA:CPU runs convolutions on Eigen, which on an AVX-512 CPU is about 1.4x slower
than the oneDNN kernels PyTorch uses (`python -m benchmarks.layer_bench
--compare_torch`); on a VGG that is the whole gap between the two frameworks'
train steps. This module runs the convolution's three train-step kernels
(forward, input gradient, kernel gradient) in oneDNN instead, as XLA FFI custom
calls on XLA's own buffers, tied together by a `custom_vjp`.

The handlers (`onednn_conv.cc`) are compiled with the system C++ compiler on
first use against jaxlib's FFI headers and the oneDNN that requirements.txt
installs (`onednn-cpu-gomp`, `onednn-devel-cpu-gomp`), and cached by content
in `cache.cache_dir()` ($BWBPF_CACHE_DIR, else ~/.cache/bwbpf_jax). Where any
piece is missing, `available()` is False, `unavailable_reason()` says why, and
the library keeps XLA's convolution.

Only first derivatives exist (`custom_vjp`), which is all training needs.
"""

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from bwbpf_jax import cache

_SOURCE = pathlib.Path(__file__).with_name('onednn_conv.cc')
_TARGETS = {  # FFI target name -> exported handler symbol.
    'bwbpf_onednn_conv_forward': 'BwbpfOnednnConvForward',
    'bwbpf_onednn_conv_input_grad': 'BwbpfOnednnConvInputGrad',
    'bwbpf_onednn_conv_kernel_grad': 'BwbpfOnednnConvKernelGrad',
}
_NHWC = ('NHWC', 'HWIO', 'NHWC')
_DISABLE_ENV = 'BWBPF_ONEDNN_CONV'  # Set to 0 to keep XLA's convolution on CPU.


def _onednn_root() -> pathlib.Path:
  """Where pip put oneDNN's library and headers (the environment's data root)."""
  return pathlib.Path(sys.prefix)


def _compile_command(output: pathlib.Path) -> list:
  root = _onednn_root()
  return [os.environ.get('CXX', 'g++'), '-O2', '-std=c++17', '-shared', '-fPIC', '-w',
          f'-I{jax.ffi.include_dir()}', f'-I{root / "include"}', str(_SOURCE),
          f'-L{root / "lib"}', '-ldnnl', f'-Wl,-rpath,{root / "lib"}', '-o', str(output)]


def _library_path() -> pathlib.Path:
  """The cached .so, named by content: (source, jaxlib, oneDNN, compiler command)."""
  root = _onednn_root()
  digest = hashlib.sha256()
  digest.update(_SOURCE.read_bytes())
  digest.update(jax.__version__.encode())
  digest.update(os.fsencode(os.path.realpath(root / 'lib' / 'libdnnl.so')))
  digest.update(' '.join(_compile_command(pathlib.Path('out'))).encode())
  return pathlib.Path(cache.cache_dir()) / f'onednn_conv-{digest.hexdigest()[:16]}.so'


def _build(rebuild: bool = False) -> pathlib.Path:
  """Compiles the handlers once per `_library_path()`; returns the .so.

  With `rebuild`, a cached library is compiled again (it failed to load).
  """
  root = _onednn_root()
  for needed in (root / 'include' / 'oneapi' / 'dnnl' / 'dnnl.hpp', root / 'lib' / 'libdnnl.so'):
    if not needed.exists():
      raise RuntimeError(f'oneDNN not installed ({needed} missing; pip install -r requirements.txt)')
  compiler = os.environ.get('CXX', 'g++')
  if shutil.which(compiler) is None:
    raise RuntimeError(f'no C++ compiler ({compiler}) on PATH')
  library = _library_path()
  if library.exists() and not rebuild:
    return library
  library.parent.mkdir(parents=True, exist_ok=True)
  # Build beside the target and rename: concurrent builders (test workers) never
  # see a half-written library.
  fd, partial = tempfile.mkstemp(suffix='.so', dir=library.parent)
  os.close(fd)
  try:
    result = subprocess.run(_compile_command(pathlib.Path(partial)), capture_output=True,
                            text=True, check=False)
    if result.returncode:
      raise RuntimeError(f'compiling {_SOURCE.name} failed: {result.stderr.strip()[-2000:]}')
    os.replace(partial, library)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return library


def _open(library: pathlib.Path) -> dict:
  """Loads the .so; returns its handlers by FFI target. OSError if it is not a whole build."""
  loaded = ctypes.cdll.LoadLibrary(str(library))
  try:
    return {target: getattr(loaded, symbol) for target, symbol in _TARGETS.items()}
  except AttributeError as e:
    raise OSError(f'{library} lacks a handler: {e}') from None


@functools.cache
def _load() -> str:
  """Builds, loads and registers the handlers; returns '' or why they are unavailable."""
  if os.environ.get(_DISABLE_ENV, '1') == '0':
    return f'disabled by {_DISABLE_ENV}=0'
  try:
    library = _build()
    try:
      handlers = _open(library)
    except OSError as e:
      # A cached build cut short (a full disk, a killed copy) or corrupted: build it
      # once more rather than keep XLA's slower convolution in every later run.
      logging.warning('cached oneDNN convolution does not load (%s); rebuilding it', e)
      handlers = _open(_build(rebuild=True))
  except (RuntimeError, OSError) as e:
    logging.warning('oneDNN convolution unavailable, XLA:CPU convolutions run instead: %s', e)
    return str(e)
  for target, handler in handlers.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform='cpu')
  return ''


def unavailable_reason() -> str:
  """Why the oneDNN convolution cannot run here ('' when it can)."""
  return _load()


def handles(kernel_shape, strides, padding) -> bool:
  """Whether `conv` runs a convolution of this HWIO kernel, strides and padding.

  Everything but a padded 1x1 kernel with a stride above 1. oneDNN 3.2 (the
  pinned onednn-cpu-gomp 2023.2) computes strided 1x1 gradients by first
  copying the input to unit stride, and with fewer input channels than its
  SIMD block that copy writes past its scratchpad: heap corruption with one
  thread; with an OpenMP team, both threads spinning forever on a barrier whose
  context the copy overwrote (a test run stalled for the 90 minutes CI allows).
  So `conv` never hands oneDNN a strided 1x1: unpadded, it is the same as a
  unit-stride 1x1 on every s-th pixel, which `conv` runs instead.
  """
  return not (_is_strided_1x1(kernel_shape, strides)
              and any(tuple(p) != (0, 0) for p in padding))


def _is_strided_1x1(kernel_shape, strides) -> bool:
  return tuple(kernel_shape[:2]) == (1, 1) and tuple(strides) != (1, 1)


def available() -> bool:
  """Whether the oneDNN convolution is built and registered (builds it on first call)."""
  return not _load()


def _geometry(strides, padding) -> dict:
  (top, bottom), (left, right) = padding
  return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
              pad_top=np.int64(top), pad_bottom=np.int64(bottom),
              pad_left=np.int64(left), pad_right=np.int64(right))


def _varying_axes(x) -> frozenset:
  """The mesh axes `x` varies over inside a `shard_map` (none outside one)."""
  return frozenset(jax.typeof(x).mat.varying)


def _call(target: str, shape, *operands, strides, padding):
  """The FFI call; its result varies over every mesh axis an operand varies over.

  A custom call carries no `shard_map` replication type of its own, so the
  result is marked varying the way XLA's convolution would be (a type cast,
  no communication).
  """
  out = jax.ShapeDtypeStruct(shape, jnp.float32)
  result = jax.ffi.ffi_call(target, out, vmap_method='sequential')(
      *operands, **_geometry(strides, padding))
  axes = tuple(sorted(frozenset().union(*map(_varying_axes, operands))))
  return lax.pcast(result, axes, to='varying') if axes else result


def _summed_to_varying_of(cotangent, primal):
  """A cotangent summed over the mesh axes its primal does not vary over, as AD would.

  The primal was implicitly broadcast to those axes (it is the same on each of
  their devices), and the transpose of a broadcast is a sum.
  """
  extra = tuple(sorted(_varying_axes(cotangent) - _varying_axes(primal)))
  return lax.psum(cotangent, extra) if extra else cotangent


def conv(x, w, strides, padding):
  """NHWC x HWIO float32 convolution in oneDNN. `padding`: ((top, bottom), (left, right)).

  A strided 1x1 runs as a unit-stride 1x1 on every s-th pixel (see `handles`);
  ValueError for what `handles` refuses.
  """
  if not handles(w.shape, strides, padding):
    raise ValueError(f'oneDNN convolution refuses a padded 1x1 kernel with strides '
                     f'{tuple(strides)} (see handles); use lax.conv_general_dilated')
  if _is_strided_1x1(w.shape, strides):
    x, strides = x[:, ::strides[0], ::strides[1]], (1, 1)
  return _conv(x, w, tuple(strides), padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, padding):
  """`conv` on what oneDNN runs correctly (no strided 1x1)."""
  shape = lax.conv_general_shape_tuple(x.shape, w.shape, strides, padding, _NHWC)
  return _call('bwbpf_onednn_conv_forward', tuple(map(int, shape)), x, w, strides=strides,
               padding=padding)


def _conv_forward(x, w, strides, padding):
  return _conv(x, w, strides, padding), (x, w)


def _conv_backward(strides, padding, residuals, dy):
  x, w = residuals
  dx = _call('bwbpf_onednn_conv_input_grad', x.shape, dy, w, strides=strides, padding=padding)
  dw = _call('bwbpf_onednn_conv_kernel_grad', w.shape, x, dy, strides=strides, padding=padding)
  return _summed_to_varying_of(dx, x), _summed_to_varying_of(dw, w)


_conv.defvjp(_conv_forward, _conv_backward)
