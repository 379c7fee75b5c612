"""Digests of what a training checkpoint saves, written with it and checked when it is read back.

Each process writes `digest/process_<i>-of-<n>.json` into the step folder, an item of the Orbax
composite checkpoint (so it commits with the step, or not at all). It holds the SHA-256 of every
array shard the process saves (its addressable shards of replica 0, keyed by the array's path in
the train state and the shard's region of the global array), of its data-iterator state file, and
(process 0) of the config. A read digests what it restored, in the saved dtype, and compares: a
flipped bit that the compressor lets through is caught, not only a broken compressed frame.
Each saved region is checked by the process that holds it after the restore, so a checkpoint
verifies on any mesh; on several processes a region that the new mesh splits between hosts is
checked by none (docs/checkpoints.md, 'Digests').

Hashing runs on host copies: at save, in Orbax's background commit, over `np.asarray` of each
shard (the device-to-host copy is cached on the shard, so Orbax's own copy reuses it); at restore,
over the restored shards. A few threads hash at once (hashlib releases the GIL).
"""

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp

from vtp_jax import paths

ITEM = 'digest'
ALGORITHM = 'sha256'  # hardware-accelerated on x86 (SHA-NI) and Arm; docs/checkpoints.md
HASH_THREADS = min(8, os.cpu_count() or 1)


def file_name(process_index: int, process_count: int) -> str:
  """The per-process file name, the one Grain uses for its iterator states."""
  return f'process_{process_index}-of-{process_count}.json'


def hexdigest(data) -> str:
  if isinstance(data, np.ndarray):
    data = memoryview(np.ascontiguousarray(data)).cast('B')
  return hashlib.new(ALGORITHM, data).hexdigest()


def canonical_json(obj) -> bytes:
  """A JSON value's bytes independent of how a writer spaced or ordered it."""
  return json.dumps(obj, sort_keys=True, separators=(',', ':')).encode()


def key_of(path) -> str:
  """An array's name in the digest files: its path in the tree, dot-joined (Orbax's spelling)."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '.'.join(parts)


def _region(index, shape) -> str:
  """A shard's index (a tuple of slices) as 'start:stop,...' over the global shape."""
  return ','.join(f'{s.indices(n)[0]}:{s.indices(n)[1]}' for s, n in zip(index, shape))


def _slices(region: str) -> tuple:
  return tuple(slice(*map(int, part.split(':'))) for part in region.split(',') if part)


@dataclasses.dataclass
class HostShard:
  key: str
  region: str
  shape: tuple  # the global array's
  dtype: str
  data: np.ndarray


def host_shards(tree) -> list[HostShard]:
  """Host copies of the shards this process saves (replica 0 of each addressable shard). Blocks
  until the copies are on the host; all transfers are started first so they overlap."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  chosen = []
  for path, leaf in leaves:
    if isinstance(leaf, jax.Array):
      shards = [s for s in leaf.addressable_shards if s.replica_id == 0]
      for s in shards:
        s.data.copy_to_host_async()
      chosen += [(key_of(path), leaf, s) for s in shards]
    elif jax.process_index() == 0:  # a host value (NumPy or Python scalar): process 0 saves it
      value = np.asarray(leaf)
      chosen.append((key_of(path), value, None))
  out = []
  for key, leaf, shard in chosen:
    if shard is None:
      whole = tuple(slice(None) for _ in leaf.shape)
      out.append(HostShard(key, _region(whole, leaf.shape), leaf.shape, str(leaf.dtype), leaf))
    else:
      out.append(HostShard(key, _region(shard.index, leaf.shape), tuple(leaf.shape),
                           str(leaf.dtype), np.asarray(shard.data)))
  return out


def _hash_all(arrays: list[np.ndarray]) -> list[str]:
  if len(arrays) < 2 or HASH_THREADS == 1:
    return [hexdigest(a) for a in arrays]
  with concurrent.futures.ThreadPoolExecutor(HASH_THREADS) as pool:
    return list(pool.map(hexdigest, arrays))


def digest_record(shards: list[HostShard], iterator_text: str | None, config_json) -> dict:
  """What one process writes: its shards' digests, its iterator state's, the config's."""
  arrays = {}
  for shard, digest in zip(shards, _hash_all([s.data for s in shards])):
    entry = arrays.setdefault(shard.key, {'shape': list(shard.shape), 'dtype': shard.dtype,
                                          'shards': {}})
    entry['shards'][shard.region] = digest
  record = {'algorithm': ALGORITHM, 'arrays': arrays}
  if iterator_text is not None:
    record['data_iter'] = hexdigest(iterator_text.encode())
  if config_json is not None:
    record['config'] = hexdigest(canonical_json(config_json))
  return record


# -- the Orbax item -----------------------------------------------------------------------------

def _write_text(path: paths.Path, text: str) -> None:
  path.write_text(text)


class DigestHandler(ocp.AsyncCheckpointHandler):
  """Writes this process's digest file; the hashing runs in the commit, off the training thread."""

  async def _save(self, directory, args):
    record = digest_record(args.shards, args.iterator_text, args.config_json)
    name = file_name(jax.process_index(), jax.process_count())
    _write_text(paths.path(directory) / name, json.dumps(record, sort_keys=True))

  async def async_save(self, directory, args):
    return [ocp.future.CommitFutureAwaitingContractedSignals(self._save(directory, args),
                                                             name='digest_save')]

  def save(self, directory, args):
    asyncio.run(self._save(directory, args))

  def restore(self, directory, args=None):
    del args
    return read_files(paths.path(directory))

  def finalize(self, directory):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(DigestHandler, for_save=True)
@dataclasses.dataclass
class DigestSave(ocp.args.CheckpointArgs):
  shards: list
  iterator_text: str | None = None
  config_json: dict | None = None


@ocp.args.register_with_handler(DigestHandler, for_restore=True)
@dataclasses.dataclass
class DigestRestore(ocp.args.CheckpointArgs):
  pass


# -- reading and checking -----------------------------------------------------------------------

def saved_with_digests(step_dir) -> bool:
  """Whether the step was written with a digest item (checkpoints from before digests were not);
  a step whose metadata names the item but whose folder is gone counts as having them."""
  step_dir = paths.path(step_dir)
  if (step_dir / ITEM).is_dir():
    return True
  metadata = step_dir / '_CHECKPOINT_METADATA'
  return metadata.exists() and ITEM in (json.loads(metadata.read_text()).get('item_handlers') or {})


def read_files(folder: paths.Path) -> dict:
  """Every process's digest file in `folder`, merged: {'arrays': {key: {'shape', 'dtype',
  'shards': {region: hex}}}, 'config': hex, 'data_iter': {file name: hex}}. Raises
  FileNotFoundError when a process's file is missing, ValueError when one does not parse."""
  folder = paths.path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f'{folder} is missing')
  files = [n for n in paths.child_names(folder) if re.fullmatch(r'process_\d+-of-\d+\.json', n)]
  if not files:
    raise FileNotFoundError(f'{folder} holds no digest file')
  count = int(files[0][:-len('.json')].rsplit('-of-', 1)[1])
  for i in range(count):
    if file_name(i, count) not in files:
      raise FileNotFoundError(f'{folder / file_name(i, count)} is missing')
  merged = {'arrays': {}, 'config': None, 'data_iter': {}}
  for i in range(count):
    record = json.loads((folder / file_name(i, count)).read_text())
    if record.get('algorithm') != ALGORITHM:
      raise ValueError(f'{folder / file_name(i, count)}: unknown algorithm '
                       f'{record.get("algorithm")!r}')
    for key, entry in record['arrays'].items():
      into = merged['arrays'].setdefault(key, {'shape': entry['shape'], 'dtype': entry['dtype'],
                                               'shards': {}})
      into['shards'].update(entry['shards'])
    if 'config' in record:
      merged['config'] = record['config']
    if 'data_iter' in record:
      merged['data_iter'][file_name(i, count)] = record['data_iter']
  return merged


def saved_dtypes(saved: dict, tree, prefix: str = '') -> dict:
  """{key: saved dtype} for the leaves of `tree` (prefixed by `prefix`) the digests describe."""
  out = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = prefix + key_of(path)
    if key in saved['arrays']:
      out[key] = np.dtype(saved['arrays'][key]['dtype'])
  return out


def _local_region(leaf, region: tuple, cache: dict):
  """The values of `region` of `leaf` when this process holds them (from one shard of replica 0,
  or, on a fully addressable array, from the assembled array); else None."""
  if not isinstance(leaf, jax.Array):
    return np.asarray(leaf)[region] if jax.process_index() == 0 else None
  for shard in leaf.addressable_shards:
    if shard.replica_id != 0:
      continue
    index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(shard.index, leaf.shape))
    if all(o.start <= r.start and r.stop <= o.stop for o, r in zip(index, region)):
      rel = tuple(slice(r.start - o.start, r.stop - o.start) for o, r in zip(index, region))
      return np.asarray(shard.data)[rel]
  if leaf.is_fully_addressable:
    if id(leaf) not in cache:
      cache[id(leaf)] = np.asarray(leaf)
    return cache[id(leaf)][region]
  return None


def verify_arrays(tree, saved: dict, prefix: str = '') -> list[str]:
  """Digests the restored `tree` (whose keys carry `prefix`, e.g. 'params.') against `saved`;
  returns one short problem per array that differs (empty when all that this process holds
  match). Arrays of `tree` the digests do not list are problems; saved arrays the tree does not
  hold (a partial restore) are not."""
  problems, checks, cache = [], [], {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = prefix + key_of(path)
    entry = saved['arrays'].get(key)
    if entry is None:
      problems.append(f'{key} has no digest')
      continue
    if list(leaf.shape) != entry['shape'] or str(leaf.dtype) != entry['dtype']:
      problems.append(f'{key} restored as {leaf.dtype}{list(leaf.shape)}, saved as '
                      f'{entry["dtype"]}{entry["shape"]}')
      continue
    for region, digest in entry['shards'].items():
      values = _local_region(leaf, _slices(region), cache)
      if values is not None:
        checks.append((key, values, digest))
  actual = _hash_all([values for _, values, _ in checks])
  bad = [key for (key, _, digest), got in zip(checks, actual) if got != digest]
  problems += [f'{key} digest mismatch' for key in dict.fromkeys(bad)]
  return problems
