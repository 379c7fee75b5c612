"""Reconstruction quality of the autoencoder path: PSNR, SSIM, LPIPS and rFID (spec 4.1, VTP's
`test_reconstruction_hf.py`).

Originals are ADM centre crops; reconstructions are decode(encode(x)) denormalised, clamped to [0, 1]
and truncated to uint8 exactly as the reference saves its PNGs (`pixels.to_uint8`). Every metric is
computed between those two uint8 images:
  * PSNR: per image, 10 log10(255^2 / MSE) over all pixels and channels, averaged over images
    (a perfect reconstruction would be +inf; MSE is floored at 1e-10, i.e. 148 dB).
  * SSIM: Wang et al. 2004 per channel, Gaussian window 11x11 sigma 1.5, K1 0.01, K2 0.03,
    population covariances, data range 255, mean over the valid (un-padded) region and channels,
    = skimage.metrics.structural_similarity(gaussian_weights=True, use_sample_covariance=False,
    data_range=255, channel_axis=-1) and torchmetrics' SSIM (which VTP uses) up to the border.
  * LPIPS: VGG16-LPIPS (losses/recon.py) on [-1, 1] images, averaged.
  * rFID: Fréchet distance between Inception pool3 statistics of the reconstructions and of the
    originals (not an npz reference), when `evals.fid_weights` names converted weights. With fewer
    images than the paper's 50k it is biased upward: compare rFIDs at equal counts only.
"""

import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from vtp_jax import pixels
from vtp_jax.eval import common
from vtp_jax.eval import data as eval_data
from vtp_jax.eval import fid
from vtp_jax.eval import fid_weights
from vtp_jax.losses import recon

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # scipy.ndimage radius int(3.5 * 1.5 + 0.5) = 5: the 11-tap window
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(a_uint8, b_uint8) -> np.ndarray:
  """Per-image PSNR (N,) in dB between uint8 NHWC batches, on the [0, 255] scale."""
  a = np.asarray(a_uint8, np.float64)
  b = np.asarray(b_uint8, np.float64)
  mse = np.mean((a - b) ** 2, axis=tuple(range(1, a.ndim)))
  return 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def _gaussian_taps() -> np.ndarray:
  radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  w = np.exp(-0.5 * x ** 2 / SSIM_SIGMA ** 2)
  return (w / w.sum()).astype(np.float32)


def _filter_valid(x, taps):
  """Separable Gaussian filter over H and W, keeping only windows fully inside the image."""
  k = len(taps)
  h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
  x = sum(taps[i] * x[:, i:i + h] for i in range(k))
  return sum(taps[i] * x[:, :, i:i + w] for i in range(k))


@jax.jit
def _ssim(a, b):
  taps = _gaussian_taps()
  # Shifting by a constant leaves (co)variances unchanged and keeps E[x^2] - E[x]^2 from cancelling
  # catastrophically in float32 on values near 255.
  x = a.astype(jnp.float32) - 127.5
  y = b.astype(jnp.float32) - 127.5
  mx, my = _filter_valid(x, taps), _filter_valid(y, taps)
  vx = _filter_valid(x * x, taps) - mx * mx
  vy = _filter_valid(y * y, taps) - my * my
  vxy = _filter_valid(x * y, taps) - mx * my
  ux, uy = mx + 127.5, my + 127.5
  c1, c2 = (SSIM_K1 * 255.0) ** 2, (SSIM_K2 * 255.0) ** 2
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def ssim(a_uint8, b_uint8) -> np.ndarray:
  """Per-image SSIM (N,) between uint8 NHWC batches (see the module docstring)."""
  a, b = np.asarray(a_uint8), np.asarray(b_uint8)
  if a.shape != b.shape or a.ndim != 4:
    raise ValueError(f'SSIM takes two equal NHWC batches; got {a.shape} and {b.shape}.')
  if min(a.shape[1:3]) < len(_gaussian_taps()):
    raise ValueError(f'SSIM needs images of at least 11x11 pixels; got {a.shape[1:3]}.')
  return np.asarray(_ssim(a, b), np.float64)


@jax.jit
def _lpips(params, a, b):
  to_range = lambda x: x.astype(jnp.float32) / 127.5 - 1.0
  return recon.lpips(params, to_range(a), to_range(b))


def lpips(a_uint8, b_uint8, params=None) -> np.ndarray:
  """Per-image VGG16-LPIPS (N,) between uint8 NHWC batches."""
  params = recon.load_lpips_params() if params is None else params
  return np.asarray(_lpips(params, np.asarray(a_uint8), np.asarray(b_uint8)), np.float64)


def reconstruct_fn(tokenizer):
  """model-space images -> uint8 reconstructions, as the reference saves them."""
  return lambda x: pixels.to_uint8(tokenizer.decode(tokenizer.encode(x)))


@functools.lru_cache(maxsize=2)
def _cached_fid_params(path: str):
  return fid_weights.load_params(path)


def evaluate(pairs: Iterable, *, fid_params=None, fid_resize: int = fid.INPUT_SIZE,
             use_lpips: bool = True, batch_size: int | None = None) -> dict:
  """Metrics over an iterable of (original uint8, reconstruction uint8) batch pairs.

  Jitted metrics run on batches padded to `batch_size` (default: the first batch's size), so a
  ragged last batch does not compile them again.
  """
  scores = {'psnr': [], 'ssim': []}
  if use_lpips:
    scores['lpips'] = []
    lpips_params = recon.load_lpips_params()
  stats = (fid.RunningStats(), fid.RunningStats()) if fid_params is not None else None
  for original, rebuilt in pairs:
    batch_size = batch_size or original.shape[0]
    both = np.stack([original, rebuilt])  # (2, b, H, W, 3): one padded array for both images

    def padded(fn):
      return common.padded_call(lambda x: fn(x[:, 0], x[:, 1]), both.swapaxes(0, 1), batch_size)
    scores['psnr'].append(psnr(original, rebuilt))
    scores['ssim'].append(padded(ssim))
    if use_lpips:
      scores['lpips'].append(padded(lambda a, b: lpips(a, b, lpips_params)))
    if stats is not None:
      for i, images in enumerate((original, rebuilt)):
        stats[i].update(common.padded_call(
            lambda x: fid.activations(fid_params, x, fid_resize), images, batch_size))
  if not scores['psnr']:
    raise ValueError('no images to evaluate reconstruction on.')
  metrics = {k: float(np.mean(np.concatenate(v))) for k, v in scores.items()}
  metrics['examples'] = float(sum(len(v) for v in scores['psnr']))
  if stats is not None:
    metrics['rfid'] = fid.frechet_distance(*stats[1].mean_cov(), *stats[0].mean_cov())
  return metrics


def run(tokenizer, config, dataset_spec: str, *, max_examples: int | None = None,
        batches: Iterable | None = None, fid_params=None, use_lpips: bool = True) -> dict:
  """PSNR / SSIM / LPIPS (/ rFID with evals.fid_weights or `fid_params`) of `tokenizer`."""
  ev = config.evals
  if batches is None:
    batches = eval_data.eval_images(
        config, dataset_spec, max_examples=ev.max_examples if max_examples is None else max_examples)
  if fid_params is None and ev.fid_weights:
    fid_params = _cached_fid_params(ev.fid_weights)
  rebuild = reconstruct_fn(tokenizer)

  def pairs():
    for images, _ in batches:
      for start in range(0, images.shape[0], ev.batch_size):
        chunk = images[start:start + ev.batch_size]
        yield chunk, common.padded_call(rebuild, pixels.to_model_space(chunk), ev.batch_size)

  return evaluate(pairs(), fid_params=fid_params, use_lpips=use_lpips, batch_size=ev.batch_size)
