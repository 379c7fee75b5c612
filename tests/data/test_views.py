"""The three views: shapes, torchvision crop semantics, photometric ops against references."""

import math

import numpy as np
import pytest
import scipy.ndimage
from conftest import micro_config
from PIL import Image, ImageOps

from vtp_jax.data import views


def _image(h=40, w=56, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize('scale,ratio', [((0.05, 0.32), (3 / 4, 4 / 3)), ((0.32, 1.0), (0.5, 2.0)),
                                         ((0.9, 1.0), (3 / 4, 4 / 3))])
def test_crop_boxes_lie_in_the_scale_and_ratio_ranges(scale, ratio):
  height, width = 300, 400
  rng = np.random.default_rng(0)
  fractions, log_ratios = [], []
  for _ in range(2000):
    top, left, h, w = views.crop_params(height, width, scale, ratio, rng)
    assert 0 <= top <= height - h and 0 <= left <= width - w and h >= 1 and w >= 1
    # Accepted boxes satisfy torchvision's test; sides are rounded, so allow the 1/2-pixel slack.
    t_lo, t_hi = scale[0] * height * width, scale[1] * height * width
    assert (h - 0.5) * (w - 0.5) <= t_hi and (h + 0.5) * (w + 0.5) >= t_lo
    assert (w - 0.5) / (h + 0.5) <= ratio[1] and (w + 0.5) / (h - 0.5) >= ratio[0]
    fractions.append(h * w / (height * width))
    log_ratios.append(math.log(w / h))
  if scale[1] <= 0.32:  # every draw fits: area fraction ~ U(scale), log ratio ~ U(log ratio)
    assert abs(np.mean(fractions) - np.mean(scale)) < 0.01
    assert abs(np.mean(log_ratios) - np.mean(np.log(ratio))) < 0.02
    assert np.min(fractions) < scale[0] + 0.02 and np.max(fractions) > scale[1] - 0.02


def test_crop_falls_back_to_the_centre_crop():
  # A 10 x 100 strip: no box of >= 90% area has an aspect within [3/4, 4/3], so after 10 draws the
  # box is the centre crop of full height and width round(10 * 4/3) = 13.
  assert views.crop_params(10, 100, (0.9, 1.0), (3 / 4, 4 / 3), np.random.default_rng(0)) == (
      0, 43, 10, 13)
  assert views.crop_params(100, 10, (0.9, 1.0), (3 / 4, 4 / 3), np.random.default_rng(0)) == (
      (100 - 13) // 2, 0, 13, 10)


def test_resized_crop_is_crop_then_bicubic_resize():
  image = Image.fromarray(_image())
  out = views.random_resized_crop(image, 24, (0.2, 0.6), (3 / 4, 4 / 3), np.random.default_rng(3))
  top, left, h, w = views.crop_params(40, 56, (0.2, 0.6), (3 / 4, 4 / 3), np.random.default_rng(3))
  want = image.crop((left, top, left + w, top + h)).resize((24, 24), Image.BICUBIC)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


def test_grayscale_solarize_flip_match_formulas():
  x = _image()
  xf = x.astype(float)
  luma = (xf[..., 0] * 299 + xf[..., 1] * 587 + xf[..., 2] * 114) / 1000  # ITU-R 601-2
  g = views.grayscale(x)
  assert g.shape == x.shape and g.dtype == np.uint8
  assert np.abs(g.astype(float) - luma[..., None]).max() <= 1.0
  np.testing.assert_array_equal(views.solarize(x), np.asarray(ImageOps.solarize(
      Image.fromarray(x), 128)))
  np.testing.assert_array_equal(views.flip(x), x[:, ::-1])


def test_gaussian_blur_matches_a_2d_reflect_convolution():
  x = _image(20, 24)
  sigma = 1.3
  t = np.arange(9) - 4.0
  k1 = np.exp(-t ** 2 / (2 * sigma ** 2))
  k2 = np.outer(k1, k1) / k1.sum() ** 2
  want = np.stack([scipy.ndimage.correlate(x[..., c].astype(float), k2, mode='mirror')
                   for c in range(3)], -1)
  got = views.gaussian_blur(x, sigma)
  assert got.dtype == np.uint8
  assert np.abs(got.astype(float) - want).max() <= 1.0  # rounding only


def test_brightness_only_jitter_scales_pixels_by_one_factor():
  x = _image()
  out = np.asarray(views.color_jitter(Image.fromarray(x), (0.4, 0, 0, 0),
                                      np.random.default_rng(5))).astype(float)
  inside = (x > 20) & (out < 250)
  factor = (out[inside] * x[inside]).sum() / (x[inside].astype(float) ** 2).sum()  # least squares
  assert 0.6 <= factor <= 1.4
  assert np.abs(out - np.clip(x * factor, 0, 255)).max() <= 1.5


def test_hue_only_jitter_keeps_greys_and_value():
  x = _image()
  x[:5] = x[:5, :, :1]  # a band of grey pixels
  out = np.asarray(views.color_jitter(Image.fromarray(x), (0, 0, 0, 0.1),
                                      np.random.default_rng(2))).astype(int)
  np.testing.assert_array_equal(out[:5], x[:5])
  assert np.abs(out.max(-1) - x.max(-1)).max() <= 2  # HSV value round trip


def test_views_shapes_dtypes_and_determinism_including_a_10x10_image():
  config = micro_config()
  d = config.data
  for array in (_image(), _image(10, 10)):
    image = views.as_pil(array)
    clip = views.clip_view(image, config, np.random.default_rng(0))
    rec = views.rec_view(image, config, np.random.default_rng(0))
    g, loc = views.ssl_views(image, config, np.random.default_rng(0))
    assert clip.shape == rec.shape == (d.image_size, d.image_size, 3)
    assert g.shape == (2, d.global_crop_size, d.global_crop_size, 3)
    assert loc.shape == (d.n_local_crops, d.local_crop_size, d.local_crop_size, 3)
    assert {a.dtype for a in (clip, rec, g, loc)} == {np.dtype(np.uint8)}
    g2, loc2 = views.ssl_views(image, config, np.random.default_rng(0))
    np.testing.assert_array_equal(g, g2)
    np.testing.assert_array_equal(loc, loc2)
    g3, _ = views.ssl_views(image, config, np.random.default_rng(1))
    assert not np.array_equal(g, g3)


def test_rec_view_flip_and_whole_image_crop():
  config = micro_config()
  config.data.update(rec_crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rec_flip_probability=1.0)
  x = _image(40, 40)
  want = np.asarray(Image.fromarray(x).resize((32, 32), Image.BICUBIC))[:, ::-1]
  np.testing.assert_array_equal(views.rec_view(views.as_pil(x), config,
                                               np.random.default_rng(0)), want)


def test_grayscale_probability_over_many_crops():
  config = micro_config()
  config.data.update(n_local_crops=300, local_crop_size=16, color_jitter_probability=0.0,
                     grayscale_probability=0.2)
  _, loc = views.ssl_views(views.as_pil(_image()), config, np.random.default_rng(0))
  grey = np.all(loc == loc[..., :1], axis=(1, 2, 3))
  # Binomial(300, 0.2): mean 60, sd 6.9.
  assert 35 <= grey.sum() <= 85



def test_view_boxes_replay_the_views_own_draws():
  """view_boxes (drawn before decoding) names the very boxes the views then cut."""
  config = micro_config()
  image = views.as_pil(_image(50, 70))
  rngs = {b: np.random.default_rng(i) for i, b in enumerate(('clip', 'rec', 'ssl'))}
  boxes = views.view_boxes((50, 70), config, ('clip', 'rec', 'ssl'), rngs)
  cut = []
  real_crop = views.resized_crop
  views.resized_crop = lambda img, box, size, hw=None: cut.append((box, size)) or real_crop(
      img, box, size, hw)
  try:
    views.clip_view(image, config, np.random.default_rng(0))
    views.rec_view(image, config, np.random.default_rng(1))
    views.ssl_views(image, config, np.random.default_rng(2))
  finally:
    views.resized_crop = real_crop
  assert [(tuple(b), s) for b, s in boxes] == [(tuple(b), s) for b, s in cut]
  assert len(cut) == 2 + 2 + config.data.n_local_crops


def _min_side_reference(height, width, r):
  """Shorter side of the decoded image after a libjpeg reduction by r (ceil), as a fraction."""
  return math.ceil(height / r) / height, math.ceil(width / r) / width


@pytest.mark.parametrize('hw', [(1024, 1024), (768, 1024), (2000, 3000), (300, 451)])
def test_decode_reduction_keeps_every_drawn_crop_at_its_output_side(hw):
  d = micro_config().data
  d.update(image_size=256, global_crop_size=224, local_crop_size=96, n_local_crops=8,
           clip_crop_scale=(0.9, 1.0), global_crop_scale=(0.32, 1.0),
           local_crop_scale=(0.05, 0.32), rec_crop_scale=(0.8, 1.0), crop_ratio=(3 / 4, 4 / 3))
  config = micro_config()
  config.data = d
  seen = set()
  for seed in range(40):
    rngs = {b: np.random.default_rng([seed, i]) for i, b in enumerate(('clip', 'rec', 'ssl'))}
    boxes = views.view_boxes(hw, config, ('clip', 'rec', 'ssl'), rngs)
    r = views.decode_reduction(hw, boxes)
    seen.add(r)
    fy, fx = _min_side_reference(*hw, r)
    for (_, _, h, w), size in boxes:
      assert min(h * fy, w * fx) >= min(size, h, w)
    if r < 8:  # the next reduction would have shrunk some crop below its output side
      fy, fx = _min_side_reference(*hw, 2 * r)
      assert any(min(h * fy, w * fx) < min(size, h, w) for (_, _, h, w), size in boxes)
  if hw == (300, 451):
    assert seen == {1}
  if hw == (2000, 3000):
    assert max(seen) >= 4


def test_crop_on_a_reduced_image_matches_the_full_image_crop():
  yy, xx = np.mgrid[0:60, 0:80] / 80
  x = np.stack([np.sin(5 * xx + 3 * yy + k) * 100 + 128 for k in range(3)], -1).astype(np.uint8)
  half = views.as_pil(x.reshape(30, 2, 40, 2, 3).mean((1, 3)).round().astype(np.uint8))
  box = (11, 13, 35, 41)  # top, left, h, w on the 60 x 80 source: half-pixel edges on `half`
  full = np.asarray(views.resized_crop(views.as_pil(x), box, 16), np.float32)
  small = np.asarray(views.resized_crop(half, box, 16, (60, 80)), np.float32)
  ref = np.asarray(views.as_pil(x[11:46, 13:54]).resize((16, 16), Image.BICUBIC), np.float32)
  np.testing.assert_array_equal(full, ref)
  assert np.abs(small - ref).mean() < 2.0
