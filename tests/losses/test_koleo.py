"""KoLeo against a NumPy re-typing of DINOv2's `KoLeoLoss` (dinov2/loss/koleo_loss.py)."""

import inspect

import jax
import numpy as np
import pytest

from vtp_jax.losses import koleo

koleo_loss = jax.jit(koleo.koleo_loss, static_argnames='group_size')
koleo_global = jax.jit(koleo.koleo_loss_global_crops, static_argnames='group_size')


def _np_koleo(features, eps=1e-8, pdist_eps=1e-8):
  """F.normalize(eps), dots with the diagonal filled with -1, argmax, PairwiseDistance(2, eps=1e-8)."""
  x = features.astype(np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
  n = x.shape[0]
  dots = x @ x.T
  dots.reshape(-1)[:: n + 1] = -1.0
  nearest = np.argmax(dots, axis=1)
  total = 0.0
  for i in range(n):
    distance = np.sqrt(np.sum((x[i] - x[nearest[i]] + pdist_eps) ** 2))  # eps on the difference
    total += np.log(distance + eps)
  return -total / n


def test_koleo_matches_numpy():
  rng = np.random.default_rng(0)
  for batch, dim in [(16, 8), (33, 5)]:
    x = (3.0 * rng.normal(size=(batch, dim))).astype(np.float32)
    np.testing.assert_allclose(float(koleo_loss(x)), _np_koleo(x), rtol=1e-5)


def test_koleo_never_picks_itself_and_punishes_duplicates():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(8, 6)).astype(np.float32)
  spread = float(koleo_loss(x))
  x[1] = 2.0 * x[0] + 1e-3 * x[2]  # nearly the same direction: distance ~ 1e-3 after normalising
  crowded = float(koleo_loss(x))
  np.testing.assert_allclose(crowded, _np_koleo(x), rtol=1e-4)
  assert crowded > spread + 1.0


def test_koleo_pairwise_eps_is_added_to_the_difference():
  """torch PairwiseDistance adds eps to x_i - x_nn (not to the norm); DINOv2 passes eps = 1e-8.

  At 1e-8 the placement is invisible in float32 on spread-out points, so it is checked with a large
  eps against the NumPy reference, and the default pinned to DINOv2's value.
  """
  x = np.random.default_rng(5).normal(size=(9, 4)).astype(np.float32)
  got = float(koleo_loss(x, pdist_eps=0.05))
  np.testing.assert_allclose(got, _np_koleo(x, pdist_eps=0.05), rtol=1e-5)
  assert abs(got - _np_koleo(x)) > 1e-3
  assert inspect.signature(koleo.koleo_loss).parameters['pdist_eps'].default == 1e-8


def test_koleo_groups_match_per_device_numpy():
  x = np.random.default_rng(2).normal(size=(24, 7)).astype(np.float32)
  want = np.mean([_np_koleo(chunk) for chunk in np.split(x, 3)])
  np.testing.assert_allclose(float(koleo_loss(x, group_size=8)), want, rtol=1e-5)
  assert abs(float(koleo_loss(x)) - want) > 1e-3  # the whole-batch search is a different number


def test_koleo_global_crops_sums_the_chunks():
  x = np.random.default_rng(3).normal(size=(2, 10, 6)).astype(np.float32)
  np.testing.assert_allclose(float(koleo_global(x)), _np_koleo(x[0]) + _np_koleo(x[1]), rtol=1e-5)


def test_koleo_gradient_is_finite_and_nonzero():
  x = np.random.default_rng(4).normal(size=(12, 5)).astype(np.float32)
  grad = np.asarray(jax.jit(jax.grad(koleo.koleo_loss))(x))
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


def test_koleo_bad_input_raises():
  with pytest.raises(ValueError, match='features must be'):
    koleo_loss(np.zeros((2, 4, 3), np.float32))
  with pytest.raises(ValueError, match='group_size'):
    koleo_loss(np.zeros((10, 3), np.float32), group_size=4)
  with pytest.raises(ValueError, match='global_cls_features'):
    koleo_global(np.zeros((10, 3), np.float32))
