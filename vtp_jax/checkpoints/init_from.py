"""`train.init_from`: a new run started from another checkpoint's parameters (and EMA teacher),
partially: parameters the source holds overwrite the fresh init, the rest keep it. The source is a
params folder or a training workdir / step folder, local or in a bucket (saved.py reads it), in
either block layout (scanned or not).
"""

import jax
import numpy as np
from absl import logging

from vtp_jax.checkpoints import saved
from vtp_jax.models import layout


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
  resolved = saved.resolve(path)
  read = lambda item, target: saved.load_item(resolved, item, target)  # noqa: E731
  metadata = lambda item: saved.item_metadata(resolved, item)  # noqa: E731
  scan = bool(config.precision.scan_layers)
  params, n = _overwrite(state.params, shardings.params, lambda t: read('params', t),
                         metadata('params'), scan, f'{resolved}/params')
  if n == 0:
    raise ValueError(f'train.init_from={path}: no parameter of {resolved} matches this model '
                     '(names or shapes differ); check the config sizes.')
  teacher = state.teacher
  if teacher:
    if saved.has_item(resolved, 'teacher'):
      teacher, _ = _overwrite(teacher, shardings.teacher, lambda t: read('teacher', t),
                              metadata('teacher'), scan, f'{resolved}/teacher')
    else:
      teacher = {k: params[k] for k in teacher}
  return state.replace(params=params, teacher=teacher)
