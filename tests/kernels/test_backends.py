"""The precision.attention / precision.dense interfaces and the accelerator attention backends.

Numerics are checked on CPU against float64 NumPy attention and against the default 'xla' kernel's
gradients: splash through Pallas's interpreter, 'jax' (jax.nn.dot_product_attention's XLA path)
directly. cuDNN cannot run on CPU, so its test checks that the 'cudnn' backend hands
jax.nn.dot_product_attention implementation='cudnn' and fails with a clear error here. Splash is
also compiled, forward and backward and through the Attention module, for a compile-only TPU v5e
2x2 topology from libtpu (nothing executes on those devices); those tests skip without libtpu.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vtp_jax import sharding
from vtp_jax.kernels import attention as attention_backends
from vtp_jax.kernels import cudnn_attention
from vtp_jax.kernels import dense as dense_backends
from vtp_jax.kernels import splash_attention
from vtp_jax.kernels import xla_attention
from vtp_jax.models import layers


def _numpy_attention(q, k, v, causal):
  """softmax(q k^T / sqrt(d)) v in float64 on (batch, heads, tokens, head_dim)."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  scores = np.einsum('bnqh,bnkh->bnqk', q, k) / np.sqrt(q.shape[-1])
  if causal:
    scores = np.where(np.tril(np.ones(scores.shape[-2:], bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  return np.einsum('bnqk,bnkh->bnqh', probs / probs.sum(-1, keepdims=True), v)


def _qkv(shape, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(shape).astype(np.float32)) for _ in range(3))


def test_interfaces_name_the_option_and_the_choices():
  for backend in ('xla', 'cpu', 'splash'):
    assert attention_backends.heads_first(backend)
  for backend in ('cudnn', 'jax'):
    assert not attention_backends.heads_first(backend)
  with pytest.raises(ValueError, match="precision.attention='flash'.*'splash'"):
    attention_backends.check('flash')
  with pytest.raises(ValueError, match="precision.dense='cudnn'.*'cpu'"):
    layers.BlockSpec(width=32, heads=4, dense='cudnn')
  assert dense_backends.dot_general('xla') is None


# -- splash (TPU) through Pallas's interpreter --------------------------------------------------

@pytest.mark.parametrize('causal', [False, True])
def test_splash_matches_numpy_and_the_xla_gradients(causal):
  """17 tokens (padded to one 128-token block, padded keys masked by segment ids), head dim 64."""
  q, k, v = _qkv((2, 2, 17, 64))
  out = splash_attention.softmax_attention(q, k, v, causal, interpret=True)
  np.testing.assert_allclose(out, _numpy_attention(q, k, v, causal), atol=2e-5, rtol=1e-5)
  weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape).astype(np.float32))

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)
  got = jax.grad(loss(lambda *a: splash_attention.softmax_attention(*a, causal, interpret=True)),
                 argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(lambda *a: xla_attention.softmax_attention(*a, causal)),
                  argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip('qkv', got, want):
    np.testing.assert_allclose(g, w, atol=1e-4 * float(jnp.abs(w).max()), err_msg=f'd{name}')


def test_splash_refuses_what_it_cannot_serve():
  q, k, v = _qkv((1, 2, 8, 48))
  with pytest.raises(ValueError, match="precision.attention='splash' needs a head dim"):
    splash_attention.softmax_attention(q, k, v, interpret=True)
  q, k, v = _qkv((1, 2, 8, 64))
  with pytest.raises(ValueError, match="precision.attention='splash' is a TPU kernel"):
    splash_attention.softmax_attention(q, k, v)
  assert splash_attention.padded_length(197) == 256 and splash_attention.padded_length(128) == 128


# -- cudnn and jax: jax.nn.dot_product_attention ---------------------------------------------

def test_jax_path_matches_numpy_and_xla():
  q, k, v = _qkv((2, 3, 11, 8))  # heads-first for the references
  tokens_first = [jnp.swapaxes(t, 1, 2) for t in (q, k, v)]
  for causal in (False, True):
    out = jnp.swapaxes(attention_backends.softmax_attention(*tokens_first, causal=causal,
                                                            backend='jax'), 1, 2)
    np.testing.assert_allclose(out, _numpy_attention(q, k, v, causal), atol=1e-5)
    np.testing.assert_allclose(out, xla_attention.softmax_attention(q, k, v, causal), atol=1e-6)


@pytest.mark.parametrize('causal', [False, True])
def test_odd_lengths_padded_for_cudnn_give_the_unpadded_attention(causal):
  """The one-token padding (masked by sequence lengths) that the 'cudnn' path adds for odd token
  counts, run through jax's XLA implementation: the same output and gradients as no padding."""
  q, k, v = _qkv((2, 7, 2, 8))

  def loss(pad):
    return lambda q, k, v: jnp.sum(jnp.sin(cudnn_attention.softmax_attention(
        q, k, v, causal, implementation='xla', pad_odd=pad)))

  np.testing.assert_allclose(loss(True)(q, k, v), loss(False)(q, k, v), rtol=1e-6)
  got = jax.grad(loss(True), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(False), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_cudnn_backend_asks_for_cudnn_and_explains_where_it_cannot_run(monkeypatch):
  q, k, v = _qkv((1, 5, 2, 8))
  if jax.default_backend() == 'cpu':
    with pytest.raises(ValueError, match="precision.attention='cudnn' cannot serve .* on cpu"):
      attention_backends.softmax_attention(q, k, v, causal=False, backend='cudnn')
  seen = []

  def spy(*args, implementation=None, **kwargs):
    seen.append(implementation)
    return args[0]
  monkeypatch.setattr(jax.nn, 'dot_product_attention', spy)
  attention_backends.softmax_attention(q, k, v, causal=True, backend='cudnn')
  attention_backends.softmax_attention(q, k, v, causal=True, backend='jax')
  assert seen == ['cudnn', None]
  with pytest.raises(ValueError, match="implementation='flash'"):
    cudnn_attention.softmax_attention(q, k, v, implementation='flash')


# -- splash compiled for a TPU topology (compile only) ---------------------------------------------

@pytest.fixture(scope='module')
def tpu_mesh():
  """A ('data', 'fsdp', 'tensor') = (2, 1, 2) mesh of 4 compile-only TPU v5e devices."""
  pytest.importorskip('libtpu', reason='libtpu is not installed: no TPU compiler to target')
  # Another process holding libtpu's lockfile must not stop a compile-only client.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies
  try:
    topology = topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2')
  except Exception as e:  # noqa: BLE001 (libtpu reports failures with several types)
    pytest.skip(f'libtpu could not describe a v5e:2x2 topology: {e}')
  return jax.sharding.Mesh(np.array(topology.devices).reshape(2, 1, 2), ('data', 'fsdp', 'tensor'))


def _compiled_hlo(fn, mesh, *args):
  # conftest.py asks for 'highest' matmul precision, which Mosaic refuses on bfloat16 operands;
  # training runs keep the default.
  with jax.set_mesh(mesh), jax.default_matmul_precision('default'):
    lowered = jax.jit(fn).lower(*args)
    lowered.compile()  # a TPU executable, never run
  return lowered.as_text()


def test_splash_compiles_for_tpu_forward_and_backward(tpu_mesh):
  """197 tokens (ViT-S/16 at 224 plus CLS; padded to 256), head dim 64, bfloat16, batch over
  'data' and heads over 'tensor'."""
  spec = NamedSharding(tpu_mesh, P('data', 'tensor'))
  sds = jax.ShapeDtypeStruct((4, 2, 197, 64), jnp.bfloat16, sharding=spec)

  def loss(q, k, v):
    out = splash_attention.softmax_attention(q, k, v, causal=True)
    return jnp.sum(out.astype(jnp.float32))
  hlo = _compiled_hlo(jax.grad(loss, argnums=(0, 1, 2)), tpu_mesh, sds, sds, sds)
  assert 'tpu_custom_call' in hlo  # the Pallas kernel, not an XLA fallback


def test_attention_module_with_splash_compiles_for_tpu(tpu_mesh):
  block = layers.BlockSpec(width=128, heads=2, attention='splash', dtype='bfloat16',
                           rope_dtype='float32')
  module = layers.Attention(block)
  x = jax.ShapeDtypeStruct((4, 33, 128), jnp.float32,
                           sharding=NamedSharding(tpu_mesh, P('data')))
  rules = sharding.DEFAULT_RULES
  with jax.set_mesh(tpu_mesh), nn.logical_axis_rules(rules):  # abstract: nothing runs
    boxed = jax.eval_shape(module.init, jax.ShapeDtypeStruct((2,), jnp.uint32), x)
  replicated = NamedSharding(tpu_mesh, P())
  params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=replicated),
                        nn.unbox(boxed))

  def apply(params, x):
    with nn.logical_axis_rules(rules):
      return module.apply(params, x)
  assert 'tpu_custom_call' in _compiled_hlo(apply, tpu_mesh, params, x)
