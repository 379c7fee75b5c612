"""The Grain pipeline: skips counted by reason, exact usage of good records, resume, shares."""

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
from conftest import micro_config
from PIL import Image

from vtp_jax.data import pipeline

REASONS = ('missing_image', 'missing_caption', 'empty_caption', 'undecodable_image')


def _encode(array, fmt='JPEG', mode=None):
  image = Image.fromarray(array)
  if mode:
    image = image.convert(mode)
  buf = io.BytesIO()
  image.save(buf, fmt)
  return buf.getvalue()


def _picture(seed, h=40, w=48):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([np.sin(xx / (3 + seed % 5) + k) * 90 + 128 for k in range(3)], -1)
  return np.clip(base + rng.normal(0, 10, base.shape) + yy[..., None], 0, 255).astype(np.uint8)


class Records:
  """In-memory RandomAccessDataSource of raw records in the INTERFACES.md format."""

  def __init__(self, records):
    self._records = list(records)

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    return self._records[index % len(self._records)]

  def __repr__(self):
    return f'Records({len(self._records)})'


def good_records(n, start=0):
  return [{'key': f'good/{i}', 'image': _encode(_picture(i)), 'caption': f'picture {i}',
           'label': i} for i in range(start, start + n)]


def mixed_records():
  """Good records including hard-but-usable images, plus one bad record of each reason."""
  good = good_records(5)
  good += [
      {'key': 'ok/cmyk', 'image': _encode(_picture(10), 'JPEG', 'CMYK'), 'caption': 'cmyk',
       'label': 10},
      {'key': 'ok/grey_png', 'image': _encode(_picture(11)[..., 0], 'PNG'), 'caption': 'grey',
       'label': 11},
      {'key': 'ok/tiny', 'image': _encode(_picture(12, 10, 10), 'PNG'), 'caption': 'tiny',
       'label': 12}]
  bad = [
      ({'key': 'bad/truncated', 'image': _encode(_picture(13))[:200], 'caption': 'cut',
        'label': 13}, 'undecodable_image'),
      ({'key': 'bad/empty', 'image': _encode(_picture(14)), 'caption': '  ', 'label': 14},
       'empty_caption'),
      ({'key': 'bad/nocaption', 'image': _encode(_picture(15)), 'caption': None, 'label': 15},
       'missing_caption'),
      ({'key': 'bad/noimage', 'image': None, 'caption': 'no image', 'label': 16},
       'missing_image')]
  return good, bad


def _config(batch_size=8, **data):
  config = micro_config()
  # worker_count=0 unless a test asks: the default (-1, auto) would start one per core.
  config.data.update(batch_size=batch_size, read_threads=2, read_buffer_size=8, worker_count=0)
  config.data.update(**data)
  return config


def _all_batches(config, source, **kw):
  return list(pipeline.make_iterator(config, process_index=0, process_count=1, source=source,
                                     **kw))


def test_one_pass_uses_exactly_the_good_records_and_names_the_bad():
  good, bad = mixed_records()
  source = Records(good + [r for r, _ in bad])
  batches = _all_batches(_config(num_epochs=1), source, drop_remainder=False, with_keys=True)
  keys = [k for b in batches for k in b['keys']]
  assert sorted(keys) == sorted(r['key'] for r in good)  # each good record exactly once
  labels = np.concatenate([b['labels'] for b in batches])
  np.testing.assert_array_equal(labels, [int(k.split('/')[1]) if k.startswith('good') else
                                         {'ok/cmyk': 10, 'ok/grey_png': 11, 'ok/tiny': 12}[k]
                                         for k in keys])
  totals = {r: sum(int(b['skipped'][r]) for b in batches) for r in REASONS}
  assert totals == {r: 1 for r in REASONS}
  assert sorted(tuple(kr) for b in batches for kr in b['skipped_keys']) == sorted(
      (r['key'], reason) for r, reason in bad)
  first = batches[0]
  assert first['clip']['image'].shape == (8, 32, 32, 3)
  assert first['ssl']['global'].shape == (2, 2, 64, 64, 3)


def _add(tar, name, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_shards(folder):
  """Two img2dataset-style shards; returns (good keys -> label, bad keys -> skip reason)."""
  good, bad = {}, {}
  members = {'a.tar': [], 'b.tar': []}
  for i in range(7):
    members['a.tar' if i % 2 else 'b.tar'].append((f'{i:05d}', 'jpg', _encode(_picture(i)),
                                                   f'a good picture {i}'))
  members['a.tar'] += [('cmyk', 'jpg', _encode(_picture(20), 'JPEG', 'CMYK'), 'cmyk photo'),
                       ('grey', 'png', _encode(_picture(21)[..., 0], 'PNG'), 'grey photo'),
                       ('tiny', 'jpg', _encode(_picture(22, 10, 10)), 'a 10x10 photo')]
  members['b.tar'] += [('truncated', 'jpg', _encode(_picture(23))[:300], 'cut short'),
                       ('empty', 'jpg', _encode(_picture(24)), ''),
                       ('nocaption', 'jpg', _encode(_picture(25)), None),
                       ('noimage', None, None, 'a caption without its image')]
  reasons = {'truncated': 'undecodable_image', 'empty': 'empty_caption',
             'nocaption': 'missing_caption', 'noimage': 'missing_image'}
  for shard, records in members.items():
    with tarfile.open(folder / shard, 'w') as tar:
      for label, (key, ext, image, caption) in enumerate(records):
        if image is not None:
          _add(tar, f'{key}.{ext}', image)
        if caption is not None:
          _add(tar, f'{key}.txt', caption.encode())
        _add(tar, f'{key}.json', json.dumps({'label': label}).encode())
        if key in reasons:
          bad[f'{shard}/{key}'] = reasons[key]
        else:
          good[f'{shard}/{key}'] = label
  return good, bad


def test_tar_shards_yield_exactly_the_usable_records(tmp_path):
  (tmp_path / 'shards').mkdir()
  good, bad = write_shards(tmp_path / 'shards')
  config = _config(batch_size=len(good), num_epochs=1)
  config.data.source = f'tar:{tmp_path}/shards/*.tar'
  config.data.index_cache_dir = str(tmp_path / 'index')
  batches = list(pipeline.make_iterator(config, process_index=0, process_count=1,
                                        drop_remainder=False, with_keys=True))
  used = [k for b in batches for k in b['keys']]
  assert sorted(used) == sorted(good)
  np.testing.assert_array_equal(np.concatenate([b['labels'] for b in batches]),
                                [good[k] for k in used])
  assert dict(k for b in batches for k in b['skipped_keys']) == bad
  totals = {r: sum(int(b['skipped'][r]) for b in batches) for r in REASONS}
  assert totals == {r: 1 for r in REASONS}
  # One full batch; skips met after the last good record arrive in a record-less tail element.
  assert batches[0]['clip']['image'].shape == (len(good), 32, 32, 3)
  assert all(len(b['labels']) == 0 for b in batches[1:])


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if isinstance(a[k], dict):
      _assert_batches_equal(a[k], b[k])
    else:
      np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize('workers', [0, 2])
def test_restoring_state_after_batch_k_replays_the_next_five(workers):
  good, bad = mixed_records()
  source = Records(good_records(9, start=20) + good + [r for r, _ in bad])  # 21, across epochs
  config = _config(worker_count=workers, prefetch_buffer_size=1)
  k = 2
  it = pipeline.make_iterator(config, process_index=0, process_count=1, source=source)
  for _ in range(k):
    next(it)
  state = pickle.loads(pickle.dumps(it.get_state()))  # what a checkpoint stores
  want = [next(it) for _ in range(5)]
  it.close() if hasattr(it, 'close') else None
  restored = pipeline.make_iterator(config, process_index=0, process_count=1, source=source)
  restored.set_state(state)
  got = [next(restored) for _ in range(5)]
  restored.close() if hasattr(restored, 'close') else None
  for a, b in zip(want, got):
    _assert_batches_equal(a, b)
  # Skips were met along the way and are reported additively.
  assert sum(int(v) for b in want for v in b['skipped'].values()) > 0


def test_same_seed_same_batches_other_seed_other_order():
  source = Records(good_records(16))
  config = _config()
  take = lambda c, **kw: [next(it) for it in [pipeline.make_iterator(
      c, process_index=0, process_count=1, source=source, **kw)] for _ in range(2)]
  first, again = take(config), take(config)
  for x, y in zip(first, again):
    _assert_batches_equal(x, y)
  other = take(config, epoch_seed=1)
  assert not np.array_equal(first[0]['labels'], other[0]['labels'])


def test_process_shares_are_disjoint_and_cover_the_epoch():
  source = Records(good_records(32))
  config = _config(num_epochs=1, batch_size=16)
  keys = []
  for p in range(2):
    batches = list(pipeline.make_iterator(config, process_index=p, process_count=2,
                                          source=source, with_keys=True))
    assert len(batches) == 2 and all(len(b['labels']) == 8 for b in batches)
    keys.append({k for b in batches for k in b['keys']})
  assert not keys[0] & keys[1]
  assert keys[0] | keys[1] == {f'good/{i}' for i in range(32)}


def test_sub_batches_are_random_subsets_of_the_clip_batch():
  # With whole-image crops and no flip, a reconstruction view equals its example's CLIP view.
  source = Records([{'key': f's/{i}', 'image': _encode(_picture(i, 32, 32), 'PNG'),
                     'caption': 'x', 'label': i} for i in range(16)])
  config = _config(batch_size=8, rec_batch_fraction=0.5, clip_crop_scale=(1.0, 1.0),
                   rec_crop_scale=(1.0, 1.0), rec_flip_probability=0.0)
  it = pipeline.make_iterator(config, process_index=0, process_count=1, source=source)
  chosen = set()
  for _ in range(6):
    batch = next(it)
    clip, rec = batch['clip']['image'], batch['rec']['image']
    rows = [int(np.flatnonzero((clip == r).all(axis=(1, 2, 3)))[0]) for r in rec]
    assert len(set(rows)) == len(rows) == 4
    chosen.add(tuple(rows))
  assert len(chosen) > 1  # not always the same rows


def test_only_active_branches_are_built():
  source = Records(good_records(8))
  config = _config(batch_size=8)
  config.loss.ssl_weight = 0.0
  batch = next(pipeline.make_iterator(config, process_index=0, process_count=1, source=source))
  assert set(batch) == {'clip', 'rec', 'labels', 'skipped'}


def test_bad_configs_get_clear_errors():
  source = Records(good_records(8))
  with pytest.raises(ValueError, match='does not divide over 3 JAX processes'):
    pipeline.make_iterator(_config(batch_size=8), process_index=0, process_count=3, source=source)
  with pytest.raises(ValueError, match='global_crop_scale'):
    pipeline.make_iterator(_config(global_crop_scale=(0.5, 0.1)), process_index=0,
                           process_count=1, source=source)
  all_bad = Records([{'key': f'bad/{i}', 'image': None, 'caption': 'x', 'label': 0}
                     for i in range(30)])
  with pytest.raises(ValueError, match='holds no usable image-caption pair'):
    next(pipeline.make_iterator(_config(), process_index=0, process_count=1, source=all_bad))
  with pytest.raises(ValueError, match='holds no records'):
    pipeline.make_iterator(_config(), process_index=0, process_count=1, source=Records([]))


@pytest.mark.parametrize('cores,want', [(1, 0), (2, 0), (4, 2), (16, 14), (32, 28), (64, 56),
                                        (208, 128), (224, 128)])
def test_auto_worker_count_rule(cores, want):
  # All cores but max(2, min(8, cores // 8)), at most 128 (the documented rule, by hand).
  assert pipeline.auto_worker_count(cores) == want
  config = _config(worker_count=-1)
  assert pipeline.resolve_worker_count(config, cores, ram_bytes=2**40) == want
  for explicit in (0, 3):
    config.data.worker_count = explicit
    assert pipeline.resolve_worker_count(config, cores, ram_bytes=1) == explicit  # kept as set


def test_auto_worker_count_stays_within_half_the_ram():
  # A VTP-S host share (8,192 images) by hand: CLIP 256^2*3, SSL quarter 2*224^2*3 + 8*96^2*3
  # + masks, rec eighth 256^2*3 bytes; tokens int32. Three batches a worker (2 ready + 1 built).
  config = _config(worker_count=-1, batch_size=8192, image_size=256, global_crop_size=224,
                   local_crop_size=96, n_local_crops=8, prefetch_buffer_size=2)
  config.model.patch_size = 16
  image = 256 * 256 * 3
  ssl = 2 * 224 * 224 * 3 + 8 * 96 * 96 * 3 + 2 * 14 * 14
  batch = 8192 * (image + 4 * config.model.text.context_length) + 2048 * ssl + 1024 * image
  ram = 448 * 2**30  # a v5p host
  want = min(128, int(0.5 * ram // (3 * batch)))
  assert want < 128 and pipeline.resolve_worker_count(config, 208, ram_bytes=ram) == want


def test_scaled_and_full_decode_give_the_same_batches_for_small_images():
  """Images too small to shrink decode whole either way: the two modes agree bit for bit, and
  large JPEGs give the same shapes and nearly the same pixels."""
  source = Records(good_records(8))
  a = _all_batches(_config(decode='full', num_epochs=1), source)
  b = _all_batches(_config(decode='scaled', num_epochs=1), source)
  for x, y in zip(a, b):
    for branch in ('clip', 'rec'):
      np.testing.assert_array_equal(x[branch]['image'], y[branch]['image'])
  big = Records([{'key': f'big/{i}', 'image': _encode(_picture(i, 400, 480)), 'caption': 'big',
                  'label': i} for i in range(8)])
  config = _config(decode='scaled', num_epochs=1)
  scaled = _all_batches(config, big)
  full = _all_batches(_config(decode='full', num_epochs=1), big)
  for x, y in zip(scaled, full):
    assert x['clip']['image'].shape == y['clip']['image'].shape
    diff = np.abs(x['clip']['image'].astype(float) - y['clip']['image'].astype(float)).mean()
    assert diff < 8
  with pytest.raises(ValueError, match='data.decode'):
    _all_batches(_config(decode='half'), source)
