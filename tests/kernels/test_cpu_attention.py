"""The compiled CPU attention kernel (kernels/cpu_attention.py, precision.attention='cpu') against a
float64 NumPy forward and backward, and sharded over the 8 fake devices. Inside the Attention module
it is checked against jax.nn in test_attention.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import needs_cpp_compiler
from vtp_jax import sharding
from vtp_jax.kernels import cpu_attention

pytestmark = needs_cpp_compiler


def _numpy_forward_backward(q, k, v, d_out, causal):
  """Output and (dq, dk, dv) in float64 from the textbook formulas: P = softmax(S) with
  S = q k^T / sqrt(d); dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(P * dP)),
  dQ = dS K / sqrt(d), dK = dS^T Q / sqrt(d). Causal: key c is visible to query r when c <= r."""
  q, k, v, d_out = (np.asarray(t, np.float64) for t in (q, k, v, d_out))
  scale = 1 / np.sqrt(q.shape[-1])
  scores = np.einsum('bnqh,bnkh->bnqk', q, k) * scale
  if causal:
    visible = np.arange(k.shape[-2])[None, :] <= np.arange(q.shape[-2])[:, None]
    scores = np.where(visible, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum('bnqk,bnkh->bnqh', probs, v)
  d_v = np.einsum('bnqk,bnqh->bnkh', probs, d_out)
  d_probs = np.einsum('bnqh,bnkh->bnqk', d_out, v)
  d_scores = probs * (d_probs - np.sum(probs * d_probs, -1, keepdims=True))
  d_q = np.einsum('bnqk,bnkh->bnqh', d_scores, k) * scale
  d_k = np.einsum('bnqk,bnqh->bnkh', d_scores, q) * scale
  return out, (d_q, d_k, d_v)


def _inputs(q_shape, k_len, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  k_shape = q_shape[:-2] + (k_len, q_shape[-1])
  q = jax.random.normal(keys[0], q_shape)
  k, v = (jax.random.normal(key, k_shape) for key in keys[1:3])
  d_out = jax.random.normal(keys[3], q_shape)  # a non-uniform output cotangent
  return q, k, v, d_out


def _value_and_grads(q, k, v, d_out, causal):
  out, vjp = jax.vjp(lambda a, b, c: cpu_attention.softmax_attention(a, b, c, causal), q, k, v)
  return out, vjp(d_out)


def _assert_matches_numpy(got_out, got_grads, q, k, v, d_out, causal):
  want_out, want_grads = _numpy_forward_backward(q, k, v, d_out, causal)
  np.testing.assert_allclose(np.asarray(got_out), want_out, rtol=1e-5, atol=2e-6)
  for name, got, want in zip('qkv', got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=2e-5, err_msg=f'd{name}')


@pytest.mark.parametrize('q_shape,k_len,causal', [
    ((2, 3, 11, 8), 11, False),
    ((2, 3, 11, 8), 11, True),
    ((1, 2, 5, 16), 9, False),  # more keys than queries
    ((1, 2, 9, 16), 5, True),  # more queries than keys: late rows see every key
])
def test_forward_and_gradients_match_numpy(q_shape, k_len, causal):
  q, k, v, d_out = _inputs(q_shape, k_len)
  out, grads = jax.jit(_value_and_grads, static_argnums=4)(q, k, v, d_out, causal)
  _assert_matches_numpy(out, grads, q, k, v, d_out, causal)


@pytest.mark.parametrize('batch', [4, 1])  # 1: the batch axes do not divide it and are dropped
def test_sharded_over_batch_and_heads_matches_numpy(batch):
  """On the (2,2,2) mesh with the project's rules, each device runs the kernel on its own (batch,
  heads) shard: the custom call in the compiled program has the local shapes."""
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  q, k, v, d_out = _inputs((batch, 4, 13, 8), 13, seed=1)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    step = jax.jit(_value_and_grads, static_argnums=4)
    hlo = step.lower(q, k, v, d_out, False).compile().as_text()
    out, grads = step(q, k, v, d_out, False)
  local_batch = batch // 4 if batch % 4 == 0 else batch
  assert f'f32[{local_batch},2,13,8]' in _custom_call_line(hlo, cpu_attention.FORWARD_TARGET)
  _assert_matches_numpy(out, grads, q, k, v, d_out, False)


def _custom_call_line(hlo: str, target: str) -> str:
  lines = [line for line in hlo.splitlines() if f'custom_call_target="{target}"' in line]
  assert len(lines) == 1, f'expected one {target} call, found {len(lines)}'
  return lines[0]


def test_bfloat16_is_refused_with_the_fix_named():
  q = jnp.zeros((1, 1, 4, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match="precision.compute_dtype='float32'"):
    cpu_attention.softmax_attention(q, q, q)
