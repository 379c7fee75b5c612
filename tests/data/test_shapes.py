"""vtp_shapes: deterministic scenes whose labels and captions match the pixels; offline TFDS."""

import colorsys
import pickle
import socket

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import base
from vtp_jax.data import decode, shapes, sources

# Hue ranges (degrees) that the eight colour names mean, written down independently of the renderer.
HUES = {'red': [(345, 360), (0, 15)], 'orange': [(15, 40)], 'yellow': [(40, 70)],
        'green': [(70, 160)], 'cyan': [(160, 200)], 'blue': [(200, 255)], 'purple': [(255, 300)],
        'pink': [(300, 345)]}


def _colour_counts(image):
  """Pixels per colour name among clearly saturated pixels (the desaturated background is not)."""
  rgb = image.reshape(-1, 3) / 255.0
  counts = dict.fromkeys(HUES, 0)
  for r, g, b in rgb:
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    if s < 0.5 or v < 0.4:
      continue
    deg = h * 360
    for name, ranges in HUES.items():
      if any(lo <= deg < hi for lo, hi in ranges):
        counts[name] += 1
  return counts


@pytest.fixture(scope='module')
def renders():
  return [shapes.render_example(i, 'train', 32) for i in range(300)]


def test_vocabulary():
  assert len(shapes.COLOURS) >= 8 and len(shapes.SHAPES) >= 6
  assert set(shapes.COLOURS) <= set(HUES)
  names = shapes.class_names()
  assert len(names) == len(shapes.COLOURS) * len(shapes.SHAPES)
  assert names[3 * len(shapes.SHAPES) + 2] == f'{shapes.COLOURS[3]} {shapes.SHAPES[2]}'


def test_deterministic_in_split_and_index():
  a = shapes.render_example(17, 'train', 32)
  b = shapes.render_example(17, 'train', 32)
  np.testing.assert_array_equal(a['image'], b['image'])
  assert a['caption'] == b['caption'] and a['label'] == b['label']
  assert not np.array_equal(a['image'], shapes.render_example(18, 'train', 32)['image'])
  assert not np.array_equal(a['image'], shapes.render_example(17, 'validation', 32)['image'])


def test_labels_captions_and_variety(renders):
  seen_colours, seen_shapes, counts = set(), set(), set()
  for ex in renders:
    assert ex['image'].shape == (32, 32, 3) and ex['image'].dtype == np.uint8
    assert ex['label'] == ex['colour'] * len(shapes.SHAPES) + ex['shape']
    colour, shape = shapes.COLOURS[ex['colour']], shapes.SHAPES[ex['shape']]
    assert f'{colour} {shape}' in ex['caption']  # the largest object is always named
    assert 1 <= ex['num_objects'] <= 3
    seen_colours.add(colour)
    seen_shapes.add(shape)
    counts.add(ex['num_objects'])
  assert len(seen_colours) >= 8 and len(seen_shapes) >= 6 and counts == {1, 2, 3}
  assert len({ex['caption'] for ex in renders}) > 150  # varied wording, not one template
  assert len({ex['image'].std(axis=(0, 1)).round(1).tobytes() for ex in renders}) > 250


def test_labelled_colour_dominates_the_pixels(renders):
  """The labelled (largest) object's colour covers the most, and a sizeable part, of the image."""
  for ex in renders[:120]:
    counts = _colour_counts(ex['image'])
    colour = shapes.COLOURS[ex['colour']]
    assert max(counts, key=counts.get) == colour, (ex['caption'], counts)
    assert counts[colour] >= 0.06 * 32 * 32, (ex['caption'], counts)


def test_prepare_offline_and_read_through_tfds_and_grain(tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError(f'vtp_shapes preparation tried to open a connection: {args}')
  monkeypatch.setattr(socket.socket, 'connect', no_network)
  shapes.prepare(tmp_path, 40, 10, 32)
  name = 'vtp_shapes/' + shapes.config_name(40, 10, 32)
  train = tfds.data_source(name, split='train', data_dir=str(tmp_path))
  assert len(train) == 40
  assert len(tfds.data_source(name, split='validation', data_dir=str(tmp_path))) == 10
  ds = grain.MapDataset.source(train)
  for i in (0, 13, 39):
    ex, ref = ds[i], shapes.render_example(i, 'train', 32)
    np.testing.assert_array_equal(ex['image'], ref['image'])  # PNG is lossless; order is kept
    assert ex['caption'].decode() == ref['caption'] and ex['label'] == ref['label']
    assert (ex['colour'], ex['shape']) == (ref['colour'], ref['shape'])
  # A different size does not collide with this one.
  assert shapes.config_name(40, 10, 32) != shapes.config_name(40, 10, 64)


def test_make_source_prepares_shapes_on_first_use(tmp_path):
  config = base.get_config()
  config.data.data_dir = str(tmp_path)
  config.data.update(shapes_train_size=20, shapes_val_size=6, shapes_image_size=32)
  train = sources.make_source(config)
  assert len(train) == 20
  config.data.source = 'shapes:validation'
  val = sources.make_source(config)
  assert len(val) == 6 and 'validation' in repr(val)
  raw = val[4]
  assert raw['key'] == 'validation/4' and isinstance(raw['image'], bytes)
  rec = decode.decode_record(raw)
  ref = shapes.render_example(4, 'validation', 32)
  np.testing.assert_array_equal(rec['image'], ref['image'])
  assert rec['caption'] == ref['caption'] and rec['label'] == ref['label']
  assert pickle.loads(pickle.dumps(val))[4] == raw  # Grain workers receive sources pickled


def test_generic_tfds_source_with_custom_keys(tmp_path):
  shapes.prepare(tmp_path, 20, 6, 32)
  config = base.get_config()
  config.data.data_dir = str(tmp_path)
  config.data.source = f'tfds:vtp_shapes/{shapes.config_name(20, 6, 32)}:validation'
  config.data.label_key = 'colour'
  src = sources.make_source(config)
  ref = shapes.render_example(2, 'validation', 32)
  assert len(src) == 6 and src[2]['label'] == ref['colour'] and src[2]['caption'] == ref['caption']
  assert isinstance(src[2]['image'], bytes)  # Image features stay encoded (SkipDecoding)
  config.data.caption_key = 'text'
  with pytest.raises(KeyError, match='caption_key'):
    sources.make_source(config)
  config.data.source = 'tfds:mnist'
  with pytest.raises(FileNotFoundError, match='not prepared'):
    sources.make_source(config)
