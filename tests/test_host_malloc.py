"""vtp_jax/host_malloc.py: which GLIBC_TUNABLES each mode asks for, that `apply` restarts the process
under them exactly once, and that glibc then really stops page-faulting a large buffer that is
freed and taken again (XLA:CPU's per-step temporary buffer), counted with getrusage."""

import os
import pathlib
import platform
import subprocess
import sys

import pytest

from vtp_jax import host_malloc

REPO = pathlib.Path(__file__).resolve().parents[1]
GLIBC = platform.libc_ver()[0] == 'glibc'
needs_glibc = pytest.mark.skipif(not GLIBC, reason='malloc tunables are glibc-only')
_THP = pathlib.Path('/sys/kernel/mm/transparent_hugepage/enabled')
THP_OFF = not _THP.exists() or '[never]' in _THP.read_text()
PAGES = 4 * (256 << 20) // os.sysconf('SC_PAGE_SIZE')  # the four counted rounds of a 256 MiB block

# Takes and frees a 256 MiB block five times through libc's own malloc (NumPy would madvise huge
# pages itself), touching every page, on a thread other than the main one (as XLA's executions
# run); prints the minor page faults of the last four rounds.
_FAULTS = """
import ctypes, resource, sys, threading
sys.path.insert(0, {repo!r})
from vtp_jax import host_malloc
print(host_malloc.apply({mode!r}), file=sys.stderr)
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
faults = []
def rounds():
  for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
worker = threading.Thread(target=rounds)
worker.start()
worker.join()
print(sum(faults[1:]))
"""


def _run(code: str, from_stdin: bool = False, **env) -> subprocess.CompletedProcess:
  """`code` in a fresh interpreter (as `-c`, or read from stdin), without our GLIBC_TUNABLES."""
  environ = {k: v for k, v in os.environ.items() if k != host_malloc.VARIABLE}
  argv = [sys.executable, '-'] if from_stdin else [sys.executable, '-c', code]
  return subprocess.run(argv, input=code if from_stdin else None, env={**environ, **env},
                        capture_output=True, text=True, timeout=120, check=True)


def _faults(mode: str) -> int:
  return int(_run(_FAULTS.format(repo=str(REPO), mode=mode)).stdout)


def test_tunables_per_mode_and_the_users_own_setting_wins():
  assert host_malloc.tunables_for('system', None) is None
  assert host_malloc.tunables_for('hugepages', None) == 'glibc.malloc.hugetlb=1'
  retain = host_malloc.tunables_for('retain', '')
  assert retain.split(':') == ['glibc.malloc.arena_max=1', 'glibc.malloc.mmap_max=0',
                               f'glibc.malloc.trim_threshold={1 << 40}']
  # Other tunables are kept and ours appended; any malloc tunable of the user's stops us.
  assert host_malloc.tunables_for('hugepages', 'glibc.pthread.rseq=0') == (
      'glibc.pthread.rseq=0:glibc.malloc.hugetlb=1')
  assert host_malloc.tunables_for('retain', 'glibc.malloc.hugetlb=0') is None


def test_unknown_mode_names_the_key_and_the_choices():
  with pytest.raises(ValueError, match=r"train.host_malloc='fast'.*\['auto', 'hugepages', "
                                       r"'retain', 'system'\]"):
    host_malloc.tunables_for('fast', None)


@needs_glibc
def test_apply_restarts_once_with_the_variable_set():
  code = (f'import os, sys; sys.path.insert(0, {str(REPO)!r}); print("start", flush=True); '
          'from vtp_jax import host_malloc; print(host_malloc.apply("hugepages")); '
          'print(os.environ["GLIBC_TUNABLES"])')
  lines = _run(code, GLIBC_TUNABLES='glibc.pthread.rseq=0').stdout.splitlines()
  # One restart: the first start prints only "start" (flushed before execve), the second runs on.
  assert lines[0] == lines[1] == 'start' and len(lines) == 4, lines
  assert 'glibc.malloc.hugetlb=1' in lines[2]
  assert lines[3] == 'glibc.pthread.rseq=0:glibc.malloc.hugetlb=1'


@needs_glibc
def test_retain_stops_the_page_faults_of_a_reused_large_buffer():
  system, retain = _faults('system'), _faults('retain')
  # glibc's default mmaps and unmaps the block each round: every page faults again. Kept on the
  # heap, the block comes back already mapped.
  assert system >= 0.9 * PAGES, (system, PAGES)
  assert retain < 0.01 * PAGES, (retain, PAGES)


@needs_glibc
@pytest.mark.skipif(THP_OFF, reason='transparent huge pages are off (or absent) on this kernel')
def test_hugepages_cut_the_faults_of_a_reused_large_buffer():
  huge = _faults('hugepages')
  # 2 MiB pages: 512 times fewer faults than 4 KiB ones where the kernel can find huge pages.
  assert huge < 0.1 * PAGES, (huge, PAGES)


@needs_glibc
def test_a_program_read_from_stdin_runs_on_without_a_restart():
  # Starting again would read the already consumed stdin and run nothing: apply must not.
  code = (f'import sys; sys.path.insert(0, {str(REPO)!r}); from vtp_jax import host_malloc; '
          'print(host_malloc.apply("retain"))')
  run = _run(code, from_stdin=True)
  assert run.stdout.strip() == ('host malloc: cannot restart this process to set GLIBC_TUNABLES; '
                                'left as it is')


def test_auto_leaves_malloc_alone_on_accelerator_hosts():
  """'auto' (the default) is 'retain' on a CPU-only host and 'system' on a TPU or GPU host, read
  from JAX_PLATFORMS when set, else from the accelerator device files."""
  nothing = lambda path: False  # noqa: E731
  assert host_malloc.resolve('auto', {'JAX_PLATFORMS': 'tpu'}, nothing) == 'system'
  assert host_malloc.resolve('auto', {'JAX_PLATFORMS': 'cuda,cpu'}, nothing) == 'system'
  assert host_malloc.resolve('auto', {'JAX_PLATFORMS': 'cpu'}, lambda p: True) == 'retain'
  assert host_malloc.resolve('auto', {}, nothing) == 'retain'
  for device_file in ('/dev/accel0', '/dev/vfio/0', '/dev/nvidiactl'):
    assert host_malloc.resolve('auto', {}, lambda p, f=device_file: p == f) == 'system'
  # Explicit modes stay what the config says, whatever the host.
  assert host_malloc.resolve('retain', {'JAX_PLATFORMS': 'tpu'}, nothing) == 'retain'
  assert host_malloc.resolve('hugepages', {}, lambda p: True) == 'hugepages'
  # The test session runs with JAX_PLATFORMS=cpu (conftest): 'auto' asks for 'retain''s tunables.
  assert host_malloc.tunables_for('auto', None) == host_malloc.MODES['retain']
