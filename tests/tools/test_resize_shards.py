"""tools/resize_shards: tar and ArrayRecord shards keep keys, captions and metadata, images shrink
to the longest side asked, and every record the pipeline would skip is skipped and counted."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from vtp_jax.data import sources
from vtp_jax.tools import resize_shards


def _picture(h, w, seed):
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  rng = np.random.default_rng(seed)
  base = np.stack([np.sin(6 * xx + 3 * yy + k + seed) for k in range(3)], -1) * 100 + 128
  return np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)


def _encode(array, fmt='JPEG'):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, fmt)
  return buf.getvalue()


# (key, image array or None or b'...' raw bytes, caption or None, why it is skipped or None)
RECORDS = [
    ('a/big', _picture(300, 400, 0), 'a wide picture', None),
    ('a/tall_png', _picture(360, 120, 1), 'a tall png', None),
    ('a/small', _picture(60, 80, 2), 'already small', None),
    ('a/truncated', _encode(_picture(300, 400, 3))[:300], 'cut short', 'undecodable_image'),
    ('a/garbage', b'not an image at all', 'garbage', 'undecodable_image'),
    ('a/nocaption', _picture(200, 200, 4), None, 'missing_caption'),
    ('a/empty', _picture(200, 200, 5), '   ', 'empty_caption'),
    ('a/noimage', None, 'no image', 'missing_image'),
]
MAX_SIDE = 128


def _image_bytes(key, image):
  if image is None or isinstance(image, bytes):
    return image
  return _encode(image, 'PNG' if key.endswith('png') else 'JPEG')


def _write_tar(path, records):
  with tarfile.open(path, 'w') as tar:
    for i, (key, image, caption, _) in enumerate(records):
      members = {'json': json.dumps({'label': i}).encode()}
      data = _image_bytes(key, image)
      if data is not None:
        members['png' if key.endswith('png') else 'jpg'] = data
      if caption is not None:
        members['txt'] = caption.encode()
      for ext, payload in members.items():
        info = tarfile.TarInfo(f'{key}.{ext}')
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))


def _write_array_record(path, records):
  from array_record.python import array_record_module
  writer = array_record_module.ArrayRecordWriter(os.fspath(path), 'group_size:1')
  for i, (key, image, caption, _) in enumerate(records):
    writer.write(sources.encode_record({'key': key, 'image': _image_bytes(key, image),
                                        'caption': caption, 'label': i}))
  writer.close()


def _check(source, prefix):
  """The output holds the good records in order, shrunk as asked, with captions and labels."""
  good = [(i, r) for i, r in enumerate(RECORDS) if r[3] is None]
  assert len(source) == len(good)
  for n, (i, (key, image, caption, _)) in enumerate(good):
    out = source[n]
    assert out['key'] == prefix + key and out['caption'] == caption and out['label'] == i
    got = Image.open(io.BytesIO(out['image']))
    h, w = image.shape[:2]
    if max(h, w) <= MAX_SIDE:
      assert out['image'] == _image_bytes(key, image)  # kept byte for byte
    else:
      f = MAX_SIDE / max(h, w)
      assert got.format == 'JPEG' and got.size == (round(w * f), round(h * f))
      # An independent reference: Pillow's bicubic shrink of the original pixels.
      ref = np.asarray(Image.fromarray(image).resize(got.size, Image.BICUBIC), np.float32)
      assert np.abs(np.asarray(got.convert('RGB'), np.float32) - ref).mean() < 4


def test_tar_and_array_record_shards(tmp_path):
  src, dst = tmp_path / 'in', tmp_path / 'out'
  src.mkdir()
  _write_tar(src / 'shard-0.tar', RECORDS)
  _write_array_record(src / 'part-0.array_record', RECORDS)
  summary = resize_shards.resize_shards(os.fspath(src), os.fspath(dst), max_side=MAX_SIDE,
                                        processes=2)
  json.dumps(summary)  # printable as the tool prints it
  want_skips = {r: 2 * sum(rec[3] == r for rec in RECORDS)
                for r in ('missing_image', 'missing_caption', 'empty_caption',
                          'undecodable_image')}
  assert summary['skipped'] == want_skips
  assert summary['shards'] == 2 and summary['records'] == 2 * len(RECORDS)
  assert summary['written'] == 2 * sum(r[3] is None for r in RECORDS)
  assert summary['resized'] == 4  # a/big and a/tall_png in each shard
  assert sorted(os.listdir(dst)) == ['part-0.array_record', 'shard-0.tar']
  with tarfile.open(dst / 'shard-0.tar') as tar:
    names = tar.getnames()
  # Resized images become KEY.jpg; metadata members travel with their record.
  assert 'a/tall_png.jpg' in names and 'a/big.json' in names and 'a/nocaption.json' not in names
  _check(sources.TarSource(os.fspath(dst / 'shard-0.tar'), os.fspath(tmp_path / 'idx'),
                           label_key='label'), 'shard-0.tar/')
  _check(sources.ArrayRecordSource(os.fspath(dst)), '')


def test_refuses_to_overwrite_its_input(tmp_path):
  _write_tar(tmp_path / 'shard-0.tar', RECORDS[:1])
  with pytest.raises(FileExistsError, match='choose an empty --output'):
    resize_shards.resize_shards(os.fspath(tmp_path), os.fspath(tmp_path), processes=1)
