"""The steps the host has dispatched but not yet checked: their guard values, the NaN policy's
verdict on them, and the bound on how far the host may run ahead of the device.

JAX dispatches a step and returns at once, so the loop's step counter runs ahead of the device.
Unbounded, the host queues up to `train.log_every` steps between checks; a SIGTERM save then waits
for all of them (each holding a batch in device memory). `train.max_steps_ahead` = k makes the
host wait for step N-k after dispatching step N: k steps stay queued, which keeps the device busy
while the next batch is read, and a save starts at most k steps after the signal.
"""

import jax
import numpy as np
from absl import logging

GUARD_KEYS = ('loss', 'grad_norm', 'param_norm', 'update_skipped')


class NonFiniteLoss(RuntimeError):
  """The loss or gradient became NaN/Inf under `train.nan_policy='stop'`."""


def wait_for_device(step: int, guards: dict) -> None:
  """Blocks until dispatched step `step` (the producer of `guards`) has finished on the device."""
  del step  # named for callers that trace the waits (the loop test)
  jax.block_until_ready(guards)


class InFlight:
  """(step, guard arrays) of every step dispatched since the last `check`."""

  def __init__(self, max_steps_ahead: int):
    self.max_steps_ahead = int(max_steps_ahead)
    self.pending = []

  def add(self, step: int, metrics: dict) -> None:
    self.pending.append((step, {k: metrics[k] for k in GUARD_KEYS if k in metrics}))
    k = self.max_steps_ahead
    if k and len(self.pending) > k:
      # Only entries since the last check are here; `check` waited for every earlier step.
      wait_for_device(*self.pending[-1 - k])

  def check(self, nan_policy: str, last_saved, root) -> int:
    """Waits for the pending steps; raises NonFiniteLoss on a bad one under 'stop', else
    returns how many of them skipped their update (nan_policy='skip')."""
    pending, self.pending = self.pending, []
    # 'skip' needs a step that reports `update_skipped` (step.skip_nonfinite); otherwise stop.
    if nan_policy == 'stop' or not all('update_skipped' in v for _, v in pending):
      bad = _first_bad(pending)
      if bad:
        raise NonFiniteLoss(_nan_message(bad, last_saved, root))
      return 0
    return _count_skipped(pending)


def _first_bad(pending) -> tuple | None:
  """(step, values) of the first step whose loss / grad norm / param norm is not finite."""
  if not pending:
    return None
  values = jax.device_get([v for _, v in pending])
  for (step, _), vals in zip(pending, values):
    if not all(np.isfinite(np.asarray(x)).all() for k, x in vals.items()
               if k != 'update_skipped'):
      return step, {k: float(np.asarray(x)) for k, x in vals.items()}
  return None


def _count_skipped(pending) -> int:
  if not pending:
    return 0
  values = np.asarray(jax.device_get([v['update_skipped'] for _, v in pending]))
  for (step, _), flag in zip(pending, values):
    if flag:
      logging.warning('Step %d: non-finite loss or gradient; update skipped (nan_policy=skip).',
                      step)
  return int(values.sum())


def _nan_message(bad, last_saved, root) -> str:
  step, values = bad
  shown = ', '.join(f'{k}={v}' for k, v in values.items())
  kept = (f'the last good checkpoint is step {last_saved} in {root}' if last_saved is not None
          else 'no checkpoint was saved yet')
  return (f'Non-finite values at step {step} ({shown}); stopping (train.nan_policy=stop): {kept}. '
          'Lower optim.lr or set train.nan_policy=skip.')
