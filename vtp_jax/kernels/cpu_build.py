"""Builds and loads the compiled XLA:CPU kernels: `precision.attention='cpu'` (cpu_attention.cc) and
`precision.dense='cpu'` (cpu_matmul.cc), which share cpu_blas.h / cpu_blas.cc.

The C++ sources ship with the package and are compiled on first use into one library, with the
system C++ compiler against the XLA FFI headers that jaxlib ships, into a per-user cache keyed by
the sources, jaxlib, the flags and the CPU (`-march=native`). BLAS is scipy's (OpenBLAS in its
wheels): sgemm's address comes from `scipy.linalg.cython_blas`, so nothing is linked at build time.
`load()` hands the library that address and registers every FFI target with XLA:CPU, once.
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

import jax
import jax.numpy as jnp

SOURCE_DIR = pathlib.Path(__file__).parent
SOURCES = ('cpu_blas.cc', 'cpu_attention.cc', 'cpu_matmul.cc')
HEADERS = ('cpu_blas.h',)
COMPILE_FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')
# FFI target name -> the handler symbol the library exports.
TARGETS = {
    'vtp_attention_forward': 'VtpAttentionForward',
    'vtp_attention_backward': 'VtpAttentionBackward',
    'vtp_matmul': 'VtpMatmul',
}


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
  """The C++ compiler the kernels are built with: $CXX, else g++, c++ or clang++; None if none."""
  for name in (os.environ.get('CXX'), 'g++', 'c++', 'clang++'):
    if name and shutil.which(name):
      return name
  return None


@functools.cache  # every traced call asks: hash the sources once per process, not per layer
def _build(option: str) -> pathlib.Path:
  """Compiles the kernels (once per source, jaxlib and CPU) and returns the library's path.
  `option` is the config setting that asked for them, for the error messages."""
  compiler_name = compiler()
  if compiler_name is None:
    raise RuntimeError(f"{option}='cpu' compiles a C++ kernel on first use, and no C++ compiler "
                       "was found (tried $CXX, g++, c++, clang++). Install one, or use "
                       f"{option}='xla'.")
  texts = [(SOURCE_DIR / name).read_text() for name in SOURCES + HEADERS]
  key = hashlib.sha256('\0'.join([*texts, jax.lib.__version__, ' '.join(COMPILE_FLAGS),
                                  compiler_name, _cpu_identity()]).encode()).hexdigest()[:16]
  target = _cache_dir() / f'vtp_cpu_kernels_{key}.so'
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Built under a temporary name and renamed: processes compiling at once never load a partial file.
  with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
    partial = pathlib.Path(scratch) / target.name
    command = [compiler_name, *COMPILE_FLAGS, f'-I{jax.ffi.include_dir()}',
               *(str(SOURCE_DIR / name) for name in SOURCES), '-o', str(partial)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
      raise RuntimeError(f"{option}='cpu': compiling the CPU kernels failed "
                         f"({' '.join(command)}):\n{result.stderr[-4000:]}\n"
                         f"Use {option}='xla' where this compiler cannot build them.")
    os.replace(partial, target)
  return target


def _scipy_blas() -> tuple[int, int | None]:
  """Addresses of scipy's BLAS sgemm and, if that BLAS is OpenBLAS 0.3.27+, of its per-thread
  thread-count setter (None otherwise: the kernels then leave the BLAS's threading alone)."""
  from scipy.linalg import cython_blas  # lazy: only these kernels need scipy
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


def load(option: str) -> None:
  """Builds the kernels if this CPU's cache lacks them, then loads and registers them (once per
  process). `option` names the config setting that wants them, for error messages."""
  _register(_build(option))


@functools.cache
def _register(library_path: pathlib.Path) -> None:
  library = ctypes.CDLL(str(library_path))
  library.vtp_set_blas.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
  library.vtp_set_blas(*_scipy_blas())
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform='cpu')


def check_float32_on_cpu(option: str, **arrays) -> None:
  """The kernels run on XLA:CPU in float32 only; anything else gets an error naming the fix."""
  if jax.default_backend() != 'cpu':
    raise ValueError(f"{option}='cpu' is an XLA:CPU kernel and this run is on "
                     f"{jax.default_backend()}; use {option}='xla' (or, for attention on GPU, "
                     "'cudnn').")
  for name, array in arrays.items():
    if array.dtype != jnp.float32:
      raise ValueError(f"{option}='cpu' computes in float32 and got {name} as {array.dtype}; set "
                       f"precision.compute_dtype='float32', or use {option}='xla' for bfloat16.")
