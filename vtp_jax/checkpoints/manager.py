"""Training checkpoints: the one wrapper around Orbax's CheckpointManager the driver uses, in a
local folder or a bucket alike. Reading a workdir's checkpoints back (for inference, export,
init_from) is saved.py's.

A training workdir holds `checkpoints/<step>/` folders, each with four Orbax items:
  state/     the whole TrainState (params, optimizer, teacher, centres, rng, discriminator)
  data_iter/ the Grain iterator state, one JSON per process (`process_<i>-of-<n>.json`)
  config/    config.json, the run's full config
  digest/    SHA-256 digests of the three above, one JSON per process (digest.py)
Saves are asynchronous (the device-to-host copy blocks; the write and the hashing do not). A step
is all or nothing: on a disk Orbax writes it into a temporary folder and renames it once complete;
in a bucket, which has no rename, it writes in place and marks the step complete with
`commit_success.txt` last. Either way a process killed mid-save leaves no step that resume would
see, and the leftover is deleted on the next start.

Resume checks what it restores against the digests. When the newest step cannot be read or fails
them, the run logs one line naming the step and the cause, sets the folder aside (kept:
`<step>.unreadable`) and resumes from the newest step that reads, down the kept list; when none
reads it stops with one error naming them all and moves nothing. A save that fails (a full
volume, a lost permission) stops the run at the next step with one line; the steps before it stay
as they were (Orbax garbage-collects old steps only after a save commits), so the next run
resumes from the newest of them (docs/checkpoints.md).
"""

import dataclasses
import json
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from vtp_jax.checkpoints import digest as checkpoint_digest
from vtp_jax.checkpoints import errors
from vtp_jax.checkpoints import saved
from vtp_jax.checkpoints import set_aside
from vtp_jax.checkpoints.errors import CheckpointUnreadable
from vtp_jax.checkpoints.saved import CONFIG, DATA_ITER, STATE

DIGEST = checkpoint_digest.ITEM


class SaveFailed(RuntimeError):
  """A checkpoint save that did not complete; the message is the one line users see."""


class _IteratorStateHandler(grain.checkpoint.CheckpointHandler):
  """Grain's iterator-state handler (its files, its restore), saving a state text the caller took
  once, so the digest beside it covers exactly the bytes written."""

  def save(self, directory, item=None, args=None):
    del item
    name = checkpoint_digest.file_name(jax.process_index(), jax.process_count())
    (directory / name).write_text(args.text)


@ocp.args.register_with_handler(_IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class _IteratorStateSave(ocp.args.CheckpointArgs):
  text: str


@ocp.args.register_with_handler(_IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class _IteratorStateRestore(ocp.args.CheckpointArgs):
  item: Any


def _iterator_state_text(data_iter) -> str:
  """The text Grain's handler writes for this iterator."""
  if isinstance(data_iter, grain.DatasetIterator):
    return json.dumps(data_iter.get_state(), indent=4)
  return data_iter.get_state().decode()


def _agree(cause: str | None) -> str | None:
  """Every process's verdict on one step: unreadable if unreadable anywhere."""
  if jax.process_count() == 1:
    return cause
  from jax.experimental import multihost_utils  # local: multi-process runs only
  bad = np.asarray(multihost_utils.process_allgather(np.int32(cause is not None)))
  if cause is None and bad.any():
    cause = f'unreadable on process(es) {np.flatnonzero(bad).tolist()}'
  return cause


class _OrbaxTracebacksOff:
  """Orbax logs a failed background save three times, each with its traceback; SaveFailed says it
  in one line. Orbax's error lines stay, shortened to their message and the error's first line."""

  def filter(self, record) -> bool:
    if record.exc_info and record.levelno >= 40 and '/orbax/' in record.pathname:  # 40: ERROR
      record.msg = f'{record.getMessage()} ({errors.short_cause(record.exc_info[1])})'
      record.args, record.exc_info, record.exc_text = (), None, None
    return True


_ORBAX_FILTER = _OrbaxTracebacksOff()


class Checkpoints:
  """Async saves of (state, data iterator, config, digests) every N steps, keep K, resume the
  newest that reads."""

  def __init__(self, workdir, keep: int, digests: bool = True):
    """`digests=False` saves steps without the digest item, which then read unchecked (as steps
    saved before digests existed do); only `bench.checkpoint` turns them off, to measure them."""
    self.digests = digests
    self.root = saved.checkpoint_root(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=True, create=True,
        # A save killed mid-write leaves `<step>.orbax-checkpoint-tmp-*`: never listed as a step,
        # and deleted here so it cannot pile up.
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.root, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA_ITER: _IteratorStateHandler(),
                       CONFIG: ocp.JsonCheckpointHandler(filename=saved.CONFIG_FILE),
                       DIGEST: checkpoint_digest.DigestHandler()})
    self._state_reader = ocp.StandardCheckpointHandler()
    self._in_flight = None  # the step whose save has not been checked yet
    self._failed = False
    if _ORBAX_FILTER not in logging.get_absl_logger().filters:
      logging.get_absl_logger().addFilter(_ORBAX_FILTER)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  # -- saving ------------------------------------------------------------------------------------

  def save(self, step: int, state, data_iter, config) -> None:
    """Starts an async save; returns once the arrays are copied off the devices (the state may then
    be donated to the next step). Raises SaveFailed if the previous save failed."""
    self.check_save(wait=True)
    config_json = saved.config_to_dict(config)
    text = _iterator_state_text(data_iter) if data_iter is not None else None
    args = {STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(config_json)}
    if self.digests:
      args[DIGEST] = checkpoint_digest.DigestSave(
          checkpoint_digest.host_shards(state), text,
          config_json if jax.process_index() == 0 else None)
    if text is not None:
      args[DATA_ITER] = _IteratorStateSave(text)
    try:
      self.manager.save(step, args=ocp.args.Composite(**args), force=True)
    except Exception as e:  # noqa: BLE001: the blocking part of a save failed (e.g. mkdir)
      self._fail(step, e)
    self._in_flight = step

  def check_save(self, wait: bool = False) -> None:
    """Raises SaveFailed when the save in flight failed. Polled once per step (returns at once while
    the save is still writing); `wait` waits for it to finish first."""
    if self._in_flight is None or (not wait and self.manager.is_saving_in_progress()):
      return
    step, self._in_flight = self._in_flight, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001: whatever the writer raised
      self._fail(step, e)

  def _fail(self, step: int, error: BaseException):
    self._failed = True
    self.manager.reload()  # the steps on disk: the failed one never became one
    kept = [s for s in self.manager.all_steps() if s != step]
    cause = errors.short_cause(error)
    if kept:
      listed = ', '.join(map(str, sorted(kept)))
      then = (f'{self.root} keeps step{"s" if len(kept) > 1 else ""} {listed} intact; fix the '
              f'cause (disk space, permissions) and re-run the same command to resume from step '
              f'{max(kept)}')
    else:
      then = ('there is no earlier checkpoint; fix the cause (disk space, permissions) and re-run '
              'the same command')
    raise SaveFailed(f'Saving checkpoint step {step} failed ({cause}); {then}.') from error

  def wait(self) -> None:
    self.check_save(wait=True)

  def close(self) -> None:
    try:
      if not self._failed:
        self.check_save(wait=True)
    finally:
      self._state_reader.close()
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001: a failed save raises again here; it was reported
        if not self._failed:
          raise

  # -- restoring ---------------------------------------------------------------------------------

  def data_state_saved_here(self, step: int) -> bool:
    """Whether `step` holds an iterator state for this process index and count (a Grain state is
    per process; a run resumed with another process count re-positions its data instead). A state
    the digests list counts even when its file is gone, so that the restore reports it."""
    name = checkpoint_digest.file_name(jax.process_index(), jax.process_count())
    if (self.root / str(step) / DATA_ITER / name).exists():
      return True
    try:
      digests = saved.saved_digests(self.root / str(step))
    except CheckpointUnreadable:
      return False  # the state restore reports the step
    return bool(digests) and name in digests['data_iter']

  def restore(self, step: int, abstract_state, data_iter=None):
    """The state at `step` placed as `abstract_state`'s shardings, checked against its digests;
    restores `data_iter` in place when given (the caller checks `data_state_saved_here` first).
    Raises CheckpointUnreadable when a part cannot be read or differs from its digest."""
    return saved.cast_like(self._read_checked(step, abstract_state, data_iter),
                                   abstract_state)

  def _read_checked(self, step: int, abstract_state, data_iter):
    """`restore` in the saved dtypes. Only this process's work, no collective and no barrier (the
    item handlers are called directly, not through Orbax's checkpointer, which syncs processes),
    so that a process that fails here still meets the others where they agree on the step. The
    iterator is set last, once everything else has checked out."""
    step_dir = self.root / str(step)
    digests = saved.saved_digests(step_dir)
    target = saved.in_saved_dtypes(abstract_state, digests) if digests else abstract_state
    with errors.reading(step_dir, STATE):
      state = self._state_reader.restore(step_dir / STATE, args=ocp.args.StandardRestore(target))
    if digests:
      saved.verify(step_dir, STATE, state, digests)
      saved.read_step_config(step_dir, digests)
    if data_iter is not None:
      name = checkpoint_digest.file_name(jax.process_index(), jax.process_count())
      part = f'{DATA_ITER}/{name}'
      with errors.reading(step_dir, part):
        text = (step_dir / part).read_bytes()
      if digests and digests['data_iter'].get(name) != checkpoint_digest.hexdigest(text):
        raise CheckpointUnreadable(step_dir, part, 'digest mismatch')
      with errors.reading(step_dir, part):
        _IteratorStateHandler().restore(step_dir / DATA_ITER,
                                        args=_IteratorStateRestore(data_iter))
    return state

  def restore_newest_readable(self, abstract_state, data_iter):
    """(step, state, whether the iterator was restored) from the newest step that reads and
    verifies. Newer steps that do not are moved aside (`<step>.unreadable`), one log line each;
    when none reads, raises CheckpointUnreadable naming them all and moves nothing. Every process
    takes the same decision (a step rejected after the iterator was set is followed by another
    step's restore, or by a fresh iterator where none fits)."""
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      fits = data_iter is not None and self.data_state_saved_here(step)
      state, cause = None, None
      try:
        state = self._read_checked(step, abstract_state, data_iter if fits else None)
      except CheckpointUnreadable as e:
        cause = f'{e.part}: {e.cause}'
      cause = _agree(cause)
      if cause is None:
        for bad, why in failed:
          aside = self._move_aside(bad)
          logging.warning('Checkpoint step %d is unreadable (%s); moved to %s; resuming from step '
                          '%d.', bad, why, aside, step)
        if failed:
          self.manager.reload()
        return step, saved.cast_like(state, abstract_state), fits
      failed.append((step, cause))
    raise CheckpointUnreadable(
        self.root, 'steps ' + ', '.join(str(s) for s, _ in failed),
        '; '.join(f'step {s}: {why}' for s, why in failed),
        'nothing was moved or deleted: restore a step from a copy, or train in a new workdir to '
        'start from scratch')

  def _move_aside(self, step: int):
    """Sets `<step>` aside (set_aside.py); process 0 moves it, every process waits for it."""
    aside = set_aside.aside_name(self.root, step)
    multi = jax.process_count() > 1
    if multi:  # every process has picked the same name before process 0 takes it
      from jax.experimental import multihost_utils  # local: multi-process runs only
      multihost_utils.sync_global_devices(f'vtp_jax: moving checkpoint {step} aside')
    if jax.process_index() == 0:
      set_aside.move(self.root, step, aside)
    if multi:
      multihost_utils.sync_global_devices(f'vtp_jax: checkpoint {step} moved aside')
    return aside
