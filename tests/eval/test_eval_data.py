"""Evaluation data: ADM centre crop and squash resize on hand-built images, evenly spaced example
choice, dataset-spec splits, skipped records, class names, and the command line's --set parser."""

import io

import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import micro_config
from vtp_jax.eval import data as eval_data

GREEN, RED = (0, 200, 0), (200, 0, 0)


def _png(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


def _sides_and_centre(h=64, w=128):
  """Red left and right quarters, a green centre square: what a centre crop must keep."""
  image = np.zeros((h, w, 3), np.uint8)
  image[:] = RED
  image[:, w // 4:3 * w // 4] = GREEN
  return image


def test_center_crop_arr_halves_resizes_and_keeps_the_centre():
  # Short side 64 >= 2 * 32: one BOX halving to 32x64, then the centre 32x32 is all green.
  out = eval_data.center_crop_arr(_sides_and_centre(), 32)
  assert out.shape == (32, 32, 3)
  assert np.all(out == GREEN)
  # A small, tall image is upscaled (bicubic) on its short side, then cropped vertically.
  tall = np.zeros((50, 20, 3), np.uint8)
  tall[:, :] = RED
  tall[20:30] = GREEN  # a green band across the middle rows
  out = eval_data.center_crop_arr(tall, 32)
  assert out.shape == (32, 32, 3)
  assert np.all(out[16, :] == GREEN) and np.all(out[0, :] == RED)
  squashed = eval_data.preprocess(_sides_and_centre(), 32, 'squash')
  assert squashed.shape == (32, 32, 3)
  assert np.all(squashed[:, 0] == RED) and np.all(squashed[:, 16] == GREEN)  # aspect not kept
  with pytest.raises(ValueError, match='preprocess'):
    eval_data.preprocess(tall, 32, 'zoom')


def test_example_indices_and_splits():
  np.testing.assert_array_equal(eval_data.example_indices(10, 4), [0, 2, 5, 7])
  np.testing.assert_array_equal(eval_data.example_indices(3, 0), [0, 1, 2])
  np.testing.assert_array_equal(eval_data.example_indices(3, 5), [0, 1, 2])
  assert eval_data.with_split('shapes', 'validation') == 'shapes:validation'
  assert eval_data.with_split('shapes:train', 'validation') == 'shapes:validation'
  assert eval_data.with_split('tfds:imagenette/160px', 'validation') == \
      'tfds:imagenette/160px:validation'
  assert eval_data.with_split('tfds:mnist:3.0.1:train', 'test') == 'tfds:mnist:3.0.1:test'
  assert eval_data.with_split('tar:/x/*.tar', None) == 'tar:/x/*.tar'
  with pytest.raises(ValueError, match='no splits'):
    eval_data.with_split('tar:/x/*.tar', 'validation')


def test_eval_images_batches_skip_bad_records_and_ignore_captions(monkeypatch):
  rng = np.random.default_rng(0)
  good = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(5)]
  source = [{'key': str(i), 'image': _png(im), 'caption': None, 'label': i}
            for i, im in enumerate(good)]
  source.insert(2, {'key': 'none', 'image': None, 'caption': 'x', 'label': 7})
  source.insert(4, {'key': 'bad', 'image': b'not an image', 'caption': 'x', 'label': 8})
  seen = {}

  def fake_open_source(config, spec, split=None):
    seen['spec'] = eval_data.with_split(spec, split)
    return source
  monkeypatch.setattr(eval_data, 'open_source', fake_open_source)
  config = micro_config()
  skipped = {}
  batches = list(eval_data.eval_images(config, 'shapes', 'validation', batch_size=2,
                                       skipped=skipped))
  assert seen['spec'] == 'shapes:validation'
  assert [b[0].shape for b in batches] == [(2, 32, 32, 3), (2, 32, 32, 3), (1, 32, 32, 3)]
  np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), [0, 1, 2, 3, 4])
  np.testing.assert_array_equal(batches[0][0][1], eval_data.center_crop_arr(good[1], 32))
  assert skipped == {'missing_image': 1, 'undecodable_image': 1}


def test_class_names_readable(tmp_path):
  wnids = [f'n{i:08d}' for i in range(1000)]
  names = eval_data.readable_names(wnids)
  assert names[0] == 'tench' and names[281] == 'tabby cat' and names[999] == 'toilet paper'
  assert eval_data.readable_names(['golden_retriever', 'cat']) == ['golden retriever', 'cat']
  config = micro_config()
  (tmp_path / 'names.txt').write_text('apple\nbanana\n\n')
  config.evals.class_names = str(tmp_path / 'names.txt')
  assert eval_data.class_names(config, 'tar:/x') == ['apple', 'banana']
  config.evals.class_names = ''
  with pytest.raises(ValueError, match='evals.class_names'):
    eval_data.class_names(config, 'tar:/x')


def test_command_line_overrides_are_typed_like_the_config():
  from vtp_jax.eval import common as cli
  config = ml_collections.ConfigDict({'evals': {'probe_steps': 1000, 'probe_lrs': '1e-3',
                                                'flag': False, 'scale': 1.0}})
  for assignment in ('evals.probe_steps=20', 'evals.probe_lrs=0.1,0.2', 'evals.flag=true',
                     'evals.scale=2'):
    cli.apply_override(config, assignment)
  assert config.evals.probe_steps == 20 and config.evals.probe_lrs == '0.1,0.2'
  assert config.evals.flag is True and config.evals.scale == 2.0
  with pytest.raises(ValueError, match='no such config key'):
    cli.apply_override(config, 'evals.nope=1')
