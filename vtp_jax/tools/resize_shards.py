"""Re-write a folder of tar or ArrayRecord shards with every image shrunk to a longest side.

  python -m vtp_jax.tools.resize_shards --input=DIR_OR_GLOB --output=DIR [--max_side=512]
      [--processes=N] [--quality=95]

Storing shards pre-resized (as img2dataset's resize does) makes every later epoch decode small
JPEGs: docs/scaling.md, 'The host keeps up'. Each shard becomes one shard of the same name and
kind in --output, its records in the same order with the same keys and captions (tar members
KEY.txt / KEY.json / others are copied byte for byte; an ArrayRecord record keeps its header):
- an image whose longest side exceeds --max_side is decoded (vtp_jax/data/decode.py: any mode
  becomes RGB, EXIF orientation applied), resized with Pillow's Lanczos filter (antialiased: this
  runs once, so quality wins over speed) and stored as JPEG (a tar member renamed KEY.jpg);
- a smaller image is checked by decoding and kept as its original bytes (no re-encoding loss);
- a record the training pipeline would skip (decode.decode_record raises BadRecord: no image, no
  or empty caption, an image that does not decode) is left out and counted by its reason, never
  fatal. One JSON summary is printed: per-reason skip counts and the first skipped keys.

Shards are processed in parallel, one per worker process (spawned: no inherited gcsfs state).
Paths go through vtp_jax.paths, so --input and --output may be in a bucket (gs://): a shard is
written to a local temporary file and then published whole (a rename on a disk, one upload to a
bucket), so a crash never leaves a truncated shard under its final name.
"""

import collections
import io
import json
import multiprocessing
import os
import tarfile
import tempfile

from absl import app, flags
from PIL import Image

from vtp_jax import paths
from vtp_jax.data import decode, sources
from vtp_jax.tools import tar_to_arrayrecord

SHARD_EXTS = ('tar', 'array_record')
MAX_SKIPPED_KEYS = 20  # skipped keys listed in the summary (all are counted)


def shrink(rgb, original: bytes, max_side: int, quality: int) -> tuple[bytes, bool]:
  """(bytes to store, whether re-encoded) for a decoded image and its original bytes."""
  height, width = rgb.shape[:2]
  if max(height, width) <= max_side:
    return original, False
  factor = max_side / max(height, width)
  size = (max(1, round(width * factor)), max(1, round(height * factor)))
  small = Image.fromarray(rgb).resize(size, Image.LANCZOS)
  buf = io.BytesIO()
  small.save(buf, 'JPEG', quality=quality)
  return buf.getvalue(), True


class _Counts:
  """One shard's accounting; `convert` turns a raw record into the image bytes to write."""

  def __init__(self, max_side: int, quality: int):
    self.max_side, self.quality = max_side, quality
    self.records, self.written, self.resized = 0, 0, 0
    self.skipped = collections.Counter()
    self.skipped_keys = []

  def convert(self, raw: dict) -> tuple[bytes, bool] | None:
    """(image bytes to write, whether re-encoded as JPEG) for `raw` (a sources record), or None:
    the record is skipped and counted."""
    self.records += 1
    try:
      # The pipeline's own checks, in its order: what training would skip is skipped here.
      record = decode.decode_record(raw)
    except decode.BadRecord as e:
      self.skipped[e.reason] += 1
      if len(self.skipped_keys) < MAX_SKIPPED_KEYS:
        self.skipped_keys.append([raw.get('key'), e.reason])
      return None
    image, resized = shrink(record['image'], bytes(raw['image']), self.max_side, self.quality)
    self.written += 1
    self.resized += resized
    return image, resized

  def summary(self) -> dict:
    return {'records': self.records, 'written': self.written, 'resized': self.resized,
            'skipped': dict(self.skipped), 'skipped_keys': self.skipped_keys}


def _tar_groups(tar: tarfile.TarFile):
  """(KEY, {extension: bytes}) of a tar read as a stream, members grouped by KEY in order.

  img2dataset writes a record's members next to each other; a KEY that reappears later starts a
  new group, as it would be a separate record only if the shard were scrambled.
  """
  key, parts = None, {}
  for member in tar:
    if not member.isfile():
      continue
    stem, dot, ext = member.name.rpartition('.')
    if not dot:
      stem, ext = member.name, ''
    if stem != key and parts:
      yield key, parts
      parts = {}
    key = stem
    parts[ext.lower()] = tar.extractfile(member).read()
  if parts:
    yield key, parts


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  info.mode = 0o644
  tar.addfile(info, io.BytesIO(data))


def _resize_tar(src: str, local_out: str, counts: _Counts) -> None:
  with paths.path(src).open('rb') as f, tarfile.open(fileobj=f, mode='r|') as tar_in, \
       tarfile.open(local_out, 'w', format=tarfile.PAX_FORMAT) as tar_out:
    for key, parts in _tar_groups(tar_in):
      image_ext = next((e for e in sources.IMAGE_EXTS if e in parts), None)
      caption = parts.get('txt')
      # Keys as training names them (TarSource: SHARD.tar/KEY), for the skipped-keys list.
      raw = {'key': f'{paths.path(src).name}/{key}',
             'image': parts.get(image_ext) if image_ext else None,
             'caption': None if caption is None else caption.decode('utf-8', errors='replace')}
      converted = counts.convert(raw)
      if converted is None:
        continue
      image, resized = converted
      for ext, data in parts.items():
        if ext == image_ext:
          _add(tar_out, f'{key}.{"jpg" if resized else ext}', image)
        elif ext not in sources.IMAGE_EXTS:  # caption, metadata and any other member as is
          _add(tar_out, f'{key}.{ext}' if ext else key, data)


def _resize_array_record(src: str, local_out: str, counts: _Counts) -> None:
  import grain  # pylint: disable=g-import-not-at-top  (heavy; only ArrayRecord needs it)
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  reader = grain.sources.ArrayRecordDataSource([src])
  writer = array_record_module.ArrayRecordWriter(local_out, tar_to_arrayrecord.WRITER_OPTIONS)
  try:
    for index in range(len(reader)):
      raw = sources.parse_record(reader[index])
      converted = counts.convert(raw)
      if converted is not None:
        writer.write(sources.encode_record({**raw, 'image': converted[0]}))
  finally:
    writer.close()


def resize_shard(args) -> dict:
  """One shard -> its resized copy under output_dir; returns the shard's summary."""
  src, output_dir, max_side, quality = args
  name = paths.path(src).name
  counts = _Counts(max_side, quality)
  with tempfile.TemporaryDirectory(prefix='vtp_resize_') as tmp:
    local = os.path.join(tmp, name)
    if name.endswith('.tar'):
      _resize_tar(src, local, counts)
    else:
      _resize_array_record(src, local, counts)
    # A rename on a local disk; one whole upload to a bucket (publish removes the local file).
    dst = paths.path(output_dir) / name
    if paths.is_bucket(dst):
      tar_to_arrayrecord.publish(local, dst)
    else:
      tmp_dst = dst.parent / f'.{name}.tmp'
      paths.path(local).copy(tmp_dst, overwrite=True)
      os.replace(tmp_dst, dst)
  return {'shard': src, **counts.summary()}


def find_shards(pattern: str) -> list:
  """Shards under a folder (its *.tar and *.array_record) or matching comma-separated globs."""
  found = []
  for ext in SHARD_EXTS:
    try:
      found += sources.expand_paths(pattern, folder_ext=ext, what=f'.{ext} shards')
    except FileNotFoundError:
      pass
  found = sorted({f for f in found if f.endswith(tuple(f'.{e}' for e in SHARD_EXTS))})
  if not found:
    raise FileNotFoundError(f'No .tar or .array_record shards match {pattern!r}.')
  return found


def resize_shards(pattern: str, output_dir: str, max_side: int = 512, processes: int = 0,
                  quality: int = 95) -> dict:
  """Resizes every shard matching `pattern` into output_dir; returns the JSON summary."""
  if max_side < 1:
    raise ValueError(f'max_side={max_side}; it must be at least 1.')
  shards = find_shards(pattern)
  out = paths.path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  clash = sorted(set(paths.child_names(out)) & {paths.path(s).name for s in shards})
  if clash:
    # Refuse rather than overwrite: --output equal to --input would destroy the originals.
    raise FileExistsError(f'{output_dir} already holds {clash[0]} (and {len(clash) - 1} more '
                          'shards of the input); choose an empty --output.')
  tasks = [(s, os.fspath(out), max_side, quality) for s in shards]
  processes = min(len(shards), processes or os.cpu_count() or 1)
  if processes <= 1:
    per_shard = [resize_shard(t) for t in tasks]
  else:
    with multiprocessing.get_context('spawn').Pool(processes) as pool:
      per_shard = pool.map(resize_shard, tasks, chunksize=1)
  skipped = collections.Counter()
  for s in per_shard:
    skipped.update(s['skipped'])
  return {'input': pattern, 'output': output_dir, 'max_side': max_side, 'shards': len(shards),
          'records': sum(s['records'] for s in per_shard),
          'written': sum(s['written'] for s in per_shard),
          'resized': sum(s['resized'] for s in per_shard),
          'skipped': {r: skipped[r] for r in decode.SKIP_REASONS},
          'skipped_keys': [k for s in per_shard for k in s['skipped_keys']][:MAX_SKIPPED_KEYS],
          'per_shard': [{k: s[k] for k in ('shard', 'records', 'written', 'resized', 'skipped')}
                        for s in per_shard]}


def main(argv):
  del argv
  f = flags.FLAGS
  print(json.dumps(resize_shards(f.input, f.output, f.max_side, f.processes, f.quality)))


if __name__ == '__main__':
  flags.DEFINE_string('input', None, 'a folder of .tar / .array_record shards, or globs')
  flags.DEFINE_string('output', None, 'folder for the resized shards (same names)')
  flags.DEFINE_integer('max_side', 512, 'longest image side after resizing (never upscales)')
  flags.DEFINE_integer('processes', 0, 'worker processes, one shard each; 0 = one per core')
  flags.DEFINE_integer('quality', 95, 'JPEG quality of re-encoded images')
  flags.mark_flags_as_required(['input', 'output'])
  app.run(main)
