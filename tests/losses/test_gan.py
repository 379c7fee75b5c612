"""GAN losses, the LDM adaptive weight and the start factor against NumPy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtp_jax.losses import gan


def _logits(seed, shape=(4, 1, 6, 6)):
  return (2.0 * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def test_hinge_losses_match_numpy():
  real, fake = _logits(0), _logits(1)
  want_d = 0.5 * (np.mean([max(0.0, 1.0 - v) for v in real.ravel()])
                  + np.mean([max(0.0, 1.0 + v) for v in fake.ravel()]))
  np.testing.assert_allclose(float(jax.jit(gan.hinge_d_loss)(real, fake)), want_d, rtol=1e-6)
  np.testing.assert_allclose(float(jax.jit(gan.hinge_g_loss)(fake)), -fake.astype(np.float64).mean(),
                             rtol=1e-5)


def test_non_saturating_losses_match_numpy():
  real, fake = _logits(2), _logits(3)
  softplus = lambda v: np.log1p(np.exp(-abs(v))) + max(v, 0.0)
  want_d = 0.5 * (np.mean([softplus(-v) for v in real.ravel()])
                  + np.mean([softplus(v) for v in fake.ravel()]))
  want_g = np.mean([-np.log(1.0 / (1.0 + np.exp(-v))) for v in fake.ravel()])
  np.testing.assert_allclose(float(jax.jit(gan.non_saturating_d_loss)(real, fake)), want_d, rtol=1e-5)
  np.testing.assert_allclose(float(jax.jit(gan.non_saturating_g_loss)(fake)), want_g, rtol=1e-5)


def test_hinge_d_loss_is_zero_when_margins_are_met():
  assert float(gan.hinge_d_loss(jnp.full((3,), 1.5), jnp.full((3,), -2.0))) == 0.0


@pytest.mark.parametrize('nll,g,want', [(3.0, 0.5, 3.0 / 0.5001), (2.0, 0.0, 1e4), (0.0, 1.0, 0.0),
                                        (1e3, 1e-3, 1e3 / 1.1e-3)])
def test_adaptive_weight(nll, g, want):
  got = float(jax.jit(gan.adaptive_weight)(jnp.float32(nll), jnp.float32(g)))
  np.testing.assert_allclose(got, min(want, 1e4), rtol=1e-5)


def test_adaptive_weight_is_detached_and_respects_max():
  grad = jax.grad(lambda a, b: gan.adaptive_weight(a, b) * a, argnums=(0, 1))(2.0, 4.0)
  # d/da [w(a, b) a] with w detached is w = 2 / 4.0001; d/db is 0.
  np.testing.assert_allclose(float(grad[0]), 2.0 / 4.0001, rtol=1e-6)
  assert float(grad[1]) == 0.0
  assert float(gan.adaptive_weight(5.0, 0.0, max_weight=7.0)) == 7.0


def test_gan_start_factor():
  factor = jax.jit(gan.gan_start_factor, static_argnames='start_step')
  got = [float(factor(jnp.int32(s), start_step=100)) for s in (0, 99, 100, 101, 10**6)]
  assert got == [0.0, 0.0, 1.0, 1.0, 1.0]
  assert float(gan.gan_start_factor(0, 0)) == 1.0
