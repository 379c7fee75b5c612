"""`precision.attention='cpu'`: softmax attention as a compiled XLA:CPU kernel (cpu_attention.cc).

XLA:CPU has no fused attention, and its batched (tokens x 64 x tokens) matmuls are slow on small
CPUs; this kernel computes each (batch, head) slice with one BLAS sgemm per product and a fused row
softmax, over XLA's own intra-op threads. It takes and returns the same heads-first
(batch, heads, tokens, head_dim) float32 arrays as `attention.softmax_attention`, with the same
backward (saved probabilities, FlashAttention's rowsum identity), so the two are interchangeable.

The C++ source is compiled on first use with the other CPU kernels (cpu_build.py); BLAS is
scipy's. Under a mesh the call is wrapped in `jax.shard_map` over the batch and head axes
(attention is independent per slice), so every device runs its own shard.
XLA cannot see inside the call, so its FLOP count of a step leaves out these matmuls; the analytic
count (train/flops.py) that MFU uses does not.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vtp_jax import sharding
from vtp_jax.kernels import cpu_build

OPTION = 'precision.attention'
FORWARD_TARGET, BACKWARD_TARGET = 'vtp_attention_forward', 'vtp_attention_backward'
# The logical axes of the heads-first q, k, v (models/layers.py's Attention): batch and heads may be
# sharded, tokens and head_dim are whole on every device.
LOGICAL_AXES = ('act_batch', 'act_heads', 'act_seq', None)


def _forward_call(q, k, v, causal):
  cpu_build.load(OPTION)
  shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32),
            jax.ShapeDtypeStruct(q.shape[:-1] + k.shape[-2:-1], jnp.float32))
  return jax.ffi.ffi_call(FORWARD_TARGET, shapes, vmap_method='broadcast_all')(
      q, k, v, causal=bool(causal))


def _backward_call(q, k, v, out, probs, d_out):
  cpu_build.load(OPTION)
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
  return jax.ffi.ffi_call(BACKWARD_TARGET, shapes, vmap_method='broadcast_all')(
      q, k, v, out, probs, d_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _local_attention(q, k, v, causal):
  return _forward_call(q, k, v, causal)[0]


def _local_attention_fwd(q, k, v, causal):
  out, probs = _forward_call(q, k, v, causal)
  return out, (q, k, v, out, probs)


def _local_attention_bwd(causal, residuals, d_out):
  del causal  # masked probabilities are exactly 0, so their gradients vanish by themselves
  return _backward_call(*residuals, d_out)


_local_attention.defvjp(_local_attention_fwd, _local_attention_bwd)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v on (batch, heads, tokens, head_dim) float32 arrays.

  Under a mesh (`jax.set_mesh`), batch and heads are split as the logical axis rules say and each
  device runs the kernel on its own slices; without one, the kernel sees the whole array.
  """
  cpu_build.check_float32_on_cpu(OPTION, q=q, k=k, v=v)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return _local_attention(q, k, v, causal)
  # Axes that do not divide a dim (a 1-image sub-batch on 4 batch shards) are dropped, as for
  # parameters; q, k and v share batch and heads, so q's spec serves all three.
  spec = sharding.fit_spec(P(*nn.logical_to_mesh_axes(LOGICAL_AXES)), q.shape, mesh)
  local = jax.shard_map(lambda a, b, c: _local_attention(a, b, c, causal), mesh=mesh,
                        in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
  return local(q, k, v)
