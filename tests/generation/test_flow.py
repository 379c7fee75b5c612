"""The flow-matching objective and the ODE sampler against closed forms.

Convention (LightningDiT's ICPlan): x_t = t x1 + (1 - t) x0, x0 ~ N(0, I) noise at t = 0, x1 ~ data
at t = 1, target velocity u = x1 - x0. For Gaussian data x1 ~ N(m, S) the exact (marginal)
velocity field is affine in x:

    v*(x, t) = E[x1 - x0 | x_t = x] = m + (t S - (1 - t) I) Sigma_t^-1 (x - t m),
    Sigma_t = t^2 S + (1 - t)^2 I,

and its flow carries N(0, I) at t = 0 onto N(m, S) at t = 1.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtp_jax.generation import sampling
from vtp_jax.generation import transport

MEAN = np.array([1.5, -0.5, 0.25])
_A = np.array([[1.0, 0.0, 0.0], [0.6, 0.5, 0.0], [-0.3, 0.2, 0.3]])
COV = _A @ _A.T  # correlated, eigenvalues spread over ~[0.05, 1.5]


def exact_velocity(x, t):
  """v*(x, t) for x (B, 1, 1, d): the Gaussian closed form above."""
  d = MEAN.shape[0]
  tt = t[:, None, None]
  sigma = tt ** 2 * COV + (1 - tt) ** 2 * jnp.eye(d)
  cross = tt * COV - (1 - tt) * jnp.eye(d)
  flat = x.reshape(x.shape[0], d)
  resid = flat - t[:, None] * MEAN
  v = MEAN + jnp.einsum('bij,bj->bi', cross, jnp.linalg.solve(sigma, resid[..., None])[..., 0])
  return v.reshape(x.shape)


def _transport_map(grid, solver):
  """The solver's map x0 -> x1 is affine for an affine field: x1 = M x0 + c. Solving from 0 and
  from the unit vectors gives c and M exactly, so the pushed-forward N(0, I) is N(c, M M^T)."""
  d = MEAN.shape[0]
  starts = np.concatenate([np.zeros((1, d)), np.eye(d)]).reshape(d + 1, 1, 1, d)
  ends = np.asarray(jax.jit(lambda x: sampling.solve(exact_velocity, x, grid, solver))(
      jnp.asarray(starts, jnp.float32)), np.float64).reshape(d + 1, d)
  c = ends[0]
  m = (ends[1:] - c).T
  return c, m @ m.T


@pytest.mark.parametrize('solver,steps,shift,tol', [
    ('euler', 1001, 0.0, 4e-3),  # first order: many steps (error 2.7e-3, halving per doubling)
    ('heun', 11, 0.0, 5e-3),  # second order: 10 updates suffice (error 3.1e-3)
    ('heun', 41, 0.3, 4e-3),  # LightningDiT's shifted grid: coarse near t = 1 (error 2.1e-3)
])
def test_sampler_maps_standard_normal_onto_the_gaussian_data(solver, steps, shift, tol):
  with jax.default_matmul_precision('highest'):
    c, cov = _transport_map(sampling.time_grid(steps, shift), solver)
  np.testing.assert_allclose(c, MEAN, atol=tol)
  np.testing.assert_allclose(cov, COV, atol=tol)


def test_sampled_moments_match_the_data():
  """The same with random noise: 4096 draws through `sample`, moments within sampling error."""
  noise = jax.random.normal(jax.random.key(0), (4096, 1, 1, 3))
  velocity = lambda x, t, y: exact_velocity(x, t)  # noqa: E731
  out = np.asarray(jax.jit(lambda z: sampling.sample(
      velocity, z, jnp.zeros((4096,), jnp.int32), null_class=0, steps=11, solver='heun'))(noise))
  out = out.reshape(-1, 3)
  np.testing.assert_allclose(out.mean(0), MEAN, atol=0.08)
  np.testing.assert_allclose(np.cov(out.T), COV, atol=0.1)


def test_timestep_shift_is_lightningdits_formula():
  t = np.linspace(0, 1, 7)
  for s in (0.075, 0.3, 1.0, 3.0):
    want = np.array([s * v / (1 + (s - 1) * v) for v in t])  # integrators.py compute_tm
    np.testing.assert_allclose(sampling.time_grid(7, s), want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(sampling.time_grid(7, 0.0), t, atol=1e-7)  # 0: no shift


def test_cfg_scale_one_is_the_conditional_prediction_and_larger_scales_mix():
  x = jax.random.normal(jax.random.key(0), (4, 2, 2, 6))
  t = jnp.array([0.05, 0.2, 0.5, 0.9])
  y = jnp.array([0, 1, 2, 1])
  null = 3

  def velocity(x, t, y):  # a class-dependent field; the null class gives its own prediction
    return x * (1.0 + y[:, None, None, None]) + t[:, None, None, None]

  np.testing.assert_array_equal(sampling.guided(velocity, null, 1.0)(x, t, y), velocity(x, t, y))
  cond, uncond = velocity(x, t, y), velocity(x, t, jnp.full_like(y, null))
  got = sampling.guided(velocity, null, 4.0, cfg_interval_start=0.11)(x, t, y)
  want = np.where((np.asarray(t) >= 0.11)[:, None, None, None],
                  uncond + 4.0 * (cond - uncond), cond)  # interval: guided only where t >= 0.11
  np.testing.assert_allclose(got, want, rtol=1e-6)
  three = sampling.guided(velocity, null, 4.0, cfg_channels=3)(x, t, y)  # LightningDiT's channels
  np.testing.assert_allclose(three[..., :3], (uncond + 4.0 * (cond - uncond))[..., :3], rtol=1e-6)
  np.testing.assert_array_equal(three[..., 3:], cond[..., 3:])


def test_loss_equals_its_formula_on_fixed_inputs():
  rng = np.random.default_rng(0)
  x1, x0 = rng.standard_normal((2, 3, 2, 2, 5))
  t = np.array([0.1, 0.5, 0.8])
  y = np.array([0, 2, 1])
  weights = rng.standard_normal((5, 5))

  def apply_fn(w, xt, t, y):  # any fixed network: a channel mix plus t and class offsets
    offset = t[:, None, None, None] * (y[:, None, None, None] + 1)
    return jnp.einsum('bhwc,cd->bhwd', xt, w) + offset

  loss, metrics = transport.loss_at(apply_fn, jnp.asarray(weights, jnp.float32),
                                    jnp.asarray(x1, jnp.float32), jnp.asarray(x0, jnp.float32),
                                    jnp.asarray(t, jnp.float32), jnp.asarray(y), 0.7)
  xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
  pred = xt @ weights + t[:, None, None, None] * (y[:, None, None, None] + 1)
  u = x1 - x0
  mse = np.mean((pred - u) ** 2)
  cos = np.mean(1 - np.sum(pred * u, -1) / (np.linalg.norm(pred, axis=-1) *
                                             np.linalg.norm(u, axis=-1)))
  np.testing.assert_allclose(float(metrics['mse']), mse, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['cos_loss']), cos, rtol=1e-5)
  np.testing.assert_allclose(float(loss), mse + 0.7 * cos, rtol=1e-5)


def test_cosine_term_has_a_finite_gradient_at_a_zero_prediction():
  """The zero-initialised output layer predicts exactly 0 at step 0 (torch clamps the norm)."""
  u = jnp.ones((1, 1, 1, 4))
  grad = jax.grad(lambda p: transport.velocity_losses(p, u)[1].sum())(jnp.zeros_like(u))
  assert np.all(np.isfinite(np.asarray(grad)))


def test_timesteps_are_logit_normal_and_labels_drop_at_the_rate():
  t = np.asarray(transport.logit_normal(jax.random.key(0), (100_000,), -0.5, 1.25), np.float64)
  logit = np.log(t / (1 - t))
  assert logit.mean() == pytest.approx(-0.5, abs=0.02)
  assert logit.std() == pytest.approx(1.25, abs=0.02)
  labels = jnp.zeros((100_000,), jnp.int32)
  dropped = np.asarray(transport.drop_labels(jax.random.key(1), labels, 7, 0.1))
  assert set(np.unique(dropped)) == {0, 7}
  assert (dropped == 7).mean() == pytest.approx(0.1, abs=0.005)
