"""The host memory allocator a run starts under: glibc malloc's tunables (`train.host_malloc`),
applied by re-executing the process before JAX starts.

Why: XLA:CPU takes each execution's temporary buffer (2.3 GB for the `vtp_s` autoencoder step at
batch 8) from malloc, and glibc serves every request over 32 MB with a fresh mmap that it unmaps on
free. Every step then page-faults its whole working set in again: 560,000 faults and 2.6 s of kernel
time in a 7-9 s step on 2 cores (docs/benchmarks.md, 'Host malloc page faults'). glibc reads its
tunables only when a process starts (the GLIBC_TUNABLES variable), hence the re-exec: entry points
(launch/main.py, the benchmarks) call `apply` first thing, the process starts again with the
variable set, and that second start returns at once.

The modes:
  - 'retain': one malloc arena on the sbrk heap, no mmap'ed chunks, and freed memory kept, so the
    step's buffer is reused from the second step on: no page faults at all. One arena serialises
    malloc across threads, which suits CPU training (XLA allocates a few large buffers a step) more
    than a host decoding images on dozens of threads.
  - 'hugepages': malloc's own mappings get transparent huge pages (madvise), 512 times fewer faults;
    threads keep their own arenas. Needs THP in 'madvise' or 'always' mode.
  - 'system': leave malloc as the environment has it.
  - 'auto' (the default): 'retain' on a CPU-only host, 'system' on a TPU or GPU host, whose
    step buffers live in device memory: the tunables are a CPU-host measure, and one arena would
    serialise the many threads an accelerator host decodes images on. The platform is read before
    anything starts: JAX_PLATFORMS when set, otherwise the accelerator device files.
A GLIBC_TUNABLES that already sets any glibc.malloc tunable is the user's choice and left alone; on
other C libraries (macOS, musl) `apply` does nothing.
"""

import os
import platform
import sys

VARIABLE = 'GLIBC_TUNABLES'
_NEVER_TRIM = 1 << 40  # bytes of free heap top glibc may keep before giving memory back (1 TiB)
MODES = {
    'retain': (f'glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
               f'glibc.malloc.trim_threshold={_NEVER_TRIM}'),
    'hugepages': 'glibc.malloc.hugetlb=1',
    'system': '',
}


CHOICES = sorted([*MODES, 'auto'])

# Device files of accelerators jax can use: TPU (accel, and vfio on v5 and later), NVIDIA, AMD.
ACCELERATOR_DEVICE_FILES = ('/dev/accel0', '/dev/vfio/0', '/dev/nvidiactl', '/dev/nvidia0',
                            '/dev/kfd')


def accelerator_host(environ=None, exists=os.path.exists) -> bool:
  """Whether this process will run on a TPU or GPU: JAX_PLATFORMS decides when it is set (a list
  naming only 'cpu' means no), otherwise the presence of an accelerator's device file."""
  environ = os.environ if environ is None else environ
  platforms = [p.strip() for p in environ.get('JAX_PLATFORMS', '').split(',') if p.strip()]
  if platforms:
    return any(p != 'cpu' for p in platforms)
  return any(exists(path) for path in ACCELERATOR_DEVICE_FILES)


def resolve(mode: str, environ=None, exists=os.path.exists) -> str:
  """'auto' -> 'system' on an accelerator host, 'retain' on a CPU-only one; other modes as given."""
  if mode != 'auto':
    return mode
  return 'system' if accelerator_host(environ, exists) else 'retain'


def tunables_for(mode: str, current: str | None) -> str | None:
  """The GLIBC_TUNABLES value `mode` wants, given the current one; None when nothing should change
  (mode 'system', or the user already set a malloc tunable)."""
  mode = resolve(mode)
  if mode not in MODES:
    raise ValueError(f'train.host_malloc={mode!r}; use one of {CHOICES} '
                     '(vtp_jax/host_malloc.py says what each does).')
  if not MODES[mode] or 'glibc.malloc.' in (current or ''):
    return None
  return f'{current}:{MODES[mode]}' if current else MODES[mode]


def _restartable() -> bool:
  """A process can start again only from its command line: not when its program came from stdin
  (sys.argv[0] '-') or from an interactive or embedded interpreter (no program, or no orig_argv)."""
  return bool(getattr(sys, 'orig_argv', None)) and bool(sys.executable) and (
      bool(sys.argv) and sys.argv[0] not in ('', '-'))


def mode_of(config) -> str:
  """The config's `train.host_malloc`; 'system' for configs written before the key existed."""
  return config.train.get('host_malloc', 'system')


def apply(mode: str) -> str:
  """Restarts this process with `mode`'s malloc tunables unless it already runs under them (or under
  the user's own); returns a line saying which, for the log. Call before anything starts threads
  or devices: the process image is replaced, so nothing done before the call survives it."""
  current = os.environ.get(VARIABLE)
  wanted = tunables_for(mode, current)
  mode = mode if mode != 'auto' else f"auto -> {resolve(mode)}"
  if platform.libc_ver()[0] != 'glibc':
    return f'host malloc: {mode} needs glibc; this C library is left as it is'
  if wanted is None:
    return f'host malloc: {VARIABLE}={current or ""!r} (train.host_malloc: {mode})'
  if not _restartable():
    return f'host malloc: cannot restart this process to set {VARIABLE}; left as it is'
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, {**os.environ, VARIABLE: wanted})
  raise AssertionError('unreachable: execve returns only by raising')  # pragma: no cover
