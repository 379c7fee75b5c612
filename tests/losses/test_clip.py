"""CLIP softmax / SigLIP losses and the logit-scale clamp against float64 NumPy re-derivations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vtp_jax.losses import clip

# Jitted entry points: one compile per function instead of one per primitive op in eager mode.
softmax_loss = jax.jit(clip.clip_softmax_loss)
sigmoid_loss = jax.jit(clip.clip_sigmoid_loss)
clamp = jax.jit(clip.clamp_logit_scale, static_argnames='max_log_scale')


def _np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _np_clip_softmax(image, text, log_scale):
  """OpenCLIP ClipLoss: mean of the two cross-entropies with labels = arange(B)."""
  image, text = _np_normalize(image.astype(np.float64)), _np_normalize(text.astype(np.float64))
  logits = math.exp(log_scale) * image @ text.T
  n = logits.shape[0]
  ce_i2t = ce_t2i = 0.0
  for i in range(n):
    row, col = logits[i], logits[:, i]
    ce_i2t += -(row[i] - (row.max() + np.log(np.sum(np.exp(row - row.max())))))
    ce_t2i += -(col[i] - (col.max() + np.log(np.sum(np.exp(col - col.max())))))
  acc_i2t = np.mean(np.argmax(logits, axis=1) == np.arange(n))
  acc_t2i = np.mean(np.argmax(logits, axis=0) == np.arange(n))
  return (ce_i2t / n + ce_t2i / n) / 2, acc_i2t, acc_t2i


def _np_siglip(image, text, log_scale, bias):
  """big_vision siglip: -sum_ij log sigmoid(z_ij (s x_i.y_j + b)) / B, z = +1 on the diagonal."""
  image, text = _np_normalize(image.astype(np.float64)), _np_normalize(text.astype(np.float64))
  n = image.shape[0]
  total = 0.0
  for i in range(n):
    for j in range(n):
      z = 1.0 if i == j else -1.0
      v = z * (math.exp(log_scale) * image[i] @ text[j] + bias)
      total += np.logaddexp(0.0, -v)  # -log sigmoid(v)
  return total / n


def _pair(rng, n=12, d=16, noise=1.0):
  image = rng.normal(size=(n, d)).astype(np.float32)
  text = (image + noise * rng.normal(size=(n, d))).astype(np.float32)
  return image, text


@pytest.mark.parametrize('log_scale', [math.log(1 / 0.07), 0.0, math.log(100.0)])
def test_softmax_matches_numpy(log_scale):
  image, text = _pair(np.random.default_rng(0))
  loss, metrics = softmax_loss(image, text, jnp.float32(log_scale))
  want, acc_i2t, acc_t2i = _np_clip_softmax(image, text, log_scale)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics['clip_i2t_acc']), acc_i2t)
  np.testing.assert_allclose(float(metrics['clip_t2i_acc']), acc_t2i)
  np.testing.assert_allclose(float(metrics['clip_scale']), math.exp(log_scale), rtol=1e-6)


def test_softmax_rewards_matched_pairs_over_shuffled_ones():
  rng = np.random.default_rng(1)
  image, text = _pair(rng, noise=0.05)
  loss, metrics = softmax_loss(image, text, math.log(100.0))
  assert float(metrics['clip_i2t_acc']) == 1.0 and float(metrics['clip_t2i_acc']) == 1.0
  shuffled, _ = softmax_loss(image, text[::-1], math.log(100.0))
  assert float(loss) < 0.1 < float(shuffled)


def test_softmax_accepts_unnormalised_bf16_and_size1_scale():
  image, text = _pair(np.random.default_rng(2))
  loss, _ = softmax_loss(jnp.asarray(3.0 * image, jnp.bfloat16),
                                   jnp.asarray(text, jnp.bfloat16), jnp.full((1,), 2.0))
  want, _, _ = _np_clip_softmax(np.asarray(jnp.asarray(3.0 * image, jnp.bfloat16), np.float32),
                                np.asarray(jnp.asarray(text, jnp.bfloat16), np.float32), 2.0)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


@pytest.mark.parametrize('log_scale,bias', [(math.log(10.0), -10.0), (2.0, 0.5)])
def test_sigmoid_matches_numpy(log_scale, bias):
  image, text = _pair(np.random.default_rng(3), n=10)
  loss, metrics = sigmoid_loss(image, text, log_scale, bias)
  np.testing.assert_allclose(float(loss), _np_siglip(image, text, log_scale, bias), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['clip_bias']), bias)


def test_global_batch_formula_under_sharded_jit():
  """The global formula, jitted with the batch sharded over 8 devices, equals the unsharded NumPy."""
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  image, text = _pair(np.random.default_rng(4), n=32)
  batch_sharding = NamedSharding(mesh, P('data', None))
  image_s, text_s = jax.device_put(image, batch_sharding), jax.device_put(text, batch_sharding)
  softmax = softmax_loss(image_s, text_s, jnp.float32(2.5))[0]
  sigmoid = sigmoid_loss(image_s, text_s, jnp.float32(2.3), jnp.float32(-10.))[0]
  np.testing.assert_allclose(float(softmax), _np_clip_softmax(image, text, 2.5)[0], rtol=1e-5)
  np.testing.assert_allclose(float(sigmoid), _np_siglip(image, text, 2.3, -10.0), rtol=1e-5)


def test_clamp_logit_scale():
  x = jnp.asarray([-1.0, 0.0, 2.0, math.log(100.0), 5.0], jnp.float32)
  np.testing.assert_allclose(np.asarray(clamp(x)),
                             [0.0, 0.0, 2.0, math.log(100.0), math.log(100.0)], rtol=1e-7)
  np.testing.assert_allclose(float(clamp(jnp.float32(3.0), max_log_scale=1.0)), 1.0)


def test_bad_shapes_raise():
  a = np.zeros((4, 8), np.float32)
  with pytest.raises(ValueError, match='same shape'):
    softmax_loss(a, np.zeros((4, 6), np.float32), 1.0)
  with pytest.raises(ValueError, match='2-D'):
    sigmoid_loss(a[None], a[None], 1.0, 0.0)
  with pytest.raises(ValueError, match='logit_scale'):
    softmax_loss(a, a, np.zeros(3))
