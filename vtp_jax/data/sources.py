"""Random-access sources of raw image-caption records, one per `config.data.source` string.

  tfds:NAME[:SPLIT]    a prepared TFDS dataset through `tfds.data_source` (no TensorFlow needed);
                       NAME may carry a version ('coco_captions:1.1.0'); SPLIT defaults to 'train'.
  tar:GLOB             WebDataset/img2dataset tar shards (vtp_jax/data/tar_index.py); GLOB may be
                       a folder (all its *.tar) or several globs separated by commas.
  arrayrecord:GLOB     ArrayRecord files of `encode_record` records (see tools/tar_to_arrayrecord).
  folder:PATH          images (jpg/jpeg/png/webp, recursive) with same-named .txt captions.
  shapes[:SPLIT]       the embedded vtp_shapes dataset, prepared on first use (data/shapes.py).

Every source is a `grain.RandomAccessDataSource` (len, getitem, a stable repr for Grain's
checkpoint check) that pickles without open files, and yields raw records
{'key': str, 'image': bytes | None, 'caption': str | None, 'label': int}; vtp_jax/data/decode.py
turns them into pixels or a counted skip. TFDS image features are read undecoded
(`SkipDecoding`); a non-Image feature arrives as a uint8 array, which decode_record also accepts.
"""

import glob
import json
import os
import re
import struct
import threading
from collections import OrderedDict

import numpy as np
from absl import logging

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
  """Sorted files matching comma-separated globs ('~' expanded); a folder means folder/*.ext."""
  paths = []
  for part in [p.strip() for p in pattern.split(',') if p.strip()]:
    part = os.path.expanduser(part)
    if folder_ext and os.path.isdir(part):
      part = os.path.join(part, f'*.{folder_ext}')
    paths.extend(p for p in glob.glob(part, recursive=True) if os.path.isfile(p))
  if not paths:
    raise FileNotFoundError(f'No {what} match {pattern!r}. Check the path or glob in '
                            '--config.data.source.')
  return sorted(set(paths))


def _short_names(paths: list) -> list:
  """Paths relative to their common folder: unique, short record-key prefixes."""
  root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
  return [os.path.relpath(os.path.abspath(p), root) for p in paths]


class TarSource:
  """Records of WebDataset tar shards, read by byte offset through cached per-shard indexes."""

  _MAX_OPEN = 128  # open shard files kept per process (LRU); beyond it the oldest is closed

  def __init__(self, pattern: str, index_cache_dir: str | None = None, label_key: str = ''):
    self._pattern = pattern
    self._paths = [os.path.abspath(p) for p in expand_paths(pattern, folder_ext='tar',
                                                            what='tar shards')]
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
    self._fds = OrderedDict()

  def __getstate__(self):
    state = dict(self.__dict__)
    for name in ('_pid', '_lock', '_fds'):
      state.pop(name)  # file descriptors and locks do not cross process boundaries
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_handles()

  def close(self):
    """Closes this process's open shard files (reads reopen them as needed)."""
    with self._lock:
      if self._pid == os.getpid():
        for fd in self._fds.values():
          os.close(fd)
      self._fds = OrderedDict()

  def __del__(self):
    if hasattr(self, '_lock'):  # fully constructed
      self.close()

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __repr__(self) -> str:
    return f'TarSource(pattern={self._pattern!r}, shards={len(self._paths)}, records={len(self)})'

  def _read(self, shard: int, offset: int, size: int) -> bytes:
    with self._lock:  # reads under the lock too, so an LRU eviction never closes an fd in use
      if self._pid != os.getpid():  # forked: the inherited descriptors belong to the parent
        self._pid, self._fds = os.getpid(), OrderedDict()
      fd = self._fds.get(shard)
      if fd is None:
        fd = os.open(self._paths[shard], os.O_RDONLY)
        self._fds[shard] = fd
        if len(self._fds) > self._MAX_OPEN:
          os.close(self._fds.popitem(last=False)[1])
      self._fds.move_to_end(shard)
      return os.pread(fd, size, offset)

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
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
      raise FileNotFoundError(f'folder source {root!r} is not a folder; set --config.data.source='
                              'folder:PATH to a folder of images with .txt captions.')
    self._root = root
    images, texts = [], set()
    for folder, _, files in os.walk(root):
      for name in files:
        rel = os.path.relpath(os.path.join(folder, name), root)
        stem, _, ext = rel.rpartition('.')
        if ext.lower() in IMAGE_EXTS:
          images.append(rel)
        elif ext.lower() == 'txt':
          texts.add(stem)
    # Captions with no image stay visible as records, so a broken folder shows in the skip counts.
    stems = {p.rpartition('.')[0] for p in images}
    self._files = sorted(images) + sorted(f'{t}.txt' for t in texts - stems)
    if not self._files:
      raise FileNotFoundError(f'folder source {root!r} holds no {"/".join(IMAGE_EXTS)} images.')

  def __len__(self) -> int:
    return len(self._files)

  def __repr__(self) -> str:
    return f'FolderSource(root={self._root!r}, records={len(self)})'

  def __getitem__(self, index) -> dict:
    rel = self._files[int(index)]
    stem, _, ext = rel.rpartition('.')
    image = None
    if ext.lower() != 'txt':
      with open(os.path.join(self._root, rel), 'rb') as f:
        image = f.read()
    caption = None
    txt = os.path.join(self._root, stem + '.txt')
    if os.path.exists(txt):
      with open(txt, 'rb') as f:
        caption = f.read().decode('utf-8', errors='replace')
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
      builder = tfds.builder(name, data_dir=data_dir or None)
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
