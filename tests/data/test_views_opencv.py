"""The OpenCV backend of the views (vtp_jax/data/views_opencv.py): each pixel operation against its
formula in NumPy, and against Pillow's (the torchvision reference) on photographs."""

import numpy as np
import pytest
import scipy.ndimage
from PIL import Image, ImageEnhance

from conftest import micro_config
from vtp_jax.data import views
from vtp_jax.data import views_opencv as cvv


def _image(h=40, w=56, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _luma(x):
  xf = x.astype(np.float64)
  return (xf[..., 0] * 299 + xf[..., 1] * 587 + xf[..., 2] * 114) / 1000  # ITU-R 601-2


def _photo_crops(n_per_photo=12, seed=0):
  """(crop, output side) pairs: random square-ish crops of scikit-image photographs."""
  from skimage import data as skdata
  rng = np.random.default_rng(seed)
  out = []
  for name in ('astronaut', 'coffee', 'chelsea', 'retina'):
    image = np.asarray(Image.fromarray(getattr(skdata, name)()).convert('RGB'))
    h, w = image.shape[:2]
    for _ in range(n_per_photo):
      ch = int(min(h, w) * rng.uniform(0.15, 1.0))
      cw = min(w, int(ch * rng.uniform(3 / 4, 4 / 3)))
      top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      out.append((np.ascontiguousarray(image[top:top + ch, left:left + cw]),
                  int(rng.choice([96, 224, 256]))))
  return out


def _edges(a):
  a = a.astype(np.float64)
  return np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean()


def test_resize_keeps_flat_colour_and_agrees_with_pillows_antialiased_bicubic():
  flat = np.full((300, 200, 3), (10, 128, 250), np.uint8)
  for size in (64, 96, 512):  # shrinking by 3.1 and 2.1, growing by 1.7
    np.testing.assert_array_equal(cvv.resize(flat, size), np.broadcast_to((10, 128, 250),
                                                                          (size, size, 3)))
  diffs, edge_ratios = [], []
  for crop, size in _photo_crops():
    got = cvv.resize(crop, size)
    want = np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC))
    assert got.shape == want.shape and got.dtype == np.uint8
    diffs.append(np.abs(got.astype(np.float64) - want).mean())
    edge_ratios.append(_edges(got) / _edges(want))
  # Each crop within a few grey levels; over all crops, as sharp as Pillow's within 5%.
  assert max(diffs) < 4.0 and np.mean(diffs) < 1.5, (max(diffs), np.mean(diffs))
  assert max(abs(r - 1) for r in edge_ratios) < 0.2 and abs(np.mean(edge_ratios) - 1) < 0.05, \
      edge_ratios


def test_box_on_a_reduced_image_cuts_the_same_region():
  x = np.zeros((80, 120, 3), np.uint8)
  x[20:60, 30:90] = 200  # a bright block; the box is exactly it
  half = x[::2, ::2]
  for image, hw in ((x, None), (half, (80, 120))):
    out = cvv.resized_crop(image, (20, 30, 40, 60), 16, hw)
    assert out.shape == (16, 16, 3) and (out == 200).all()


def test_grayscale_and_blur_match_their_formulas():
  x = _image()
  g = cvv.grayscale(x)
  assert g.shape == x.shape and g.dtype == np.uint8
  assert np.abs(g.astype(np.float64) - _luma(x)[..., None]).max() <= 1.0
  sigma, t = 1.3, np.arange(9) - 4.0
  k1 = np.exp(-t ** 2 / (2 * sigma ** 2))
  k2 = np.outer(k1, k1) / k1.sum() ** 2
  want = np.stack([scipy.ndimage.correlate(x[..., c].astype(float), k2, mode='mirror')
                   for c in range(3)], -1)  # NumPy's 'reflect' (torchvision's)
  got = cvv.gaussian_blur(x, sigma, 9)
  # OpenCV's 8-bit blur has fixed-point weights: a grey level and a bit, not just rounding.
  assert got.dtype == np.uint8 and np.abs(got.astype(np.float64) - want).max() <= 1.5


@pytest.mark.parametrize('factor', [0.6, 1.0, 1.4])
def test_brightness_contrast_saturation_match_the_pil_blends(factor):
  x = _image(seed=1)
  xf = x.astype(np.float64)
  grey = _luma(x)
  mean = int(np.asarray(Image.fromarray(x).convert('L')).mean() + 0.5)
  formulas = {
      cvv.adjust_brightness: xf * factor,
      cvv.adjust_contrast: mean + factor * (xf - mean),
      cvv.adjust_saturation: grey[..., None] + factor * (xf - grey[..., None]),
  }
  enhancers = {cvv.adjust_brightness: ImageEnhance.Brightness,
               cvv.adjust_contrast: ImageEnhance.Contrast,
               cvv.adjust_saturation: ImageEnhance.Color}
  for op, want in formulas.items():
    got = op(x, factor).astype(np.float64)
    assert np.abs(got - np.clip(want, 0, 255)).max() <= 1.5, op.__name__
    pil = np.asarray(enhancers[op](Image.fromarray(x)).enhance(factor)).astype(np.float64)
    assert np.abs(got - pil).max() <= 2.0, op.__name__


def test_hue_shift_keeps_greys_and_value_and_agrees_with_pils_hsv():
  x = _image(seed=2)
  x[:5] = x[:5, :, :1]  # a band of grey pixels
  for factor in (-0.1, 0.05, 0.1):
    got = cvv.adjust_hue(x, factor)
    np.testing.assert_array_equal(got[:5], x[:5])
    assert np.abs(got.max(-1).astype(int) - x.max(-1)).max() <= 2  # HSV value round trip
    pil = np.asarray(views._adjust_hue(Image.fromarray(x), factor)).astype(np.float64)  # pylint: disable=protected-access
    assert np.abs(got - pil).mean() < 2.0


def test_the_same_draws_give_the_same_crops_in_both_backends():
  """Handed an array, the views cut the boxes Pillow cuts from the PIL image and apply the same
  photometric choices: each view's mean within 2 grey levels, pixels within 4 on average (another
  box, flip or jitter order would differ by tens: 24 px local crops of a detailed photograph)."""
  from skimage import data as skdata
  config = micro_config()
  config.data.update(image_size=64, global_crop_size=56, local_crop_size=24, n_local_crops=4)
  x = np.asarray(Image.fromarray(skdata.astronaut()).resize((192, 160), Image.BICUBIC))
  for seed in range(3):
    arrays = [views.clip_view(x, config, np.random.default_rng(seed)),
              views.rec_view(x, config, np.random.default_rng(seed)),
              *views.ssl_views(x, config, np.random.default_rng(seed))]
    pil = views.as_pil(x)
    reference = [views.clip_view(pil, config, np.random.default_rng(seed)),
                 views.rec_view(pil, config, np.random.default_rng(seed)),
                 *views.ssl_views(pil, config, np.random.default_rng(seed))]
    for a, r in zip(arrays, reference):
      assert a.shape == r.shape and a.dtype == np.uint8
      a, r = a.astype(np.float64), r.astype(np.float64)
      assert abs(a.mean() - r.mean()) < 2.0 and np.abs(a - r).mean() < 4.0
