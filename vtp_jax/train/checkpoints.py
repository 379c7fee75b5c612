"""Training checkpoints: the one wrapper around Orbax's CheckpointManager the driver uses.
Reading a workdir's checkpoints back (for inference, export, init_from) is checkpoint_io.py's.

A training workdir holds `checkpoints/<step>/` folders, each with three Orbax items:
  state/     the whole TrainState (params, optimizer, teacher, centres, rng, discriminator)
  data_iter/ the Grain iterator state, one JSON per process (`process_<i>-of-<n>.json`)
  config/    config.json, the run's full config
Saves are asynchronous (the device-to-host copy blocks, the write does not); Orbax writes each step
into a temporary folder and renames it only once complete, so a process killed mid-save leaves no
step folder behind and resume never sees it (the leftover temporary folder is deleted on start).
Restores always name target shardings, so a checkpoint loads onto any mesh shape.

Also here: starting a run from another checkpoint (`train.init_from`, partial: parameters the
source holds overwrite the fresh init, the rest keep it), and the SIGTERM / preemption flag the
loop polls at step boundaries.
"""

import os
import signal

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from vtp_jax import checkpoint_io
from vtp_jax.checkpoint_io import CONFIG, DATA_ITER, STATE
from vtp_jax.models import layout


class Checkpoints:
  """Async saves of (state, data iterator, config) every N steps, keep K, resume the latest."""

  def __init__(self, workdir, keep: int):
    self.root = checkpoint_io.checkpoint_root(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=True, create=True,
        # A save killed mid-write leaves `<step>.orbax-checkpoint-tmp-*`: never listed as a step,
        # and deleted here so it cannot pile up.
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.root, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA_ITER: grain.checkpoint.CheckpointHandler(),
                       CONFIG: ocp.JsonCheckpointHandler(filename=checkpoint_io.CONFIG_FILE)})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, config) -> None:
    """Starts an async save; returns once the arrays are copied off the devices (the state may then
    be donated to the next step)."""
    config_json = checkpoint_io.config_to_dict(config)
    args = {STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(config_json)}
    if data_iter is not None:
      args[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def data_state_saved_here(self, step: int) -> bool:
    """Whether `step` holds an iterator state for this process index and count (a Grain state is
    per process; a run resumed with another process count re-positions its data instead)."""
    index, count = jax.process_index(), jax.process_count()
    return (self.root / str(step) / DATA_ITER / f'process_{index}-of-{count}.json').exists()

  def restore(self, step: int, abstract_state, data_iter=None):
    """The state at `step` placed as `abstract_state`'s shardings; restores `data_iter` in place
    when given (the caller checks `data_state_saved_here` first)."""
    args = {STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      args[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return restored[STATE]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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


# -- SIGTERM / preemption --------------------------------------------------------------------------

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
