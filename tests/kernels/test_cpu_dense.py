"""The compiled CPU matmul (kernels/cpu_dense.py, precision.dense='cpu') against float64 NumPy
products and their textbook gradients, sharded over the 8 fake devices, and inside the blocks
against the jnp layers they replace."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import assert_blocks_agree, needs_cpp_compiler
from vtp_jax import sharding
from vtp_jax.kernels import cpu_dense
from vtp_jax.models import layers

pytestmark = needs_cpp_compiler


def _normal(seed, *shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _value_and_grads(fn, x, kernel, d_y):
  y, vjp = jax.vjp(fn, x, kernel)
  return y, vjp(d_y)


def _numpy_dense(x, kernel, d_y, in_ndim):
  """y = x W over the last `in_ndim` axes; dx = dy W^T, dW = x^T dy (flattened), in float64."""
  x, kernel, d_y = (np.asarray(t, np.float64) for t in (x, kernel, d_y))
  lead, in_shape = x.shape[:x.ndim - in_ndim], kernel.shape[:in_ndim]
  x2 = x.reshape(-1, int(np.prod(in_shape)))
  w2 = kernel.reshape(x2.shape[1], -1)
  dy2 = d_y.reshape(x2.shape[0], -1)
  y = (x2 @ w2).reshape(lead + kernel.shape[in_ndim:])
  return y, ((dy2 @ w2.T).reshape(x.shape), (x2.T @ dy2).reshape(kernel.shape))


def _assert_close(got, want, name):
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize('x_shape,kernel_shape,in_ndim', [
    ((3, 37, 24), (24, 10), 1),  # more rows than columns: row blocks, the last one short
    ((2, 5), (5, 70), 1),  # more columns than rows: column blocks
    ((2, 9, 3, 8), (3, 8, 33), 2),  # two contracted axes (the attention output projection)
    ((4, 6), (6, 1), 1),
])
def test_matmul_and_gradients_match_numpy(x_shape, kernel_shape, in_ndim):
  x, kernel = _normal(0, *x_shape), _normal(1, *kernel_shape)
  d_y = _normal(2, *x_shape[:len(x_shape) - in_ndim], *kernel_shape[in_ndim:])
  fn = lambda a, b: cpu_dense.matmul(a, b, in_ndim)
  y, (d_x, d_kernel) = jax.jit(_value_and_grads, static_argnums=0)(fn, x, kernel, d_y)
  want_y, (want_dx, want_dkernel) = _numpy_dense(x, kernel, d_y, in_ndim)
  _assert_close(y, want_y, 'y')
  _assert_close(d_x, want_dx, 'dx')
  _assert_close(d_kernel, want_dkernel, 'dW')


@pytest.mark.parametrize('equation,x_shape,kernel_shape,in_ndim', [
    ('btd,dknh->kbnth', (2, 5, 12), (12, 3, 2, 4), 1),  # the heads-first qkv projection
    ('bnth,nhd->btd', (2, 3, 5, 4), (3, 4, 12), 2),  # the heads-first output projection
])
def test_einsum_matches_numpy_einsum(equation, x_shape, kernel_shape, in_ndim):
  x, kernel = _normal(3, *x_shape), _normal(4, *kernel_shape)
  want_y = np.einsum(equation, np.asarray(x, np.float64), np.asarray(kernel, np.float64))
  d_y = _normal(5, *want_y.shape)
  fn = lambda a, b: cpu_dense.einsum(equation, a, b, in_ndim)
  y, (d_x, d_kernel) = jax.jit(_value_and_grads, static_argnums=0)(fn, x, kernel, d_y)
  operands, out = equation.split('->')
  x_axes, kernel_axes = operands.split(',')
  d_y64 = np.asarray(d_y, np.float64)
  _assert_close(y, want_y, 'y')
  _assert_close(d_x, np.einsum(f'{out},{kernel_axes}->{x_axes}', d_y64,
                               np.asarray(kernel, np.float64)), 'dx')
  _assert_close(d_kernel, np.einsum(f'{x_axes},{out}->{kernel_axes}',
                                    np.asarray(x, np.float64), d_y64), 'dW')


@pytest.mark.parametrize('batch', [4, 1])  # 1: the batch axes do not divide it and are dropped
def test_sharded_over_the_batch_matches_numpy(batch):
  """On the (2,2,2) mesh each device multiplies its own rows by the whole kernel; the kernel's
  gradient is the sum over the shards (JAX's transpose of the replicated kernel)."""
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  x, kernel, d_y = _normal(6, batch, 7, 16), _normal(7, 16, 24), _normal(8, batch, 7, 24)
  fn = lambda a, b: cpu_dense.matmul(a, b, 1)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    step = jax.jit(_value_and_grads, static_argnums=0)
    hlo = step.lower(fn, x, kernel, d_y).compile().as_text()
    y, (d_x, d_kernel) = step(fn, x, kernel, d_y)
  local_rows = (batch // 4 if batch % 4 == 0 else batch) * 7
  calls = [line for line in hlo.splitlines() if 'custom_call_target="vtp_matmul"' in line]
  assert len(calls) == 3 and any(f'f32[{local_rows},24]' in line for line in calls), calls
  want_y, (want_dx, want_dkernel) = _numpy_dense(x, kernel, d_y, 1)
  _assert_close(y, want_y, 'y')
  _assert_close(d_x, want_dx, 'dx')
  _assert_close(d_kernel, want_dkernel, 'dW')


@pytest.mark.parametrize('block', [
    dict(mlp='swiglu', norm='rmsnorm', attention='xla'),
    dict(mlp='gelu', norm='layernorm', attention='jax', causal=True),  # tokens-first projections
])
def test_block_with_cpu_dense_matches_jnp_layers(block):
  """A whole block with precision.dense='cpu' against the same block's jnp layers: same
  parameters, outputs and parameter gradients, and every linear layer goes through the kernel
  (forward once, backward twice)."""
  spec = dict(width=32, heads=4, rope_dtype='float32', **block)
  ours = layers.Block(layers.BlockSpec(dense='cpu', **spec))
  reference = layers.Block(layers.BlockSpec(dense='xla', **spec))
  grad, params = assert_blocks_agree(ours, reference, _normal(9, 2, 7, 32), first_output=True,
                                     out_atol=1e-5, grad_atol=1e-5)
  linears = 5 if block['mlp'] == 'swiglu' else 4  # qkv, proj and the MLP's
  hlo = grad.lower(ours, params).compile().as_text()
  assert hlo.count('custom_call_target="vtp_matmul"') == 3 * linears


def test_bad_inputs_are_refused_with_the_fix_named():
  with pytest.raises(ValueError, match="precision.compute_dtype='float32'"):
    cpu_dense.matmul(jnp.zeros((2, 4), jnp.bfloat16), jnp.zeros((4, 3), jnp.bfloat16))
  with pytest.raises(ValueError, match='do not end in the kernel'):
    cpu_dense.matmul(jnp.zeros((2, 5)), jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match='not a dense-layer contraction'):
    cpu_dense.einsum('btd,td->b', jnp.zeros((2, 3, 4)), jnp.zeros((3, 4)), 1)
  with pytest.raises(ValueError, match="precision.dense='fast'"):
    layers.BlockSpec(width=32, heads=4, dense='fast')
