"""The fused soft-target cross-entropy (losses/soft_cross_entropy.py) against the plain
`jax.nn.log_softmax` formula, autodiff and all, at a size where the sums over the prototypes are long
enough for a wrong rounding order or a lost shift to show: value and gradients in float32 (1e-5
relative), bfloat16 logits, what the backward saves, and iBOT padding rows that hold inf / nan."""

import jax
import jax.numpy as jnp
import numpy as np

from vtp_jax.losses import dino
from vtp_jax.losses.soft_cross_entropy import soft_cross_entropy


def _plain_ce(s, t, temp):
  """-sum_k t_k log_softmax(s / T)_k per row: the unfused formula, autodiff and all."""
  return -jnp.sum(t * jax.nn.log_softmax(s.astype(jnp.float32) / temp, axis=-1), axis=-1)


def _wide_rows(seed, rows=256, k=4096):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0.0, 3.0, (rows, k)).astype(np.float32)  # s / 0.1 reaches ~130
  targets = rng.dirichlet(np.full(k, 0.05), rows)
  targets *= rng.integers(1, 4, (rows, 1))  # summed teacher crops: rows sum to 1, 2 or 3
  weights = rng.uniform(0.5, 2.0, rows).astype(np.float32)  # a different cotangent per row
  return jnp.asarray(logits), jnp.asarray(targets, jnp.float32), jnp.asarray(weights)


def _assert_close(got, want, rtol=1e-5):
  # Relative to the largest entry: entries where t_sum * softmax - t cancels carry no relative digits.
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.max(np.abs(want))))


def test_fused_cross_entropy_value_and_gradients_equal_the_plain_formula():
  logits, targets, weights = _wide_rows(50)
  np.testing.assert_allclose(jax.jit(soft_cross_entropy)(logits, targets, 0.1),
                             _plain_ce(logits, targets, 0.1), rtol=1e-5)
  fused = lambda s, t, temp: jnp.sum(weights * soft_cross_entropy(s, t, temp))  # noqa: E731
  plain = lambda s, t, temp: jnp.sum(weights * _plain_ce(s, t, temp))  # noqa: E731
  got = jax.jit(jax.grad(fused, argnums=(0, 1, 2)))(logits, targets, 0.1)
  want = jax.jit(jax.grad(plain, argnums=(0, 1, 2)))(logits, targets, 0.1)
  for g, w in zip(got, want):  # logits, then the targets and temperature nobody differentiates today
    _assert_close(g, w)


def test_dino_loss_gradient_equals_the_plain_pair_sum():
  rng = np.random.default_rng(51)
  student_global = rng.normal(0.0, 3.0, (2, 64, 4096)).astype(np.float32)
  student_local = rng.normal(0.0, 3.0, (3, 64, 4096)).astype(np.float32)
  teacher = rng.dirichlet(np.full(4096, 0.05), (2, 64)).astype(np.float32)

  def plain(s_global, s_local):
    ce = lambda s, t: jnp.mean(_plain_ce(s, t, 0.1))  # noqa: E731
    pairs = sum(ce(s_global[i], teacher[1 - i]) for i in range(2))
    pairs += sum(ce(s_local[l], teacher[j]) for l in range(3) for j in range(2))
    return pairs / (2 * 1 + 3 * 2)

  fused = lambda s_global, s_local: dino.dino_loss(s_global, s_local, teacher)[0]  # noqa: E731
  value, grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(student_global, student_local)
  want_value, want_grads = jax.jit(jax.value_and_grad(plain, argnums=(0, 1)))(student_global,
                                                                             student_local)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for g, w in zip(grads, want_grads):
    _assert_close(g, w)


def test_fused_cross_entropy_bfloat16_logits_get_a_bfloat16_gradient():
  logits, targets, weights = _wide_rows(52, rows=128)
  low = logits.astype(jnp.bfloat16)
  loss = lambda s: jnp.sum(weights * soft_cross_entropy(s, targets, 0.1))  # noqa: E731
  value, grad = jax.jit(jax.value_and_grad(loss))(low)
  assert grad.dtype == jnp.bfloat16
  # The same bfloat16 numbers in float32: the float32 maths is exact, only the final rounding differs.
  up = low.astype(jnp.float32)
  want_value, want = jax.value_and_grad(lambda s: jnp.sum(weights * _plain_ce(s, targets, 0.1)))(up)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  _assert_close(np.asarray(grad, np.float32), want, rtol=2.0**-7)  # one bfloat16 rounding


def test_fused_cross_entropy_saves_the_logits_as_given_and_three_numbers_per_row():
  """What the backward keeps: the bfloat16 logits, the targets, and (rows,) vectors; the plain
  formula keeps a float32 log-softmax of the logits' shape besides."""
  logits, targets, _ = _wide_rows(53, rows=16, k=256)
  low = logits.astype(jnp.bfloat16)
  _, vjp_fn = jax.vjp(lambda s: jnp.sum(soft_cross_entropy(s, targets, 0.1)), low)
  residuals = [(x.dtype, x.shape) for x in jax.tree.leaves(vjp_fn)]
  full = sorted((str(d), s) for d, s in residuals if s == low.shape)
  assert full == [('bfloat16', low.shape), ('float32', low.shape)], residuals  # logits, targets
  assert all(int(np.prod(s)) <= low.shape[0] for _, s in residuals if s != low.shape), residuals


def test_ibot_loss_non_finite_padding_gives_finite_value_and_exactly_zero_gradient():
  logits, targets, weights = _wide_rows(54, rows=192)
  weights = weights.at[150:].set(0.0)
  # Padding rows may hold anything: inf, -inf and nan logits, nan targets.
  logits = logits.at[150:160].set(jnp.inf).at[160:170].set(-jnp.inf).at[170:].set(jnp.nan)
  targets = targets.at[180:].set(jnp.nan)
  loss = lambda s: dino.ibot_loss(s, targets, weights, n_global_images=12)  # noqa: E731
  value, grad = jax.jit(jax.value_and_grad(loss))(logits)
  grad = np.asarray(grad)
  assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
  assert np.all(grad[150:] == 0.0)
  # DINOv2's forward_masked over the real rows only, times loss_scales 2 and ibot_loss_scale 0.5.
  plain = lambda s: jnp.sum(weights[:150] * _plain_ce(s, targets[:150], 0.1)) / 12  # noqa: E731
  want_value, want = jax.value_and_grad(plain)(logits[:150])
  np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5)
  _assert_close(grad[:150], want)


