"""A process of a multi-process run that dies or hangs, said in one line (exit status 3).

Owns the peer watchdog of the training loop: a heartbeat each process writes into the coordination
service's key-value store, the judgement of which process is gone, the one line on stderr that names
it and the step a re-run resumes from, and the exit with status 3 (launch/main.py's docstring).

Without it, a survivor learns of a dead peer twice, both badly: its next collective raises at once
(gloo: 'Connection closed by peer'), and JAX's atexit shutdown then waits for the coordination
service to miss the dead one's heartbeats (train.distributed.heartbeat_timeout, 100 s by default)
before its agent aborts the process with ~200 lines of C++ and Python dumps. When the dead one is
process 0, the service it hosts goes with it and the agent aborts every survivor within
milliseconds. jaxlib's agent takes a callback for this, but the Python binding cannot call one (it
fails to convert the status and terminates), so the watchdog acts in three ways instead:

  * a failed collective (`failed`, called where the loop catches it): the peers whose heartbeat
    stops advancing over a few heartbeat periods are the dead ones; well inside the service's
    timeout, so this process exits before the agent's abort;
  * a silent peer without any failed collective (hung, or a host gone without closing its sockets):
    the watchdog thread finds its heartbeat stale, before the service's timeout does;
  * the agent's abort itself (process 0 gone, or the service's timeout came first): a SIGABRT
    handler writes the line last and exits with status 3 (the agent's own few lines come first;
    they are printed before abort() is called, the first moment anything can act).

Nothing here runs in a single-process run, and the step never waits on the thread.
"""

import ctypes
import math
import os
import signal
import socket
import sys
import threading
import time

import jax
from absl import logging

EXIT_STATUS = 3  # launch/main.py: 2 = config / unreadable workdir, 1 = diverged / save failed
_PREFIX = 'vtp_peers/'
_DONE = 'done'  # a heartbeat value: this process left the loop on its own (not a death)


def _client():
  """jax.distributed's coordination-service client, or None (single process)."""
  from jax._src import distributed  # local: private; read once, at start
  return distributed.global_state.client


def _is_runtime_error(exc: BaseException | None) -> bool:
  """An XLA runtime error (a collective's) anywhere in the exception's chain."""
  seen = 0
  while exc is not None and seen < 8:
    if isinstance(exc, jax.errors.JaxRuntimeError):
      return True
    exc, seen = exc.__cause__ or exc.__context__, seen + 1
  return False


def describe(dead: list[int], count: int, why: str, resume_step: int | None) -> str:
  """The one line: who stopped answering, why we think so, and where a re-run starts."""
  if len(dead) == 1:
    who = f'process {dead[0]}'
  else:
    who = f'processes {", ".join(map(str, dead[:-1]))} and {dead[-1]}'
  where = (f'resume from step {resume_step}' if resume_step is not None
           else 'start from scratch (no checkpoint was saved)')
  return (f'error: {who} of {count} stopped answering ({why}); re-run the same command on every '
          f'host to {where}.')


class Watchdog:
  """The peer watchdog of one training loop; inert unless jax.distributed joins several processes.

    watchdog = Watchdog(config, workdir, resume_step)  # after the restore, before the loop
    watchdog.saved(step)                                # each time a checkpoint save starts
    except Exception as e: watchdog.failed(e); raise    # around the loop: exits on a dead peer
    finally: watchdog.close()                           # the loop is left: not a death
  """

  def __init__(self, config, workdir, resume_step: int | None):
    self._resume, self._pending = resume_step, None  # newest complete save; the one writing
    self._workdir = workdir
    client = _client() if jax.process_count() > 1 else None
    self.active = client is not None
    if not self.active:
      return
    self._client, self._pid, self._count = client, jax.process_index(), jax.process_count()
    timeout = float(config.train.distributed.heartbeat_timeout)
    # The service counts a process dead when it missed its heartbeats for `timeout`; measured,
    # that is timeout / 2 to timeout after a death. Everything here means to conclude before.
    self._period = min(2.0, max(0.5, timeout / 10))
    self._confirm = 3 * self._period  # a live peer's heartbeat advances within this, surely
    # Reading every heartbeat costs count entries at the service per read: fewer reads for more.
    self._read_every = max(1, math.ceil(self._count / 32))
    self._stale = max(10 * self._period, timeout / 2 - 2 * self._period) + (
        self._read_every - 1) * self._period
    self._beats = {}  # process -> (heartbeat value, monotonic time it last changed), as read
    self._verdict = None  # (dead, why) another survivor posted
    self._exit_lock = threading.Lock()
    self._stop = threading.Event()
    self._beat(str(0))
    self._previous_abort = None
    self._install_abort_handler()
    self._thread = threading.Thread(target=self._run, name='peer-watchdog', daemon=True)
    self._thread.start()

  # -- the loop's calls ----------------------------------------------------------------------------

  def saved(self, step: int) -> None:
    """A save of `step` started: the one before it has completed (the manager waits for it)."""
    if self._pending is not None:
      self._resume = self._pending
    self._pending = step

  def failed(self, exc: BaseException) -> None:
    """The loop raised `exc`. When a collective failed because a peer is gone, exits with status 3
    (never returns); otherwise returns within a few heartbeat periods and the caller re-raises."""
    if not self.active or not _is_runtime_error(exc):
      return
    try:
      before = self._read()
    except Exception:  # noqa: BLE001: the service is unreachable: the process hosting it is gone
      self._coordinator_gone()
      return
    deadline, silent = time.monotonic() + self._confirm, self._others()
    while time.monotonic() < deadline:
      time.sleep(self._period / 4)
      try:
        now = self._read()
      except Exception:  # noqa: BLE001
        self._coordinator_gone()
        return
      if self._verdict is not None:
        self._report(*self._verdict)
      silent = [p for p in self._others() if now.get(p) == before.get(p) and now.get(p) != _DONE]
      if not silent:
        return  # every peer is alive (or left on its own): not a death; the error is the cause
    self._report(silent, f'a collective failed and it sent no heartbeat for '
                         f'{self._confirm:.0f} s')

  def close(self) -> None:
    """The loop is over (done, preempted or raising): stop, and tell the peers this is no death."""
    if not self.active:
      return
    self.active = False
    self._stop.set()
    self._thread.join(timeout=2 * self._period)
    self._uninstall_abort_handler()
    try:
      self._beat(_DONE)
    except Exception:  # noqa: BLE001: the service is gone too; nothing left to tell
      pass

  # -- the heartbeat thread ------------------------------------------------------------------------

  def _others(self) -> list[int]:
    return [p for p in range(self._count) if p != self._pid]

  def _beat(self, value: str) -> None:
    self._client.key_value_set(f'{_PREFIX}beat/{self._pid}', value, allow_overwrite=True)

  def _read(self) -> dict:
    """Every process's heartbeat (also noting when each last changed, and any posted verdict)."""
    beats, now = {}, time.monotonic()
    for key, value in self._client.key_value_dir_get(_PREFIX):
      kind, _, who = key[len(_PREFIX):].partition('/')
      if kind == 'beat' and who.isdigit():
        beats[int(who)] = value
      elif kind == 'dead' and self._verdict is None and value.replace(',', '').isdigit():
        self._verdict = ([int(p) for p in value.split(',')], f'process {who} found it gone')
    for p, value in beats.items():
      if p not in self._beats or self._beats[p][0] != value:
        self._beats[p] = (value, now)
    return beats

  def _run(self) -> None:
    n = 0
    while not self._stop.wait(self._period):
      n += 1
      try:
        self._beat(str(n))
        if n % self._read_every == 0:
          self._read()
          self._judge()
      except Exception:  # noqa: BLE001: the agent aborts on a lost service; the handler reports
        pass
      if self._pending is not None:
        self._check_pending()

  def _judge(self) -> None:
    """Peers silent for longer than `_stale` (only those that ever beat: the others may still be
    compiling) are gone."""
    if self._verdict is not None:
      self._report(*self._verdict)
    now = time.monotonic()
    silent = [p for p in self._others() if p in self._beats and self._beats[p][0] != _DONE
              and now - self._beats[p][1] > self._stale]
    if silent:
      self._report(silent, f'no heartbeat from it for {self._stale:.0f} s')

  def _check_pending(self) -> None:
    """Whether the save in flight has completed: a re-run resumes from it then."""
    from vtp_jax.checkpoints import saved  # local: only while a save is in flight
    step = self._pending
    try:
      latest = saved.latest_step_dir(self._workdir)
    except Exception:  # noqa: BLE001: the line then names the step before, which is complete
      return
    if latest is not None and latest.name.isdigit() and int(latest.name) >= step:
      self._resume, self._pending = step, (None if self._pending == step else self._pending)

  # -- the end -------------------------------------------------------------------------------------

  def _coordinator_gone(self) -> None:
    if self._pid != 0:
      self._report([0], 'it hosts the coordination service, which stopped answering')

  def _report(self, dead: list[int], why: str, in_handler: bool = False) -> None:
    """Writes the line last on stderr and exits with EXIT_STATUS. Never returns."""
    if not self._exit_lock.acquire(blocking=False):
      while True:  # another thread is reporting, and exits the process
        time.sleep(60)
    if self._pending is not None:  # did the save in flight complete? (bounded: it may be stuck)
      checking = threading.Thread(target=self._check_pending, daemon=True)
      checking.start()
      checking.join(timeout=5)
    if not in_handler:  # (in the SIGABRT handler: no RPC, no logging lock)
      try:
        self._client.key_value_set(f'{_PREFIX}dead/{self._pid}', ','.join(map(str, dead)))
        if self._pid == 0:  # the others read the verdict from the service this process hosts
          self._wait_for_verdicts(dead)
      except Exception:  # noqa: BLE001: best effort
        pass
    line = describe(dead, self._count, why, self._resume)
    if not in_handler:
      logging.error('%s', line)
      for stream in (sys.stdout, sys.stderr):
        try:
          stream.flush()
        except Exception:  # noqa: BLE001
          pass
    os.write(2, (line + '\n').encode())
    os._exit(EXIT_STATUS)  # not sys.exit: JAX's atexit shutdown would wait for the dead peer

  def _wait_for_verdicts(self, dead: list[int]) -> None:
    """Process 0 stays up until each other survivor posted its verdict (at most a few periods), so
    that none of them sees the service vanish and blames process 0."""
    waiting = set(self._others()) - set(dead)
    deadline = time.monotonic() + self._confirm + self._period
    while waiting and time.monotonic() < deadline:
      posted = {key[len(_PREFIX) + len('dead/'):]
                for key, _ in self._client.key_value_dir_get(f'{_PREFIX}dead/')}
      waiting -= {int(p) for p in posted if p.isdigit()}
      time.sleep(0.1)

  # -- the agent's abort ---------------------------------------------------------------------------

  def _install_abort_handler(self) -> None:
    """A C-level SIGABRT handler (through ctypes: Python's own handlers run too late, after abort()
    has killed the process). It replaces faulthandler's, which it calls for an abort of its own."""
    try:
      libc = ctypes.CDLL(None, use_errno=True)
      libc.signal.restype = ctypes.c_void_p
      libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
      self._libc = libc
      self._handler = ctypes.CFUNCTYPE(None, ctypes.c_int)(self._on_abort)  # kept alive here
      self._previous_abort = libc.signal(signal.SIGABRT,
                                         ctypes.cast(self._handler, ctypes.c_void_p))
    except (OSError, AttributeError) as e:  # no libc signal(): the agent's abort stays as it was
      logging.warning('Peer watchdog: no SIGABRT handler (%s).', e)
      self._handler = None

  def _uninstall_abort_handler(self) -> None:
    if getattr(self, '_handler', None) is not None:
      self._libc.signal(signal.SIGABRT, self._previous_abort)

  def _on_abort(self, signum: int) -> None:
    """The coordination agent aborts this process: report the peer that caused it, if one did."""
    try:
      if self._pid != 0 and not self._coordinator_answers():
        self._report([0], 'it hosts the coordination service, which stopped answering', True)
      if self._verdict is not None:
        self._report(*self._verdict, True)
      # The service counted a process dead: those whose heartbeats stopped (as last read).
      now, limit = time.monotonic(), (self._read_every + 2) * self._period
      silent = [p for p in self._others() if p in self._beats and self._beats[p][0] != _DONE
                and now - self._beats[p][1] > limit]
      if silent:
        self._report(silent, 'the coordination service stopped hearing from it', True)
    except Exception:  # noqa: BLE001: never turn an abort into something worse
      pass
    # Not a peer's doing: abort as before (faulthandler's dump, if it was installed).
    previous = self._previous_abort
    if previous not in (None, 0, 1):  # SIG_DFL, SIG_IGN
      ctypes.CFUNCTYPE(None, ctypes.c_int)(previous)(signum)

  def _coordinator_answers(self) -> bool:
    from jax._src import distributed  # local: private
    host, _, port = (distributed.global_state.coordinator_address or '').rpartition(':')
    try:
      with socket.create_connection((host.strip('[]'), int(port)), timeout=2):
        return True
    except (OSError, ValueError):
      return False
