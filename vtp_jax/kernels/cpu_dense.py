"""`precision.dense='cpu'`: the transformer blocks' linear layers as a compiled BLAS matmul
(cpu_matmul.cc) instead of XLA:CPU's dot.

At the blocks' shapes (thousands of tokens x 384-1536 features, float32) XLA:CPU's matmuls run
20-30% below one BLAS call on small CPUs, and they are about three quarters of a CPU step
(docs/benchmarks.md, 'CPU kernels'). Here the forward is one sgemm, the backward two
(dx = dy W^T, dW = x^T dy), tied together by a custom VJP; each call is cut into row or column
blocks over XLA's own threads.
Biases, activations and everything else stay XLA's.

Layers reach it through `matmul` (x (..., *in) times a (*in, *out) kernel), `einsum` (the same
contraction written as an einsum whose output has another axis order, as the attention
projections') and `dot_general` (the signature flax.linen.Dense calls).

Under a mesh, each call is `jax.shard_map`ped over the activation's leading (batch) dim as the
logical rules place 'act_batch', with the kernel whole on every device: FSDP's all-gather before the
product and a reduction of dW after it, which JAX derives from the replicated kernel. A
tensor-parallel mesh axis then computes these products redundantly; use 'xla' for tensor
parallelism. XLA cannot see inside the call: its FLOP count of a step leaves these matmuls out
(MFU uses the analytic count), and remat policy 'dots' does not save them.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vtp_jax import sharding
from vtp_jax.kernels import cpu_build

OPTION = 'precision.dense'
TARGET = 'vtp_matmul'


def _matmul_call(a, b, transpose_a=False, transpose_b=False):
  """Row-major op(a) op(b) for 2-D float32 arrays, by the compiled kernel."""
  cpu_build.load(OPTION)
  rows = a.shape[1] if transpose_a else a.shape[0]
  columns = b.shape[0] if transpose_b else b.shape[1]
  # 'sequential': under vmap the 2-D kernel runs once per mapped slice.
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows, columns), jnp.float32),
                          vmap_method='sequential')(
                              a, b, transpose_a=bool(transpose_a), transpose_b=bool(transpose_b))


@jax.custom_vjp
def _matmul_2d(x, w):
  return _matmul_call(x, w)


def _matmul_2d_fwd(x, w):
  return _matmul_call(x, w), (x, w)


def _matmul_2d_bwd(residuals, d_y):
  x, w = residuals
  return _matmul_call(d_y, w, transpose_b=True), _matmul_call(x, d_y, transpose_a=True)


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


def matmul(x: jax.Array, kernel: jax.Array, in_ndim: int = 1) -> jax.Array:
  """x (..., *in) contracted with kernel (*in, *out) over the `in_ndim` dims of `in`: (..., *out)."""
  cpu_build.check_float32_on_cpu(OPTION, inputs=x, kernel=kernel)
  in_shape, out_shape = kernel.shape[:in_ndim], kernel.shape[in_ndim:]
  if x.ndim < in_ndim or x.shape[x.ndim - in_ndim:] != in_shape:
    raise ValueError(f'{OPTION}: inputs {x.shape} do not end in the kernel {kernel.shape}\'s '
                     f'first {in_ndim} dims.')
  lead_ndim = x.ndim - in_ndim

  def local(x, kernel):
    y = _matmul_2d(x.reshape(-1, math.prod(in_shape)), kernel.reshape(math.prod(in_shape), -1))
    return y.reshape(x.shape[:lead_ndim] + out_shape)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or lead_ndim == 0:
    return local(x, kernel)
  batch_axes = nn.logical_to_mesh_axes(('act_batch',))[0]
  # A sub-batch the batch axes do not divide (one image on four shards) is left whole.
  rows = sharding.fit_spec(P(batch_axes), x.shape[:1], mesh)[0]
  x_spec = P(rows, *(None,) * (x.ndim - 1))
  y_spec = P(rows, *(None,) * (lead_ndim - 1 + len(out_shape)))
  return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, P()), out_specs=y_spec,
                       check_vma=False)(x, kernel)


def einsum(equation: str, x: jax.Array, kernel: jax.Array, in_ndim: int) -> jax.Array:
  """`jnp.einsum(equation, x, kernel)` where the kernel's first `in_ndim` axes are contracted with
  x and its other axes are new: x is transposed so they come last, multiplied, and the product is
  transposed to the equation's output order. The leading free axis of x should be the batch."""
  operands, out = equation.replace(' ', '').split('->')
  x_axes, kernel_axes = operands.split(',')
  contracted, new = kernel_axes[:in_ndim], kernel_axes[in_ndim:]
  free = ''.join(a for a in x_axes if a not in contracted)
  all_axes = x_axes + new
  if (len(set(all_axes)) != len(all_axes) or not set(contracted) <= set(x_axes)
      or sorted(out) != sorted(free + new)):
    raise ValueError(f'{OPTION}: {equation!r} is not a dense-layer contraction (x\'s axes = free '
                     f'+ the kernel\'s first {in_ndim}, output = free + the kernel\'s others).')
  x = jnp.transpose(x, [x_axes.index(a) for a in free + contracted])
  y = matmul(x, kernel, in_ndim)
  return jnp.transpose(y, [(free + new).index(a) for a in out])


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """flax.linen.Dense's contraction (lhs's last axis with the kernel's first) by `matmul`."""
  del precision, preferred_element_type  # float32 in, float32 out
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (tuple(lhs_contract), tuple(rhs_contract)) != ((lhs.ndim - 1,), (0,)) or lhs_batch or rhs_batch:
    raise ValueError(f'{OPTION}: only a Dense layer\'s contraction is supported, got '
                     f'{dimension_numbers}.')
  return matmul(lhs, rhs, 1)
