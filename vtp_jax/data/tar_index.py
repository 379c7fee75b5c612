"""Per-shard index of WebDataset tar files (as img2dataset writes them), cached on disk.

A shard holds members `KEY.jpg|jpeg|png|webp`, `KEY.txt` and optionally `KEY.json`, where KEY is
the member path without its last extension; members with the same KEY form one record. Reading
the member headers once gives every member's byte offset and size, so a record can later be read
with two byte-range reads instead of a scan: that is what makes tar shards random-access for Grain.

The index is JSON, written whole (vtp_jax/paths.py) beside the shard (`SHARD.tar.idx.json`) or,
when `cache_dir` is given or the shard's folder is not writable, in a cache folder under a name
derived from the shard's absolute path. It records the shard's size and version (a file's
modification time, an object's generation); a shard that changed since is re-indexed.

A shard may lie in a bucket (`gs://...`): it is scanned in one sequential read (a stream of the
object, no request per member), its index is cached beside it in the bucket when the bucket is
writable, else in the local DEFAULT_CACHE_DIR.
"""

import dataclasses
import hashlib
import json
import os
import tarfile

import fsspec
import numpy as np
from absl import logging

from vtp_jax import paths

INDEX_VERSION = 2
IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'vtp_jax', 'tar_index')


@dataclasses.dataclass
class ShardIndex:
  """Records of one shard in first-appearance order; offsets/sizes are -1 where a part is absent."""
  path: str
  keys: list  # record KEYs (member path without its last extension)
  image: np.ndarray  # (n, 2) int64: byte offset and size of the image member
  text: np.ndarray  # (n, 2) int64: the .txt member
  meta: np.ndarray  # (n, 2) int64: the .json member


def _fingerprint(path: str) -> dict:
  """What changes when the shard does: its size and version, read from the filesystem layer under
  vtp_jax.paths (epath's stat has whole seconds only): a local file's modification time (float
  seconds, sub-second), an object's generation (a new one at every write)."""
  fs, fs_path = fsspec.core.url_to_fs(path)
  info = fs.info(fs_path)
  changed = info.get('generation') or info.get('mtime')
  if hasattr(changed, 'timestamp'):
    changed = changed.timestamp()
  return {'path': path, 'size': int(info['size']), 'changed': changed, 'version': INDEX_VERSION}


def scan(path: str) -> ShardIndex:
  """Reads the member headers of an uncompressed tar and groups members by KEY (a local shard by
  seeking from header to header; a shard in a bucket as one stream, which reads the data too but
  in a few large requests instead of one per member)."""
  records = {}  # key -> {'image': (off, size), 'text': ..., 'meta': ...}; dicts keep order
  # 'r:' and 'r|' refuse compressed tars: they cannot be read at random offsets.
  mode = 'r|' if paths.is_bucket(path) else 'r:'
  try:
    with paths.path(path).open('rb') as f, tarfile.open(fileobj=f, mode=mode) as tar:
      for member in tar:
        if not member.isfile():
          continue
        stem, dot, ext = member.name.rpartition('.')
        if not dot or not stem:
          continue
        ext = ext.lower()
        part = ('image' if ext in IMAGE_EXTS else 'text' if ext == 'txt'
                else 'meta' if ext == 'json' else None)
        if part is None:
          continue
        parts = records.setdefault(stem, {})
        # A duplicate part (e.g. KEY.jpg and KEY.png) keeps the first, as readers in order would.
        parts.setdefault(part, (member.offset_data, member.size))
  except tarfile.ReadError as e:
    raise ValueError(f'{path} is not an uncompressed tar shard ({e}). WebDataset shards must be '
                     'plain .tar files (gzip-compressed tars cannot be read at random offsets); '
                     'decompress them first.') from e
  def column(part):
    return np.array([r.get(part, (-1, -1)) for r in records.values()], np.int64).reshape(-1, 2)
  return ShardIndex(path=path, keys=list(records), image=column('image'), text=column('text'),
                    meta=column('meta'))


def _cache_path(path: str, cache_dir: str | None) -> str:
  if cache_dir is None:
    return path + '.idx.json'
  digest = hashlib.sha1(path.encode()).hexdigest()[:16]
  return os.fspath(paths.path(cache_dir) / f'{paths.path(path).name}.{digest}.idx.json')


def _load(index_path: str, fingerprint: dict) -> ShardIndex | None:
  try:
    data = json.loads(paths.path(index_path).read_text())
  except Exception:  # pylint: disable=broad-except  (none, unreadable or forbidden: scan again)
    return None
  if data.get('fingerprint') != fingerprint:
    return None  # the shard changed (or moved) since it was indexed
  return ShardIndex(path=fingerprint['path'], keys=data['keys'],
                    image=np.array(data['image'], np.int64).reshape(-1, 2),
                    text=np.array(data['text'], np.int64).reshape(-1, 2),
                    meta=np.array(data['meta'], np.int64).reshape(-1, 2))


def _save(index_path: str, fingerprint: dict, index: ShardIndex) -> bool:
  """Writes the index whole (paths.write_whole); False when it cannot be written there (a
  read-only folder or bucket)."""
  text = json.dumps({'fingerprint': fingerprint, 'keys': index.keys, 'image': index.image.tolist(),
                     'text': index.text.tolist(), 'meta': index.meta.tolist()})
  try:
    paths.write_whole(index_path, text)
  except Exception as e:  # pylint: disable=broad-except  (OSError locally, HTTP errors in a bucket)
    logging.info('Could not cache the tar index at %s (%s: %s).', index_path, type(e).__name__, e)
    return False
  return True


def load_or_build(path: str, cache_dir: str | None = None) -> ShardIndex:
  """The shard's index from its cache when still valid, else scanned and cached.

  Args:
    path: an uncompressed tar shard, local or in a bucket.
    cache_dir: where to cache indexes (local or a bucket); None caches beside the shard, falling
      back to DEFAULT_CACHE_DIR (local) when the shard's folder is not writable.
  """
  path = os.fspath(paths.path(path))
  fingerprint = _fingerprint(path)
  candidates = [_cache_path(path, cache_dir)]
  if cache_dir is None:
    candidates.append(_cache_path(path, DEFAULT_CACHE_DIR))
  for candidate in candidates:
    index = _load(candidate, fingerprint)
    if index is not None:
      return index
  logging.info('Indexing tar shard %s', path)
  index = scan(path)
  for candidate in candidates:
    if _save(candidate, fingerprint, index):
      break
  else:
    logging.warning('Could not write the index of %s to %s; it will be rebuilt next time.',
                    path, ' or '.join(candidates))
  return index
