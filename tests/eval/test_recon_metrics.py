"""Reconstruction metrics against scikit-image and hand-built cases, and the reconstruction run on a
micro random-init tokenizer with in-memory images."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage import metrics as skm

from conftest import micro_config
from vtp_jax import pixels
from vtp_jax.eval import reconstruction
from vtp_jax.inference import Tokenizer
from vtp_jax.models import vtp


def _pairs(seed=0, n=3, size=(24, 30)):
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 256, (n, *size, 3), dtype=np.uint8)
  noise = rng.integers(-40, 41, a.shape)
  b = np.clip(a.astype(np.int64) + noise, 0, 255).astype(np.uint8)
  b[0] = np.clip(a[0].astype(np.int64) + 3, 0, 255)  # a near copy: high PSNR/SSIM
  a[-1, :, :15] = 250  # bright flat region: E[x^2] - E[x]^2 cancellation territory
  b[-1, :, :15] = 251
  return a, b


def test_psnr_matches_skimage_per_image():
  a, b = _pairs()
  want = [skm.peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(a, b)]
  np.testing.assert_allclose(reconstruction.psnr(a, b), want, rtol=1e-10)
  # 10 log10(255^2 / 1) for a uniform error of 1 grey level.
  assert reconstruction.psnr(a[:1], a[:1] ^ 1)[0] == pytest.approx(20 * np.log10(255), rel=1e-9)


def test_ssim_matches_skimage_gaussian_wang_et_al():
  a, b = _pairs()
  want = [skm.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=255, channel_axis=-1)
          for x, y in zip(a, b)]
  got = reconstruction.ssim(a, b)
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert got[0] > 0.99 and got[1] < got[0] - 0.03  # noise costs similarity
  np.testing.assert_allclose(reconstruction.ssim(a, a), 1.0, atol=1e-6)
  with pytest.raises(ValueError, match='11x11'):
    reconstruction.ssim(a[:, :8, :8], b[:, :8, :8])


def random_tokenizer(config, seed=0):
  """A Tokenizer with random parameters drawn in NumPy (no jitted init to compile)."""
  model = vtp.build(config)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                   jnp.zeros((1, 8), jnp.int32)))['params']
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ('scale', 'g'):  # norm and weight-norm gains
      return np.ones(leaf.shape, leaf.dtype)
    if name in ('bias', 'mask_token', 'logit_scale'):
      return np.zeros(leaf.shape, leaf.dtype)
    return (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
  return Tokenizer(config, jax.tree_util.tree_map_with_path(fill, shapes))


@pytest.fixture(scope='module')
def micro_tokenizer():
  config = micro_config()
  config.evals.batch_size = 4
  return random_tokenizer(config)


def test_reconstruction_run_measures_decode_of_encode(micro_tokenizer):
  tok, config = micro_tokenizer, micro_tokenizer.config
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  batches = [(images[:5], np.zeros(5)), (images[5:], np.zeros(3))]  # 5 > batch 4: chunked
  got = reconstruction.run(tok, config, 'unused', batches=batches)
  # Independent path: the model on fixed halves (same compiled shapes), metrics by scikit-image.
  rebuilt = np.concatenate([pixels.to_uint8(tok.decode(tok.encode(pixels.to_model_space(x))))
                            for x in (images[:4], images[4:])])
  assert rebuilt.std() > 1  # the random decoder does not collapse to a constant
  want_psnr = np.mean([skm.peak_signal_noise_ratio(x, y, data_range=255)
                       for x, y in zip(images, rebuilt)])
  assert got['psnr'] == pytest.approx(want_psnr, rel=1e-4)
  want_ssim = np.mean([skm.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
                                                 use_sample_covariance=False, data_range=255,
                                                 channel_axis=-1)
                       for x, y in zip(images, rebuilt)])
  assert got['ssim'] == pytest.approx(want_ssim, abs=1e-4)
  assert got['examples'] == 8 and 0 < got['lpips'] < 2 and 'rfid' not in got
  # LPIPS of an image with itself is 0; with its inverse it is clearly not.
  pair = images[:4]
  assert reconstruction.lpips(pair, pair).max() < 1e-6
  assert reconstruction.lpips(pair, 255 - pair).min() > 0.05


def test_run_evals_runs_every_configured_task_on_the_configured_dataset(micro_tokenizer,
                                                                        monkeypatch):
  from vtp_jax.eval import data as eval_data
  from vtp_jax.eval import run_evals
  config = micro_tokenizer.config
  config.evals.update(tasks='zero_shot, linear_probe,reconstruction', dataset='shapes:validation',
                      train_dataset='shapes:train', max_examples=0, probe_n_blocks='1',
                      probe_latent_pool='mean', probe_lrs='0.01', probe_steps=5, probe_batch_size=4,
                      templates='name')
  rng = np.random.default_rng(4)
  source = [{'key': str(i), 'image': rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
             'caption': 'x', 'label': i % 2} for i in range(8)]
  opened = []

  def fake_open_source(config, spec, split=None):
    opened.append(spec)
    return source
  monkeypatch.setattr(eval_data, 'open_source', fake_open_source)
  monkeypatch.setattr(eval_data, 'class_names', lambda config, spec: ['cat', 'dog'])
  metrics = run_evals(micro_tokenizer, config)
  assert opened == ['shapes:validation', 'shapes:train', 'shapes:validation', 'shapes:validation']
  for key in ('zero_shot/top1', 'zero_shot/top5', 'linear_probe/n1/top1',
              'linear_probe/latent_mean/top1', 'reconstruction/psnr', 'reconstruction/ssim',
              'reconstruction/lpips'):
    assert isinstance(metrics[key], float), key
  assert metrics['zero_shot/top5'] == 1.0 and metrics['reconstruction/examples'] == 8
  config.evals.tasks = 'zero_shot,fid'
  with pytest.raises(ValueError, match='unknown eval task'):
    run_evals(micro_tokenizer, config)
