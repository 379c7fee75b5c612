"""Tar, folder and config-selected sources: exact keys, raw bytes, skip reasons, the index cache."""

import gc
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from configs import base
from vtp_jax.data import decode, sources, tar_index


def _img(mode, colour, fmt, size=(24, 20)):
  buf = io.BytesIO()
  Image.new(mode, size, colour).save(buf, format=fmt)
  return buf.getvalue()


def _good_jpeg():
  return _img('RGB', (200, 30, 30), 'JPEG')


def _write_tar(path, members):
  """members: list of (name, bytes), written in this order."""
  with tarfile.open(path, 'w') as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _shard_a():
  jpeg = _good_jpeg()
  return [('000000.jpg', jpeg), ('000000.txt', b'a red square'),
          ('000001.txt', b'caption written before its image'),  # members of one key not adjacent
          ('000001.json', json.dumps({'label': 3, 'url': 'x'}).encode()),
          ('000002.jpg', jpeg[:len(jpeg) // 2]), ('000002.txt', b'truncated jpeg'),
          ('000001.png', _img('RGB', (0, 90, 0), 'PNG')),
          ('000003.jpg', jpeg), ('000003.txt', b'  \n '),
          ('000004.jpg', jpeg),  # no caption
          ('000005.txt', b'no image'),
          ('README', b'not a record'), ('000006.bin', b'unknown extension ignored')]


def _shard_b():
  return [('sub/cmyk.jpeg', _img('CMYK', (0, 0, 255, 0), 'JPEG')), ('sub/cmyk.txt', b'cmyk'),
          ('sub/grey.png', _img('L', 128, 'PNG')), ('sub/grey.txt', b'grey'),
          ('sub/tiny.webp', _img('RGB', (9, 9, 9), 'WEBP', (10, 10))),
          ('sub/tiny.txt', 'tiny \u00e9'.encode())]


EXPECTED = {  # key -> (has image, has caption, outcome)
    'a.tar/000000': (True, True, 'ok'),
    'a.tar/000001': (True, True, 'ok'),
    'a.tar/000002': (True, True, 'undecodable_image'),
    'a.tar/000003': (True, True, 'empty_caption'),
    'a.tar/000004': (True, False, 'missing_caption'),
    'a.tar/000005': (False, True, 'missing_image'),
    'b.tar/sub/cmyk': (True, True, 'ok'),
    'b.tar/sub/grey': (True, True, 'ok'),
    'b.tar/sub/tiny': (True, True, 'ok')}


@pytest.fixture
def shards(tmp_path):
  data = tmp_path / 'shards'
  data.mkdir()
  _write_tar(data / 'a.tar', _shard_a())
  _write_tar(data / 'b.tar', _shard_b())
  return data


def _outcomes(src):
  out = {}
  for i in range(len(src)):
    raw = src[i]
    try:
      rec = decode.decode_record(raw)
      out[raw['key']] = ('ok', rec)
    except decode.BadRecord as e:
      out[raw['key']] = (e.reason, None)
  return out


def test_tar_source_keys_presence_and_skip_reasons(shards):
  src = sources.TarSource(str(shards / '*.tar'), label_key='label')
  raws = {src[i]['key']: src[i] for i in range(len(src))}
  assert set(raws) == set(EXPECTED) and len(src) == len(EXPECTED)
  for key, (has_image, has_caption, _) in EXPECTED.items():
    assert (raws[key]['image'] is not None, raws[key]['caption'] is not None) == (has_image,
                                                                                  has_caption), key
  # Bytes are exactly the members' bytes.
  members = dict(_shard_a())
  assert raws['a.tar/000001']['image'] == members['000001.png']
  assert raws['a.tar/000001']['caption'] == 'caption written before its image'
  assert raws['a.tar/000001']['label'] == 3 and raws['a.tar/000000']['label'] == -1
  assert raws['b.tar/sub/tiny']['caption'] == 'tiny \u00e9'
  outcomes = _outcomes(src)
  assert {k: v[0] for k, v in outcomes.items()} == {k: v[2] for k, v in EXPECTED.items()}
  # Good records decode to the right pixels: CMYK (0,0,255,0) is yellow, grey stays grey.
  np.testing.assert_allclose(outcomes['b.tar/sub/cmyk'][1]['image'][0, 0], [255, 255, 0], atol=6)
  np.testing.assert_array_equal(outcomes['b.tar/sub/grey'][1]['image'], 128)
  assert outcomes['b.tar/sub/tiny'][1]['image'].shape == (10, 10, 3)


def test_tar_index_cached_beside_shard_and_rebuilt_when_changed(shards, monkeypatch):
  calls = []
  real_scan = tar_index.scan
  monkeypatch.setattr(tar_index, 'scan', lambda p: calls.append(p) or real_scan(p))
  sources.TarSource(str(shards / 'a.tar'))
  assert len(calls) == 1 and (shards / 'a.tar.idx.json').exists()
  again = sources.TarSource(str(shards / 'a.tar'))
  assert len(calls) == 1 and len(again) == 6  # served from the cache, no rescan
  # Rewrite the shard with one more record: size and mtime change, so it is re-indexed.
  _write_tar(shards / 'a.tar', _shard_a() + [('000009.jpg', _good_jpeg()), ('000009.txt', b'new')])
  st = os.stat(shards / 'a.tar')
  os.utime(shards / 'a.tar', ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  changed = sources.TarSource(str(shards / 'a.tar'))
  assert len(calls) == 2 and len(changed) == 7
  assert changed[6]['key'] == 'a.tar/000009' and changed[6]['caption'] == 'new'
  # Same size, new mtime (a caption edited in place): re-indexed too.
  with open(shards / 'a.tar', 'r+b') as f:
    f.seek(int(changed._parts[0][6, 1, 0]))
    f.write(b'NEW')
  os.utime(shards / 'a.tar', ns=(st.st_atime_ns, st.st_mtime_ns + 3 * 10**9))
  assert sources.TarSource(str(shards / 'a.tar'))[6]['caption'] == 'NEW' and len(calls) == 3


def test_tar_index_cache_dir(shards, tmp_path):
  cache = tmp_path / 'cache'
  src = sources.TarSource(str(shards), index_cache_dir=str(cache))  # a folder means folder/*.tar
  assert len(src) == len(EXPECTED)
  assert not list(shards.glob('*.idx.json'))
  assert len(list(cache.glob('*.idx.json'))) == 2


def test_tar_index_falls_back_to_user_cache_when_shard_folder_is_read_only(shards, tmp_path,
                                                                           monkeypatch):
  real_save = tar_index._save
  def save(index_path, fingerprint, index):  # as if the shard folder were read-only
    return False if os.path.dirname(index_path) == str(shards) else real_save(
        index_path, fingerprint, index)
  monkeypatch.setattr(tar_index, '_save', save)
  monkeypatch.setattr(tar_index, 'DEFAULT_CACHE_DIR', str(tmp_path / 'user_cache'))
  assert len(sources.TarSource(str(shards / 'b.tar'))) == 3
  assert not list(shards.glob('*.idx.json'))
  assert len(list((tmp_path / 'user_cache').glob('b.tar.*.idx.json'))) == 1
  calls = []
  monkeypatch.setattr(tar_index, 'scan', lambda p: calls.append(p))
  assert len(sources.TarSource(str(shards / 'b.tar'))) == 3 and not calls  # found in that cache


def _open_fds():
  return len(os.listdir('/proc/self/fd'))


def test_tar_source_pickles_after_reading_and_closes_files(shards):
  src = sources.TarSource(str(shards / '*.tar'))
  start = _open_fds()
  before = [src[i] for i in range(len(src))]  # opens one descriptor per shard
  assert _open_fds() == start + 2
  clone = pickle.loads(pickle.dumps(src))
  assert [clone[i] for i in range(len(clone))] == before
  assert repr(clone) == repr(src)
  del src, clone
  gc.collect()
  assert _open_fds() == start


def test_missing_globs_and_compressed_tars_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='nothing-here'):
    sources.TarSource(str(tmp_path / 'nothing-here-*.tar'))
  with tarfile.open(tmp_path / 'c.tar', 'w:gz') as tar:
    info = tarfile.TarInfo('x.txt')
    tar.addfile(info, io.BytesIO(b''))
  with pytest.raises(ValueError, match='uncompressed'):
    sources.TarSource(str(tmp_path / 'c.tar'))


def test_folder_source(tmp_path):
  root = tmp_path / 'imgs'
  (root / 'sub').mkdir(parents=True)
  (root / 'a.jpg').write_bytes(_good_jpeg())
  (root / 'a.txt').write_text('a red thing')
  (root / 'sub' / 'b.png').write_bytes(_img('RGB', (0, 0, 250), 'PNG'))
  (root / 'sub' / 'b.txt').write_text('blue')
  (root / 'c.webp').write_bytes(_img('RGB', (1, 2, 3), 'WEBP'))  # no caption
  (root / 'd.txt').write_text('caption without an image')
  (root / 'notes.md').write_text('ignored')
  src = sources.FolderSource(str(root))
  raws = [src[i] for i in range(len(src))]
  assert [r['key'] for r in raws] == ['a.jpg', 'c.webp', 'sub/b.png', 'd.txt']
  assert raws[0]['caption'] == 'a red thing' and raws[0]['image'] == _good_jpeg()
  assert raws[1]['caption'] is None and raws[3]['image'] is None
  assert raws[2]['image'] == (root / 'sub' / 'b.png').read_bytes() and raws[2]['label'] == -1


def test_make_source_dispatch(shards, tmp_path):
  config = base.get_config()
  config.data.source = f'tar:{shards}/a.tar,{shards}/b.tar'
  config.data.index_cache_dir = str(tmp_path / 'idx')
  assert len(sources.make_source(config)) == len(EXPECTED)
  (tmp_path / 'f').mkdir()
  (tmp_path / 'f' / 'x.png').write_bytes(_img('L', 3, 'PNG'))
  config.data.source = f'folder:{tmp_path / "f"}'
  assert sources.make_source(config)[0]['key'] == 'x.png'
  for bad in ['webdataset:/x', 'tfds:']:
    config.data.source = bad
    with pytest.raises(ValueError, match='data.source'):
      sources.make_source(config)


def test_tfds_spec_parsing():
  cases = {'mnist': ('mnist', None), 'mnist:test': ('mnist', 'test'),
           'coco_captions/2017:1.1.0': ('coco_captions/2017:1.1.0', None),
           'mnist:3.0.1:train[:10%]': ('mnist:3.0.1', 'train[:10%]'),
           'mnist:train[10%:20%]': ('mnist', 'train[10%:20%]')}
  for spec, (name, split) in cases.items():
    match = sources._TFDS_RE.match(spec)
    assert (match['name'], match['split']) == (name, split), spec
