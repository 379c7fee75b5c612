"""When a run must stop and save: the SIGTERM / preemption flag the training loop polls at step
boundaries (manager.py saves), and the test-only kill switch that SIGKILLs a run mid-save."""

import os
import signal

import jax
from absl import logging


class Preemption:
  """Polled once per step: True when the run should save now and exit.

  One process: a SIGTERM handler sets a flag (the save happens at the next step boundary, never
  inside the handler). Several processes: every process must save at the same step, so the flag
  comes from JAX's preemption sync (the coordination service catches SIGTERM on any process and
  agrees on a step all processes reach).
  """

  def __init__(self):
    self.requested = False
    self.multi = jax.process_count() > 1
    self._previous = None
    if not self.multi:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning('Received signal %d: saving at the next step boundary, then exiting.', signum)
    self.requested = True

  def reached(self, step: int) -> bool:
    if self.multi and not self.requested:
      from jax.experimental import multihost_utils  # local: only multi-process runs need it
      self.requested = bool(multihost_utils.reached_preemption_sync_point(step))
    return self.requested

  def restore_handler(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def kill_switch_for_tests() -> int | None:
  """`VTP_TEST_KILL_AFTER_SAVE=N`: SIGKILL this process right after the save of step N *starts*
  (its async write still in flight). Used by tests to kill mid-save; unset in real runs."""
  value = os.environ.get('VTP_TEST_KILL_AFTER_SAVE')
  return int(value) if value else None
