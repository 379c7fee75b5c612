"""LayerNorm's hand-written backward (layers.layer_norm) against NumPy and against autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtp_jax.models import layers


def _autodiff_layer_norm(x, scale, bias, eps):
  """The same LayerNorm as plain jnp ops, so JAX differentiates it itself."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


def _inputs(dtype):
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((3, 5, 48)) * 2 + 0.5).astype(np.float32)
  scale = rng.uniform(0.5, 1.5, 48).astype(np.float32)
  bias = rng.standard_normal(48).astype(np.float32)
  probe = rng.standard_normal((3, 5, 48)).astype(np.float32)  # a random linear read-out
  return jnp.asarray(x, dtype), jnp.asarray(scale), jnp.asarray(bias), jnp.asarray(probe)


def test_layer_norm_forward_matches_numpy():
  x, scale, bias, _ = _inputs(jnp.float32)
  xn = np.asarray(x, np.float64)
  want = ((xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-6)
          * np.asarray(scale) + np.asarray(bias))
  np.testing.assert_allclose(layers.layer_norm(x, scale, bias, 1e-6), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype, tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_layer_norm_gradients_match_autodiff(dtype, tol):
  x, scale, bias, probe = _inputs(dtype)

  def read_out(norm):
    return lambda x, s, b: jnp.sum(norm(x, s, b, 1e-6).astype(jnp.float32) * probe)

  got = jax.grad(read_out(layers.layer_norm), argnums=(0, 1, 2))(x, scale, bias)
  want = jax.grad(read_out(_autodiff_layer_norm), argnums=(0, 1, 2))(x, scale, bias)
  for name, g, w in zip(('x', 'scale', 'bias'), got, want):
    assert g.dtype == w.dtype, name
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=tol, atol=tol * float(jnp.max(jnp.abs(w.astype(jnp.float32)))),
                               err_msg=f'gradient with respect to {name}')
