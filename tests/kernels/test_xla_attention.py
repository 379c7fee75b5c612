"""The heads-first attention kernel (kernels/xla_attention.py) against NumPy and jax.nn, and the
Attention module's layouts against each other (heads-first with either kernel, tokens-first with
jax.nn)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_blocks_agree, needs_cpp_compiler
from vtp_jax.kernels import xla_attention as attention
from vtp_jax.models import layers


def _numpy_attention(q, k, v, causal):
  """softmax(q k^T / sqrt(d)) v in float64, (batch, heads, tokens, head_dim)."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  scores = np.einsum('bnqh,bnkh->bnqk', q, k) / np.sqrt(q.shape[-1])
  if causal:
    scores = np.where(np.tril(np.ones(scores.shape[-2:], bool)), scores, -np.inf)
  scores = scores - scores.max(-1, keepdims=True)
  probs = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
  return np.einsum('bnqk,bnkh->bnqh', probs, v)


def _qkv(dtype, shape=(2, 3, 11, 8)):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)


@pytest.mark.parametrize('causal', [False, True])
def test_forward_matches_numpy(causal):
  q, k, v = _qkv(jnp.float32)
  got = attention.softmax_attention(q, k, v, causal)
  np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v, causal), rtol=1e-5,
                             atol=1e-6)


def _jax_nn_loss(q, k, v, weights, causal):
  # jax.nn takes (batch, tokens, heads, head_dim); its gradients come from JAX's autodiff.
  swap = lambda t: jnp.swapaxes(t, 1, 2)
  out = swap(jax.nn.dot_product_attention(swap(q), swap(k), swap(v), is_causal=causal))
  return jnp.sum(out.astype(jnp.float32) * weights)


def _our_loss(q, k, v, weights, causal):
  return jnp.sum(attention.softmax_attention(q, k, v, causal).astype(jnp.float32) * weights)


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 2e-5), (jnp.bfloat16, 6e-2)])
def test_gradients_match_autodiff_of_jax_nn(causal, dtype, tol):
  q, k, v = _qkv(dtype)
  weights = jax.random.normal(jax.random.PRNGKey(1), q.shape)  # a non-uniform output cotangent
  want = jax.grad(_jax_nn_loss, argnums=(0, 1, 2))(q, k, v, weights, causal)
  got = jax.grad(_our_loss, argnums=(0, 1, 2))(q, k, v, weights, causal)
  for name, g, w in zip('qkv', got, want):
    assert g.dtype == w.dtype == dtype, name
    scale = float(jnp.max(jnp.abs(w.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               atol=tol * scale, err_msg=f'd{name}')


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('implementation', ['xla', pytest.param('cpu', marks=needs_cpp_compiler)])
def test_attention_module_layouts_agree(implementation, causal):
  """attention='xla' (heads-first, this kernel) or 'cpu' (heads-first, cpu_attention's compiled
  kernel) and 'jax' (jax.nn, tokens-first) share parameters and must give the same outputs and
  parameter gradients, RoPE and prefix tokens included."""
  spec = dict(width=32, heads=4, qk_norm=True, causal=causal, rope_dtype='float32')
  ours = layers.Attention(layers.BlockSpec(attention=implementation, **spec))
  reference = layers.Attention(layers.BlockSpec(attention='jax', **spec))
  assert_blocks_agree(ours, reference, jax.random.normal(jax.random.PRNGKey(2), (2, 7, 32)))


def test_unknown_attention_implementation_is_named():
  with pytest.raises(ValueError, match="precision.attention='flash'"):
    layers.BlockSpec(width=32, heads=4, attention='flash')
