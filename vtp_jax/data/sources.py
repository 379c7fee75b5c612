"""Random-access sources of raw image-caption records, one per `config.data.source` string.

  tfds:NAME[:SPLIT]    a prepared TFDS dataset through `tfds.data_source` (no TensorFlow needed);
                       NAME may carry a version ('coco_captions:1.1.0'); SPLIT defaults to 'train'.
  tar:GLOB             WebDataset/img2dataset tar shards (vtp_jax/data/tar_index.py); GLOB may be
                       a folder (all its *.tar) or several globs separated by commas.
  arrayrecord:GLOB     ArrayRecord files of `encode_record` records (see tools/tar_to_arrayrecord).
  folder:PATH          images (jpg/jpeg/png/webp, recursive) with same-named .txt captions.
  shapes[:SPLIT]       the embedded vtp_shapes dataset, prepared on first use (data/shapes.py).

Every path and glob may be local or in a bucket (`gs://BUCKET/...`, through vtp_jax/paths.py):
tar members are read by byte range (seek + read on an open object), ArrayRecord files by
ArrayRecord's own GCS reader, TFDS's data_dir by TFDS. A bucket glob takes `*`, `?` and `[...]`
in any folder but not `**` (each folder level is a listing: name the levels).

Every source is a `grain.RandomAccessDataSource` (len, getitem, a stable repr for Grain's
checkpoint check) that pickles without open files, and yields raw records
{'key': str, 'image': bytes | None, 'caption': str | None, 'label': int}; vtp_jax/data/decode.py
turns them into pixels or a counted skip. TFDS image features are read undecoded
(`SkipDecoding`); a non-Image feature arrives as a uint8 array, which decode_record also accepts.
"""

import json
import os
import posixpath
import re
import struct
import threading
from collections import OrderedDict

import numpy as np
from absl import logging

from vtp_jax import paths as paths_lib
from vtp_jax.data import tar_index

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')

# ArrayRecord record layout (dependency-free, little-endian):
#   b'VTPR1' | uint32 header length | UTF-8 JSON header | image bytes
# header = {"key": str, "caption": str | null, "label": int, "image": bool}; with "image": false
# no bytes follow (a record without an image, kept so it is counted as skipped downstream).
_MAGIC = b'VTPR1'


def encode_record(raw: dict) -> bytes:
  """A raw record (image bytes or None) -> one ArrayRecord record."""
  image = raw.get('image')
  header = json.dumps({'key': raw['key'], 'caption': raw.get('caption'),
                       'label': int(raw.get('label', -1)), 'image': image is not None}).encode()
  body = b'' if image is None else bytes(image)
  return _MAGIC + struct.pack('<I', len(header)) + header + body


def parse_record(data: bytes) -> dict:
  """Inverse of encode_record."""
  if data[:len(_MAGIC)] != _MAGIC:
    raise ValueError(f'not a vtp_jax record (starts with {bytes(data[:8])!r}); ArrayRecord inputs '
                     'must be written by python -m vtp_jax.tools.tar_to_arrayrecord.')
  start = len(_MAGIC) + 4
  (size,) = struct.unpack('<I', data[len(_MAGIC):start])
  header = json.loads(data[start:start + size])
  image = bytes(data[start + size:]) if header['image'] else None
  return {'key': header['key'], 'image': image, 'caption': header['caption'],
          'label': int(header['label'])}


def expand_paths(pattern: str, *, folder_ext: str | None = None, what: str = 'files') -> list:
  """Sorted files matching comma-separated globs (local or in a bucket, see paths.glob_files); a folder
  means folder/*.ext."""
  found = []
  for part in [p.strip() for p in pattern.split(',') if p.strip()]:
    if not paths_lib.is_bucket(part):
      part = os.path.expanduser(part)
    if folder_ext and not paths_lib.GLOB_CHARS & set(part) and paths_lib.path(part).is_dir():
      part = os.fspath(paths_lib.path(part) / f'*.{folder_ext}')
    found.extend(paths_lib.glob_files(part))
  if not found:
    raise FileNotFoundError(f'No {what} match {pattern!r}. Check the path or glob in '
                            '--config.data.source.')
  return sorted(set(found))


def _short_names(files: list) -> list:
  """Paths relative to their common folder: unique, short record-key prefixes (the same for a
  folder of shards wherever it lies, a disk or a bucket)."""
  split = [paths_lib.split_scheme(os.fspath(paths_lib.path(f))) for f in files]
  if len({scheme for scheme, _ in split}) > 1:  # a disk and a bucket at once: keep them whole
    return [os.fspath(paths_lib.path(f)) for f in files]
  root = posixpath.commonpath([posixpath.dirname(rest) for _, rest in split])
  return [posixpath.relpath(rest, root) for _, rest in split]


class TarSource:
  """Records of WebDataset tar shards, read by byte offset through cached per-shard indexes.

  A read seeks an open shard (a local file, or an object read by byte range) and reads the
  member. Open shards wait in a pool between reads, so reads from several threads run at once
  (each on its own handle) and a shard is not reopened per record; at most _MAX_OPEN idle
  handles are kept per process, the least recently used closed first.
  """

  _MAX_OPEN = 128  # idle open shards kept per process (LRU); beyond it the oldest is closed

  def __init__(self, pattern: str, index_cache_dir: str | None = None, label_key: str = ''):
    self._pattern = pattern
    self._paths = expand_paths(pattern, folder_ext='tar', what='tar shards')
    self._names = _short_names(self._paths)
    self._label_key = label_key
    indexes = [tar_index.load_or_build(p, index_cache_dir) for p in self._paths]
    self._keys = [ix.keys for ix in indexes]
    self._parts = [np.stack([ix.image, ix.text, ix.meta], axis=1) for ix in indexes]  # (n, 3, 2)
    self._starts = np.cumsum([0] + [len(k) for k in self._keys])
    self._init_handles()

  def _init_handles(self):
    self._pid = os.getpid()
    self._lock = threading.Lock()
    self._idle = OrderedDict()  # shard -> [open handles not in use], least recently used first

  def __getstate__(self):
    state = dict(self.__dict__)
    for name in ('_pid', '_lock', '_idle'):
      state.pop(name)  # open files and locks do not cross process boundaries
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_handles()

  def close(self):
    """Closes this process's idle shard handles (reads reopen them as needed)."""
    with self._lock:
      handles = [h for shard_handles in self._idle.values() for h in shard_handles]
      self._idle.clear()
      if self._pid != os.getpid():
        return  # a fork's inherited handles belong to the parent
    for handle in handles:
      handle.close()

  def __del__(self):
    if hasattr(self, '_lock'):  # fully constructed
      try:
        self.close()
      except Exception:  # pylint: disable=broad-except  (interpreter shutdown: modules torn down)
        pass

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __repr__(self) -> str:
    return f'TarSource(pattern={self._pattern!r}, shards={len(self._paths)}, records={len(self)})'

  def _take(self, shard: int):
    with self._lock:
      if self._pid != os.getpid():  # forked: the inherited handles belong to the parent
        self._pid, self._idle = os.getpid(), OrderedDict()
      handles = self._idle.get(shard)
      if handles:
        return handles.pop()
    return paths_lib.path(self._paths[shard]).open('rb')

  def _give_back(self, shard: int, handle) -> None:
    evicted = []
    with self._lock:
      if self._pid != os.getpid():
        evicted.append(handle)
      else:
        self._idle.setdefault(shard, []).append(handle)
        self._idle.move_to_end(shard)
        while sum(len(h) for h in self._idle.values()) > self._MAX_OPEN:
          oldest = next(iter(self._idle))
          evicted.append(self._idle[oldest].pop(0))
          if not self._idle[oldest]:
            del self._idle[oldest]
    for h in evicted:
      h.close()

  def _read(self, shard: int, offset: int, size: int) -> bytes:
    handle = self._take(shard)
    try:
      handle.seek(offset)
      data = handle.read(size)
    except BaseException:
      handle.close()
      raise
    self._give_back(shard, handle)
    if len(data) != size:
      raise OSError(f'{self._paths[shard]}: {len(data)} bytes at offset {offset} where its index '
                    f'says {size}; the shard changed since it was indexed.')
    return data

  def __getitem__(self, index) -> dict:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'record {index} out of range for {len(self)} records')
    shard = int(np.searchsorted(self._starts, index, side='right')) - 1
    local = index - int(self._starts[shard])
    (img_off, img_size), (txt_off, txt_size), (meta_off, meta_size) = self._parts[shard][local]
    image = self._read(shard, img_off, img_size) if img_off >= 0 else None
    caption = None
    if txt_off >= 0:
      caption = self._read(shard, txt_off, txt_size).decode('utf-8', errors='replace')
    label = -1
    if self._label_key and meta_off >= 0:
      try:
        label = int(json.loads(self._read(shard, meta_off, meta_size))[self._label_key])
      except (ValueError, KeyError, TypeError):
        label = -1  # metadata without a usable label: the record is still an image-caption pair
    return {'key': f'{self._names[shard]}/{self._keys[shard][local]}', 'image': image,
            'caption': caption, 'label': label}


class ArrayRecordSource:
  """Records written by tools/tar_to_arrayrecord, through Grain's ArrayRecord reader."""

  def __init__(self, pattern: str):
    import grain  # pylint: disable=g-import-not-at-top  (heavy; only this source needs it)
    self._pattern = pattern
    paths = expand_paths(pattern, folder_ext='array_record', what='ArrayRecord files')
    self._source = grain.sources.ArrayRecordDataSource(paths)

  def __len__(self) -> int:
    return len(self._source)

  def __repr__(self) -> str:
    return f'ArrayRecordSource(pattern={self._pattern!r}, records={len(self)})'

  def __getitem__(self, index) -> dict:
    return parse_record(self._source[int(index)])


class FolderSource:
  """A folder of images with same-named .txt captions (a.jpg + a.txt); keys are relative paths."""

  def __init__(self, root: str):
    if not paths_lib.is_bucket(root):
      root = os.path.expanduser(root)
    root_path = paths_lib.path(root)
    if not root_path.is_dir():
      raise FileNotFoundError(f'folder source {os.fspath(root_path)!r} is not a folder; set '
                              '--config.data.source=folder:PATH to a folder of images with .txt '
                              'captions.')
    self._root = os.fspath(root_path)
    images, texts = [], set()
    for path in paths_lib.files_under(root_path):  # one listing; in a bucket, of every object
      rel = posixpath.relpath(paths_lib.split_scheme(os.fspath(path))[1],
                              paths_lib.split_scheme(self._root)[1])
      stem, _, ext = rel.rpartition('.')
      if ext.lower() in IMAGE_EXTS:
        images.append(rel)
      elif ext.lower() == 'txt':
        texts.add(stem)
    # Captions with no image stay visible as records, so a broken folder shows in the skip counts.
    stems = {p.rpartition('.')[0] for p in images}
    self._files = sorted(images) + sorted(f'{t}.txt' for t in texts - stems)
    self._captioned = texts  # stems with a .txt: a read asks for no file that is not there
    if not self._files:
      raise FileNotFoundError(f'folder source {self._root!r} holds no {"/".join(IMAGE_EXTS)} '
                              'images.')

  def __len__(self) -> int:
    return len(self._files)

  def __repr__(self) -> str:
    return f'FolderSource(root={self._root!r}, records={len(self)})'

  def __getitem__(self, index) -> dict:
    rel = self._files[int(index)]
    stem, _, ext = rel.rpartition('.')
    root = paths_lib.path(self._root)
    image = None
    if ext.lower() != 'txt':
      image = (root / rel).read_bytes()
    caption = None
    if stem in self._captioned:
      caption = (root / f'{stem}.txt').read_bytes().decode('utf-8', errors='replace')
    return {'key': rel, 'image': image, 'caption': caption, 'label': -1}


def _feature(features, key: str):
  for part in key.split('/'):
    features = features[part]
  return features


def _nested(tree: dict, key: str):
  for part in key.split('/'):
    tree = tree[part]
  return tree


def _first(value):
  """A Sequence feature (several captions or labels per image) contributes its first element."""
  if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.dtype == object):
    return value[0] if len(value) else None
  if isinstance(value, np.ndarray) and value.dtype.kind in 'SU' and value.ndim:
    return value.reshape(-1)[0] if value.size else None
  return value


class TfdsSource:
  """A prepared TFDS dataset's split, with configurable (possibly nested 'a/b') feature keys."""

  def __init__(self, name: str, split: str, data_dir: str | None, image_key: str = 'image',
               caption_key: str = 'caption', label_key: str = '', *, builder=None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if builder is None:
      # TFDS reads a data_dir in a bucket itself (a string: its own epath).
      builder = tfds.builder(name, data_dir=os.fspath(data_dir) if data_dir else None)
      if not builder.is_prepared():
        raise FileNotFoundError(
            f'TFDS dataset {name!r} is not prepared in {builder.data_dir}. Prepare it first (for '
            f'example `tfds build {name.split(":")[0]} --data_dir=DIR`) and set '
            '--config.data.data_dir=DIR.')
    features = builder.info.features
    for what, key in (('image_key', image_key), ('caption_key', caption_key),
                      ('label_key', label_key)):
      if not key:
        continue
      try:
        _feature(features, key)
      except KeyError:
        raise KeyError(f'TFDS dataset {name!r} has no feature {key!r} (config.data.{what}); its '
                       f'features are {list(features.keys())}. Set --config.data.{what} (label_key '
                       'may be empty for none).') from None
    self._name, self._split = name, split
    self._keys = (image_key, caption_key, label_key)
    decoders = None
    if isinstance(_feature(features, image_key), tfds.features.Image):
      # Keep the encoded bytes: decoding belongs to decode_record, where failures are counted.
      decoders = tfds.decode.SkipDecoding()
      for part in reversed(image_key.split('/')):
        decoders = {part: decoders}
    self._source = builder.as_data_source(split, decoders=decoders)

  def __len__(self) -> int:
    return len(self._source)

  def __repr__(self) -> str:
    return (f'TfdsSource(name={self._name!r}, split={self._split!r}, keys={self._keys}, '
            f'records={len(self)})')

  def __getitem__(self, index) -> dict:
    index = int(index)
    example = self._source[index]
    image_key, caption_key, label_key = self._keys
    image = _first(_nested(example, image_key)) if image_key else None
    caption = _first(_nested(example, caption_key)) if caption_key else None
    if isinstance(caption, (bytes, np.bytes_)):
      caption = bytes(caption).decode('utf-8', errors='replace')
    label = -1
    if label_key:
      value = _first(_nested(example, label_key))
      label = -1 if value is None else int(np.asarray(value).reshape(-1)[0])
    return {'key': f'{self._split}/{index}', 'image': image,
            'caption': None if caption is None else str(caption), 'label': label}


_TFDS_RE = re.compile(r'^(?P<name>[^:\[\]]+?(?::\d+(?:\.\d+)*)?)(?::(?P<split>.+))?$')


def shapes_source(config, split: str = 'train'):
  """The vtp_shapes split at config.data.shapes_* sizes, prepared first if it is not yet."""
  from vtp_jax.data import shapes  # pylint: disable=g-import-not-at-top  (imports TFDS)
  d = config.data
  builder = shapes.builder(d.data_dir, d.shapes_train_size, d.shapes_val_size, d.shapes_image_size)
  if not builder.is_prepared():
    logging.info('vtp_shapes is not prepared in %s; preparing it now (local, no network).',
                 builder.data_dir)
    builder = shapes.prepare(d.data_dir, d.shapes_train_size, d.shapes_val_size,
                             d.shapes_image_size)
  name = f'vtp_shapes/{builder.builder_config.name}'
  return TfdsSource(name, split, None, 'image', 'caption', 'label', builder=builder)


def make_source(config):
  """The raw-record source named by config.data.source (see the module docstring)."""
  d = config.data
  spec = d.source
  kind, _, arg = spec.partition(':')
  if kind == 'shapes':
    return shapes_source(config, arg or 'train')
  if kind == 'tfds':
    match = _TFDS_RE.match(arg)
    if not arg or not match:
      raise ValueError(f'data.source={spec!r}: expected tfds:NAME[:SPLIT], '
                       'e.g. tfds:coco_captions:train')
    return TfdsSource(match['name'], match['split'] or 'train', d.data_dir, d.image_key,
                      d.caption_key, d.label_key)
  if kind == 'tar':
    return TarSource(arg, d.index_cache_dir or None, d.label_key)
  if kind == 'arrayrecord':
    return ArrayRecordSource(arg)
  if kind == 'folder':
    return FolderSource(arg)
  raise ValueError(f'data.source={spec!r}: the kind must be one of tfds:, tar:, arrayrecord:, '
                   'folder:, shapes (e.g. --config.data.source=tar:/data/laion/*.tar).')
