"""tar_to_arrayrecord: converting shards keeps every record (keys, bytes, captions, labels)."""

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from configs import base
from vtp_jax.data import sources
from vtp_jax.tools import tar_to_arrayrecord

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _jpeg(colour):
  buf = io.BytesIO()
  Image.new('RGB', (12, 8), colour).save(buf, format='JPEG')
  return buf.getvalue()


def _members(shard):
  out = []
  for i in range(4):
    out += [(f'{shard}{i:03d}.jpg', _jpeg((60 * i, 20, 200))), (f'{shard}{i:03d}.txt',
                                                               f'caption {shard} {i}'.encode()),
            (f'{shard}{i:03d}.json', json.dumps({'cls': i}).encode())]
  out += [(f'{shard}nocap.jpg', _jpeg((1, 1, 1))), (f'{shard}noimg.txt', b'orphan caption')]
  return out


@pytest.fixture
def shards(tmp_path):
  for shard in ('s0', 's1'):
    with tarfile.open(tmp_path / f'{shard}.tar', 'w') as tar:
      for name, data in _members(shard):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  return tmp_path


def _expected(shards):
  """The records, built from the members directly (not through TarSource)."""
  out = []
  for shard in ('s0', 's1'):
    members = dict(_members(shard))
    stems = list(dict.fromkeys(name.rpartition('.')[0] for name in members))
    for stem in stems:
      meta = members.get(stem + '.json')
      out.append({'key': f'{shard}.tar/{stem}', 'image': members.get(stem + '.jpg'),
                  'caption': members[stem + '.txt'].decode() if stem + '.txt' in members else None,
                  'label': json.loads(meta)['cls'] if meta else -1})
  return out


def test_round_trip(shards, tmp_path):
  out = tmp_path / 'ar'
  summary = tar_to_arrayrecord.convert(str(shards / '*.tar'), str(out), records_per_file=5,
                                       label_key='cls')
  expected = _expected(shards)
  assert summary['records'] == len(expected) == 12
  assert sorted(os.listdir(out)) == [f'part-{i:05d}.array_record' for i in range(3)]  # 5 + 5 + 2
  config = base.get_config()
  config.data.source = f'arrayrecord:{out}'
  src = sources.make_source(config)
  assert [src[i] for i in range(len(src))] == expected
  clone = pickle.loads(pickle.dumps(src))
  assert clone[7] == expected[7] and repr(clone) == repr(src)
  with pytest.raises(FileExistsError, match='already holds'):
    tar_to_arrayrecord.convert(str(shards / '*.tar'), str(out))


def test_record_format_rejects_foreign_bytes():
  raw = {'key': 'k', 'image': b'\x00\xff', 'caption': 'c', 'label': 2}
  assert sources.parse_record(sources.encode_record(raw)) == raw
  with pytest.raises(ValueError, match='tar_to_arrayrecord'):
    sources.parse_record(b'\x08\x01some tf.Example')


def test_command_line(shards, tmp_path):
  out = tmp_path / 'cli'
  result = subprocess.run(
      [sys.executable, '-m', 'vtp_jax.tools.tar_to_arrayrecord', f'--input={shards}/s1.tar',
       f'--output={out}', '--records_per_file=100'],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary['records'] == 6 and len(summary['files']) == 1
