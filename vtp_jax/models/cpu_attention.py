"""`precision.attention='cpu'`: softmax attention as a compiled XLA:CPU kernel (cpu_attention.cc).

XLA:CPU has no fused attention, and its batched (tokens x 64 x tokens) matmuls are slow on small
CPUs; this kernel computes each (batch, head) slice with one BLAS sgemm per product and a fused row
softmax, over XLA's own intra-op threads. It takes and returns the same heads-first
(batch, heads, tokens, head_dim) float32 arrays as `attention.softmax_attention`, with the same
backward (saved probabilities, FlashAttention's rowsum identity), so the two are interchangeable.

The C++ source ships with the package and is compiled on first use with the system C++ compiler
against the XLA FFI headers that jaxlib ships, into a per-user cache keyed by the source, jaxlib and
CPU. BLAS is scipy's (OpenBLAS in its wheels): sgemm's address comes from
`scipy.linalg.cython_blas`, so nothing is linked at build time. Under a mesh the call is wrapped
in `jax.shard_map` over the batch and head axes (attention is independent per slice), so every
device runs its own shard.
XLA cannot see inside the call, so its FLOP count of a step leaves out these matmuls; the analytic
count (train/flops.py) that MFU uses does not.
"""

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vtp_jax import sharding

SOURCE = pathlib.Path(__file__).with_suffix('.cc')
COMPILE_FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')
FORWARD_TARGET, BACKWARD_TARGET = 'vtp_attention_forward', 'vtp_attention_backward'
# The logical axes of the heads-first q, k, v (models/layers.py's Attention): batch and heads may be
# sharded, tokens and head_dim are whole on every device.
LOGICAL_AXES = ('act_batch', 'act_heads', 'act_seq', None)


def _cache_dir() -> pathlib.Path:
  root = os.environ.get('VTP_JAX_KERNEL_CACHE') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'vtp_jax', 'kernels')
  return pathlib.Path(root)


def _cpu_identity() -> str:
  """The CPU's model and instruction-set flags: a -march=native library runs only there."""
  try:
    lines = pathlib.Path('/proc/cpuinfo').read_text().splitlines()
    return ' '.join(sorted({l for l in lines if l.startswith(('model name', 'flags'))}))
  except OSError:
    return f'{platform.machine()} {platform.processor()}'


def compiler() -> str | None:
  """The C++ compiler the kernel is built with: $CXX, else g++, c++ or clang++; None if none."""
  for name in (os.environ.get('CXX'), 'g++', 'c++', 'clang++'):
    if name and shutil.which(name):
      return name
  return None


def _build() -> pathlib.Path:
  """Compiles cpu_attention.cc (once per source, jaxlib and CPU) and returns the library's path."""
  compiler_name = compiler()
  if compiler_name is None:
    raise RuntimeError("precision.attention='cpu' compiles a C++ kernel on first use, and no C++ "
                       "compiler was found (tried $CXX, g++, c++, clang++). Install one, or use "
                       "precision.attention='xla'.")
  key = hashlib.sha256('\0'.join([SOURCE.read_text(), jax.lib.__version__, ' '.join(COMPILE_FLAGS),
                                  compiler_name, _cpu_identity()]).encode()).hexdigest()[:16]
  target = _cache_dir() / f'vtp_cpu_attention_{key}.so'
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Built under a temporary name and renamed: processes compiling at once never load a partial file.
  with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
    partial = pathlib.Path(scratch) / target.name
    command = [compiler_name, *COMPILE_FLAGS, f'-I{jax.ffi.include_dir()}', str(SOURCE),
               '-o', str(partial)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
      raise RuntimeError(f"precision.attention='cpu': compiling {SOURCE.name} failed "
                         f"({' '.join(command)}):\n{result.stderr[-4000:]}\n"
                         "Use precision.attention='xla' where this compiler cannot build it.")
    os.replace(partial, target)
  return target


def _scipy_blas() -> tuple[int, int | None]:
  """Addresses of scipy's BLAS sgemm and, if that BLAS is OpenBLAS 0.3.27+, of its per-thread
  thread-count setter (None otherwise: the kernel then leaves the BLAS's threading alone)."""
  from scipy.linalg import cython_blas  # lazy: only this kernel needs scipy
  capsule = cython_blas.__pyx_capi__['sgemm']
  get_name = ctypes.pythonapi.PyCapsule_GetName
  get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
  get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
  get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
  sgemm = get_pointer(capsule, get_name(capsule))
  # dlsym on cython_blas's own handle searches the libraries it links: the BLAS behind the capsule.
  blas_module = ctypes.CDLL(cython_blas.__file__)
  set_threads_local = getattr(blas_module, 'openblas_set_num_threads_local', None)
  return sgemm, (ctypes.cast(set_threads_local, ctypes.c_void_p).value
                 if set_threads_local is not None else None)


@functools.cache
def load() -> None:
  """Builds (if needed) and loads the kernel, hands it sgemm, registers both FFI targets; once."""
  library = ctypes.CDLL(str(_build()))
  library.vtp_attention_set_blas.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
  library.vtp_attention_set_blas(*_scipy_blas())
  jax.ffi.register_ffi_target(FORWARD_TARGET, jax.ffi.pycapsule(library.VtpAttentionForward),
                              platform='cpu')
  jax.ffi.register_ffi_target(BACKWARD_TARGET, jax.ffi.pycapsule(library.VtpAttentionBackward),
                              platform='cpu')


def _check(q, k, v):
  if jax.default_backend() != 'cpu':
    raise ValueError(f"precision.attention='cpu' is an XLA:CPU kernel and this run is on "
                     f"{jax.default_backend()}; use 'cudnn' (GPU) or 'xla'.")
  for name, array in (('q', q), ('k', k), ('v', v)):
    if array.dtype != jnp.float32:
      raise ValueError(f"precision.attention='cpu' computes in float32 and got {name} as "
                       f"{array.dtype}; set precision.compute_dtype='float32', or use "
                       "precision.attention='xla' for bfloat16.")


def _forward_call(q, k, v, causal):
  load()
  shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32),
            jax.ShapeDtypeStruct(q.shape[:-1] + k.shape[-2:-1], jnp.float32))
  return jax.ffi.ffi_call(FORWARD_TARGET, shapes, vmap_method='broadcast_all')(
      q, k, v, causal=bool(causal))


def _backward_call(q, k, v, out, probs, d_out):
  load()
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
  return jax.ffi.ffi_call(BACKWARD_TARGET, shapes, vmap_method='broadcast_all')(
      q, k, v, out, probs, d_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _local_attention(q, k, v, causal):
  return _forward_call(q, k, v, causal)[0]


def _local_attention_fwd(q, k, v, causal):
  out, probs = _forward_call(q, k, v, causal)
  return out, (q, k, v, out, probs)


def _local_attention_bwd(causal, residuals, d_out):
  del causal  # masked probabilities are exactly 0, so their gradients vanish by themselves
  return _backward_call(*residuals, d_out)


_local_attention.defvjp(_local_attention_fwd, _local_attention_bwd)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v on (batch, heads, tokens, head_dim) float32 arrays.

  Under a mesh (`jax.set_mesh`), batch and heads are split as the logical axis rules say and each
  device runs the kernel on its own slices; without one, the kernel sees the whole array.
  """
  _check(q, k, v)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return _local_attention(q, k, v, causal)
  # Axes that do not divide a dim (a 1-image sub-batch on 4 batch shards) are dropped, as for
  # parameters; q, k and v share batch and heads, so q's spec serves all three.
  spec = sharding.fit_spec(P(*nn.logical_to_mesh_axes(LOGICAL_AXES)), q.shape, mesh)
  local = jax.shard_map(lambda a, b, c: _local_attention(a, b, c, causal), mesh=mesh,
                        in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
  return local(q, k, v)
