"""Training checkpoints: the one wrapper around Orbax's CheckpointManager the driver uses.
Reading a workdir's checkpoints back (for inference, export, init_from) is checkpoint_io.py's.

A training workdir holds `checkpoints/<step>/` folders, each with four Orbax items:
  state/     the whole TrainState (params, optimizer, teacher, centres, rng, discriminator)
  data_iter/ the Grain iterator state, one JSON per process (`process_<i>-of-<n>.json`)
  config/    config.json, the run's full config
  digest/    SHA-256 digests of the three above, one JSON per process (checkpoint_digest.py)
Saves are asynchronous (the device-to-host copy blocks; the write and the hashing do not); Orbax
writes each step into a temporary folder and renames it only once complete, so a process killed
mid-save leaves no step folder behind and resume never sees it (the leftover temporary folder is
deleted on start). Restores always name target shardings, so a checkpoint loads onto any mesh.

Resume checks what it restores against the digests. When the newest step cannot be read or fails
them, the run logs one line naming the step and the cause, moves the folder aside (kept:
`<step>.unreadable`) and resumes from the newest step that reads, down the kept list; when none
reads it stops with one error naming them all and moves nothing. A save that fails (a full
volume, a lost permission) stops the run at the next step with one line; the steps before it stay
as they were (Orbax garbage-collects old steps only after a save commits), so the next run
resumes from the newest of them (docs/checkpoints.md).

Also here: starting a run from another checkpoint (`train.init_from`, partial: parameters the
source holds overwrite the fresh init, the rest keep it). The SIGTERM / preemption flag the loop
polls at step boundaries is preemption.py's.
"""

import dataclasses
import json
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from vtp_jax import checkpoint_digest
from vtp_jax import checkpoint_io
from vtp_jax.checkpoint_io import CONFIG, DATA_ITER, STATE, CheckpointUnreadable
from vtp_jax.models import layout

DIGEST = checkpoint_digest.ITEM
ASIDE_SUFFIX = '.unreadable'  # never a step name to Orbax (steps are bare integers)


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
      record.msg = f'{record.getMessage()} ({checkpoint_io.short_cause(record.exc_info[1])})'
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
    self.root = checkpoint_io.checkpoint_root(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=True, create=True,
        # A save killed mid-write leaves `<step>.orbax-checkpoint-tmp-*`: never listed as a step,
        # and deleted here so it cannot pile up.
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.root, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA_ITER: _IteratorStateHandler(),
                       CONFIG: ocp.JsonCheckpointHandler(filename=checkpoint_io.CONFIG_FILE),
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
    config_json = checkpoint_io.config_to_dict(config)
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
    cause = checkpoint_io.short_cause(error)
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
      digests = checkpoint_io.saved_digests(self.root / str(step))
    except CheckpointUnreadable:
      return False  # the state restore reports the step
    return bool(digests) and name in digests['data_iter']

  def restore(self, step: int, abstract_state, data_iter=None):
    """The state at `step` placed as `abstract_state`'s shardings, checked against its digests;
    restores `data_iter` in place when given (the caller checks `data_state_saved_here` first).
    Raises CheckpointUnreadable when a part cannot be read or differs from its digest."""
    return checkpoint_io.cast_like(self._read_checked(step, abstract_state, data_iter),
                                   abstract_state)

  def _read_checked(self, step: int, abstract_state, data_iter):
    """`restore` in the saved dtypes. Only this process's work, no collective and no barrier (the
    item handlers are called directly, not through Orbax's checkpointer, which syncs processes),
    so that a process that fails here still meets the others where they agree on the step. The
    iterator is set last, once everything else has checked out."""
    step_dir = self.root / str(step)
    digests = checkpoint_io.saved_digests(step_dir)
    target = checkpoint_io.in_saved_dtypes(abstract_state, digests) if digests else abstract_state
    with checkpoint_io.reading(step_dir, STATE):
      state = self._state_reader.restore(step_dir / STATE, args=ocp.args.StandardRestore(target))
    if digests:
      checkpoint_io.verify(step_dir, STATE, state, digests)
      checkpoint_io.read_step_config(step_dir, digests)
    if data_iter is not None:
      name = checkpoint_digest.file_name(jax.process_index(), jax.process_count())
      part = f'{DATA_ITER}/{name}'
      with checkpoint_io.reading(step_dir, part):
        text = (step_dir / part).read_bytes()
      if digests and digests['data_iter'].get(name) != checkpoint_digest.hexdigest(text):
        raise CheckpointUnreadable(step_dir, part, 'digest mismatch')
      with checkpoint_io.reading(step_dir, part):
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
        return step, checkpoint_io.cast_like(state, abstract_state), fits
      failed.append((step, cause))
    raise CheckpointUnreadable(
        self.root, 'steps ' + ', '.join(str(s) for s, _ in failed),
        '; '.join(f'step {s}: {why}' for s, why in failed),
        'nothing was moved or deleted: restore a step from a copy, or train in a new workdir to '
        'start from scratch')

  def _move_aside(self, step: int):
    """Renames `<step>` to `<step>.unreadable` (a free `.unreadable-<k>` if taken); process 0
    renames, every process waits for it."""
    aside, k = self.root / f'{step}{ASIDE_SUFFIX}', 1
    while aside.exists():
      k += 1
      aside = self.root / f'{step}{ASIDE_SUFFIX}-{k}'
    multi = jax.process_count() > 1
    if multi:  # every process has picked the same name before process 0 takes it
      from jax.experimental import multihost_utils  # local: multi-process runs only
      multihost_utils.sync_global_devices(f'vtp_jax: moving checkpoint {step} aside')
    if jax.process_index() == 0:
      (self.root / str(step)).rename(aside)
    if multi:
      multihost_utils.sync_global_devices(f'vtp_jax: checkpoint {step} moved aside')
    return aside


# -- train.init_from: partial restore from another checkpoint --------------------------------------

def _flat(tree) -> dict:
  return {tuple(getattr(k, 'key', getattr(k, 'name', k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _overwrite(fresh, shardings, read, source_md, scan: bool, what: str):
  """`fresh` with every leaf the source holds (same path and shape) replaced by the source's."""
  fresh_flat, shard_flat = _flat(fresh), _flat(shardings)
  if layout.is_scanned(source_md) == scan or not any('blocks' in str(k) for k in _flat(source_md)):
    src_md = _flat(source_md)
    matched = {k for k, m in src_md.items()
               if k in fresh_flat and tuple(m.shape) == fresh_flat[k].shape}
    target = {}
    for k in matched:  # rebuild a nested target holding only the matched leaves
      node = target
      for part in k[:-1]:
        node = node.setdefault(part, {})
      node[k[-1]] = jax.ShapeDtypeStruct(fresh_flat[k].shape, fresh_flat[k].dtype,
                                         sharding=shard_flat[k])
    loaded = _flat(read(target)) if matched else {}
  else:  # the source is in the other block layout: read on host, convert, place each leaf
    host = jax.tree.map(np.asarray, read(None))
    src = _flat(layout.to_layout(host, scan))
    src_md = src
    loaded = {}
    for k, value in src.items():
      if k in fresh_flat and value.shape == fresh_flat[k].shape:
        dtype = fresh_flat[k].dtype
        loaded[k] = jax.make_array_from_callback(
            value.shape, shard_flat[k], lambda idx, v=value, d=dtype: v[idx].astype(d))
    matched = set(loaded)
  mismatched = sorted('/'.join(map(str, k)) for k in src_md if k in fresh_flat and k not in matched)
  unused = sorted('/'.join(map(str, k)) for k in src_md if k not in fresh_flat)
  kept = sorted('/'.join(map(str, k)) for k in fresh_flat if k not in matched)
  logging.info('init_from %s: %d of %d arrays restored; %d keep their init%s%s%s', what,
               len(matched), len(fresh_flat), len(kept),
               f' ({", ".join(kept[:8])}{", ..." if len(kept) > 8 else ""})' if kept else '',
               f'; shape mismatch (kept init): {mismatched}' if mismatched else '',
               f'; {len(unused)} source arrays unused' if unused else '')
  leaves = [loaded[k].astype(fresh_flat[k].dtype) if k in loaded else fresh_flat[k]
            for k in fresh_flat]
  return jax.tree.unflatten(jax.tree.structure(fresh), leaves), len(matched)


def init_from(path, state, shardings, config):
  """`state` with the parameters (and EMA teacher) of the checkpoint at `path` written over it.

  `path` is a params folder (config.json + params[/teacher], e.g. imported reference weights) or a
  training workdir / step folder. Parameters missing from the source keep their fresh init; when
  the source has no teacher, the teacher starts as a copy of the (restored) student, as at init.
  The step, optimizer state and rng stay fresh: this starts a new run from old weights.
  """
  resolved = checkpoint_io.resolve(path)
  read = lambda item, target: checkpoint_io.load_item(resolved, item, target)  # noqa: E731
  metadata = lambda item: checkpoint_io.item_metadata(resolved, item)  # noqa: E731
  scan = bool(config.precision.scan_layers)
  params, n = _overwrite(state.params, shardings.params, lambda t: read('params', t),
                         metadata('params'), scan, f'{resolved}/params')
  if n == 0:
    raise ValueError(f'train.init_from={path}: no parameter of {resolved} matches this model '
                     '(names or shapes differ); check the config sizes.')
  teacher = state.teacher
  if teacher:
    if checkpoint_io.has_item(resolved, 'teacher'):
      teacher, _ = _overwrite(teacher, shardings.teacher, lambda t: read('teacher', t),
                              metadata('teacher'), scan, f'{resolved}/teacher')
    else:
      teacher = {k: params[k] for k in teacher}
  return state.replace(params=params, teacher=teacher)
