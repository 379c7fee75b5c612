"""precision.attention='vmem' (kernels/vmem_attention.py): the whole-sequence TPU Pallas kernel.

Values and gradients are checked through Pallas's interpreter on CPU against NumPy float64
formulas of softmax attention and its backward (not against another of our kernels), at token
counts that are no multiple of 8 and batches split over several grid steps; the TPU compile of
the kernels (Mosaic) for a compile-only v5e topology is checked in test_attention_auto.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtp_jax.kernels import vmem_attention


def _reference(q, k, v, g, causal):
  """softmax(q k^T / sqrt(d)) v and the gradients of sum(out * g), in float64."""
  q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
  scale = q.shape[-1] ** -0.5
  s = np.einsum('bnqd,bnkd->bnqk', q, k) * scale
  if causal:
    s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum('bnqk,bnkd->bnqd', p, v)
  dv = np.einsum('bnqk,bnqd->bnkd', p, g)
  dp = np.einsum('bnqd,bnkd->bnqk', g, v)
  ds = p * (dp - (p * dp).sum(-1, keepdims=True)) * scale
  dq = np.einsum('bnqk,bnkd->bnqd', ds, k)
  dk = np.einsum('bnqk,bnqd->bnkd', ds, q)
  return out, (dq, dk, dv)


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('shape', [(2, 3, 13, 16), (10, 2, 37, 64)])
def test_values_and_gradients_equal_the_float64_formulas(shape, causal):
  rng = np.random.default_rng(0)
  q, k, v, g = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4))
  with jax.default_matmul_precision('highest'):
    out = vmem_attention.softmax_attention(q, k, v, causal, interpret=True)
    grads = jax.grad(lambda *a: jnp.sum(vmem_attention.softmax_attention(
        *a, causal, interpret=True) * g), argnums=(0, 1, 2))(q, k, v)
  want_out, want_grads = _reference(q, k, v, g, causal)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  for got, want, name in zip(grads, want_grads, ('dq', 'dk', 'dv')):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)


def test_a_grid_step_takes_whole_images_or_heads_within_the_block_budget():
  # 10 images of 2 x 37 x 64: each fits many times over, so 5 per step (the largest divisor <= 8).
  assert vmem_attention.block_per_step(10, 2, 37, 64, 4, arrays=7) == (5, 2)
  # 6 heads of 257 tokens, 4 arrays: one image is 4 x 2 x 6 x 264 x 128 x 2 bytes = 3.1 MiB.
  per_image = 2 * 4 * 6 * 264 * 128 * 2
  images = max(n for n in (1, 2, 4, 8) if n * per_image <= vmem_attention.BLOCK_BUDGET_BYTES)
  assert vmem_attention.block_per_step(256, 6, 257, 64, 2, arrays=4) == (images, 6)
  # 20 heads of 257 tokens, 7 arrays: 0.9 MiB a head, so one image and 5 heads (of 1, 2, 4, 5).
  assert vmem_attention.block_per_step(256, 20, 257, 64, 2, arrays=7) == (1, 5)


def test_what_it_refuses_is_said():
  assert vmem_attention.unsupported(tokens=513, head_dim=64, dtype='bfloat16',
                                    seq_sharded=False) is not None
  assert 'head dim 60' in vmem_attention.unsupported(tokens=77, head_dim=60, dtype='bfloat16',
                                                     seq_sharded=False)
  assert 'float16' in vmem_attention.unsupported(tokens=77, head_dim=64, dtype='float16',
                                                 seq_sharded=False)
  assert vmem_attention.unsupported(tokens=257, head_dim=64, dtype='bfloat16',
                                    seq_sharded=False) is None
  with pytest.raises(ValueError, match='TPU kernel'):
    q = jnp.zeros((1, 1, 8, 8))
    vmem_attention.softmax_attention(q, q, q)


@pytest.mark.parametrize('rope_dtype', ['bfloat16', 'float32'])
def test_rope_in_the_kernel_equals_rope_before_it(rope_dtype):
  """The fused path (the projection whole, RoPE on chip) against models/rope.apply_rope (itself
  checked against the reference fixture) followed by the float64 formulas; one CLS token
  passes unrotated."""
  from vtp_jax.models import rope
  spec = rope.RopeSpec(head_dim=16, dtype=rope_dtype)
  sin, cos = rope.rope_tables(spec, 3, 4)  # 12 patch tokens
  rng = np.random.default_rng(1)
  shape = (3, 2, 13, 16)
  qkv, g = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((3,) + shape, shape))

  def fused(qkv):
    return vmem_attention.qkv_attention(qkv, sin, cos, rope_dtype=rope_dtype, interpret=True)

  def rotated(qkv):
    return jnp.stack([rope.apply_rope(qkv[0], sin, cos, rope_dtype, 2),
                      rope.apply_rope(qkv[1], sin, cos, rope_dtype, 2), qkv[2]])

  with jax.default_matmul_precision('highest'):
    out, vjp = jax.vjp(fused, qkv)
    (d_qkv,) = vjp(g)
    turned, rope_vjp = jax.vjp(rotated, qkv)
  want_out, want_grads = _reference(*turned, g, False)
  (want_d_qkv,) = rope_vjp(jnp.asarray(np.stack(want_grads), jnp.float32))
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  # bfloat16 mode rounds each RoPE op, forward and (in apply_rope's autodiff) backward.
  tol = 1e-4 if rope_dtype == 'float32' else 2e-2
  np.testing.assert_allclose(d_qkv, want_d_qkv, rtol=tol, atol=tol)


def test_heads_split_over_grid_steps_give_the_same_values(monkeypatch):
  """A budget below one image's heads makes each grid step take a divisor of the heads."""
  rng = np.random.default_rng(2)
  shape = (2, 4, 21, 16)
  q, k, v, g = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4))
  per_head = 2 * 7 * 24 * 128 * 4
  monkeypatch.setattr(vmem_attention, 'BLOCK_BUDGET_BYTES', 2 * per_head)
  assert vmem_attention.block_per_step(2, 4, 21, 16, 4, arrays=7) == (1, 2)
  with jax.default_matmul_precision('highest'):
    grads = jax.grad(lambda *a: jnp.sum(vmem_attention.softmax_attention(
        *a, True, interpret=True) * g), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(grads, _reference(q, k, v, g, True)[1]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
