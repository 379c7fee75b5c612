"""precision.attention='auto': the rule that picks the vmem kernel or splash on TPU and cuDNN on
NVIDIA GPUs where their constraints hold (kernels/attention.py `resolve`), and the choice made
while tracing.

The rule is checked case by case against the constraints the kernel modules state; the traced
choice by compiling the Attention module for a compile-only TPU v5e 2x2 topology (skipped without
libtpu): at 129 tokens head dims 64 and 32 in bfloat16 must lower to the vmem Pallas kernel (which
Mosaic compiles there), at 600 tokens head dim 64 to splash and head dim 32 to no kernel, and on
this CPU host 'auto' must give exactly the 'xla' kernel's output.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vtp_jax import sharding
from vtp_jax.kernels import attention
from vtp_jax.models import layers

TPU = attention.Platform('tpu', 'TPU v5p')
H100 = attention.Platform('gpu', 'NVIDIA H100 80GB HBM3', '9.0')


def _call(**overrides):
  fields = dict(tokens=257, head_dim=64, dtype='bfloat16')
  fields.update(overrides)
  return attention.Call(**fields)


def test_named_backends_are_kept_and_auto_has_no_layout_until_resolved():
  assert attention.resolve('xla', _call(), TPU)[0] == 'xla'
  assert attention.resolve('cudnn', _call(), TPU)[0] == 'cudnn'
  with pytest.raises(ValueError, match='resolve it first'):
    attention.heads_first('auto')
  q = jnp.zeros((1, 1, 4, 8))
  with pytest.raises(ValueError, match='must be resolved'):
    attention.softmax_attention(q, q, q, causal=False, backend='auto')


def test_tpu_takes_vmem_up_to_its_length_then_splash_and_says_why_not_elsewhere():
  name, why = attention.resolve('auto', _call(), TPU)
  assert name == 'vmem' and 'unpadded' in why  # 257 tokens held whole, no 128-token blocks
  assert attention.resolve('auto', _call(tokens=77), TPU)[0] == 'vmem'  # the text tower
  assert attention.resolve('auto', _call(tokens=257, head_dim=80), TPU)[0] == 'vmem'
  name, why = attention.resolve('auto', _call(tokens=600), TPU)
  assert name == 'splash' and 'over the 512' in why and 'padded to 640' in why
  assert attention.resolve('auto', _call(tokens=640, dtype='float32'), TPU)[0] == 'splash'
  refusals = {
      'head dim 80 is not a multiple of 64': _call(tokens=600, head_dim=80),
      'not float16': _call(dtype='float16'),
      "precision='highest'": _call(matmul_precision='highest'),
      'token axis is sharded': _call(seq_sharded=True),
  }
  for reason, call in refusals.items():
    name, why = attention.resolve('auto', call, TPU)
    assert name == 'xla' and reason in why, (reason, why)
  # float32 operands take the TPU kernels whatever the matmul precision.
  assert attention.resolve('auto', _call(dtype='float32', matmul_precision='highest'),
                           TPU)[0] == 'vmem'


def test_gpu_takes_cudnn_on_nvidia_in_half_precision_only():
  assert attention.resolve('auto', _call(), H100)[0] == 'cudnn'
  assert attention.resolve('auto', _call(head_dim=80, dtype='float16'), H100)[0] == 'cudnn'
  # Head dims up to 256 only when the capability is known to be Hopper's.
  assert attention.resolve('auto', _call(head_dim=192), H100)[0] == 'cudnn'
  unknown = attention.Platform('gpu', 'NVIDIA H200')
  name, why = attention.resolve('auto', _call(head_dim=192), unknown)
  assert name == 'xla' and 'up to 128' in why
  refusals = {
      'float16/bfloat16, not float32': (_call(dtype='float32'), H100),
      'not a multiple of 8': (_call(head_dim=60), H100),
      'not an NVIDIA GPU': (_call(), attention.Platform('gpu', 'AMD Instinct MI300X')),
      'below the 8.0': (_call(), attention.Platform('gpu', 'NVIDIA T4', '7.5')),
      'token axis is sharded': (_call(seq_sharded=True), H100),
  }
  for reason, (call, platform) in refusals.items():
    name, why = attention.resolve('auto', call, platform)
    assert name == 'xla' and reason in why, (reason, why)
  # 'cuda' is jax's platform name for NVIDIA devices.
  assert attention.resolve('auto', _call(), attention.Platform('cuda', H100.device_kind, '9.0'))[0] \
      == 'cudnn'


def test_cpu_gets_xla_and_the_same_output_as_xla():
  assert attention.resolve('auto', _call(), attention.Platform('cpu'))[0] == 'xla'
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 64)), jnp.float32)
  outputs = {}
  for backend in ('auto', 'xla'):
    module = layers.Attention(layers.BlockSpec(width=64, heads=1, attention=backend))
    params = module.init(jax.random.PRNGKey(0), x)
    outputs[backend] = module.apply(params, x)
  np.testing.assert_array_equal(outputs['auto'], outputs['xla'])


@pytest.fixture(scope='module')
def tpu_mesh():
  """A ('data', 'fsdp', 'tensor') = (4, 1, 1) mesh of compile-only TPU v5e devices."""
  pytest.importorskip('libtpu', reason='libtpu is not installed: no TPU compiler to target')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies
  try:
    topology = topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2')
  except Exception as e:  # noqa: BLE001 (libtpu reports failures with several types)
    pytest.skip(f'libtpu could not describe a v5e:2x2 topology: {e}')
  return jax.sharding.Mesh(np.array(topology.devices).reshape(4, 1, 1), ('data', 'fsdp', 'tensor'))


def _compiled_attention_hlo(mesh, width, heads, tokens=129):
  module = layers.Attention(layers.BlockSpec(width=width, heads=heads, attention='auto',
                                             dtype='bfloat16', rope_dtype='float32'))
  x = jax.ShapeDtypeStruct((4, tokens, width), jnp.float32, sharding=NamedSharding(mesh, P('data')))
  rules = sharding.DEFAULT_RULES
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):  # abstract: nothing runs
    boxed = jax.eval_shape(module.init, jax.ShapeDtypeStruct((2,), jnp.uint32), x)
  replicated = NamedSharding(mesh, P())
  params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=replicated),
                        nn.unbox(boxed))

  def apply(params, x):
    with nn.logical_axis_rules(rules):
      return module.apply(params, x)
  # conftest.py asks for 'highest' matmul precision, under which 'auto' rightly refuses splash for
  # bfloat16; training runs keep the default.
  with jax.set_mesh(mesh), jax.default_matmul_precision('default'):
    lowered = jax.jit(apply).lower(params, x)
    lowered.compile()  # a TPU executable, never run
  return lowered.as_text()


def test_auto_lowers_to_the_vmem_kernel_then_splash_on_tpu(tpu_mesh):
  from vtp_jax.kernels import vmem_attention
  for head_dim in (64, 32):  # Mosaic compiles both kernels at 129 tokens, no multiple of 8
    hlo = _compiled_attention_hlo(tpu_mesh, width=2 * head_dim, heads=2)
    assert vmem_attention.FORWARD_NAME in hlo and vmem_attention.BACKWARD_NAME not in hlo
  long = _compiled_attention_hlo(tpu_mesh, width=128, heads=2, tokens=600)  # splash's lengths
  assert 'tpu_custom_call' in long and vmem_attention.FORWARD_NAME not in long
  assert 'tpu_custom_call' not in _compiled_attention_hlo(tpu_mesh, width=64, heads=2, tokens=600)


@pytest.mark.parametrize('rope', [False, True])
def test_a_compiled_kernel_call_declares_the_attention_flops_to_xla(tpu_mesh, rope):
  """XLA's cost analysis cannot see inside a Pallas call; the vmem kernels declare their cost, so
  a program holding one reports the attention's FLOPs: per device (batch 8 over 4 devices, 6 heads,
  257 tokens, head dim 64) q k^T and p v forward, 2 T^2 d each; the backward recomputes q k^T and
  adds dv, dp, dq, dk. RoPE turns q and k by a (d, d) matmul, twice more in the backward."""
  from vtp_jax.kernels import vmem_attention
  b, h, t, d = 8 // 4, 6, 257, 64
  qkv = jax.ShapeDtypeStruct((3, 8, h, t, d), jnp.bfloat16,
                             sharding=NamedSharding(tpu_mesh, P(None, 'data')))
  tables = (jax.ShapeDtypeStruct((t - 1, d), jnp.float32, sharding=NamedSharding(tpu_mesh, P())),
            ) * 2 if rope else ()

  def forward(qkv, *tables):
    with nn.logical_axis_rules(sharding.DEFAULT_RULES):
      return vmem_attention.qkv_attention(qkv, *tables)

  def backward(qkv, *tables):  # the forward's output is no input of the gradient: one kernel
    return jax.grad(lambda x: jnp.sum(forward(x, *tables).astype(jnp.float32)))(qkv)

  turn = 2 * t * d * d if rope else 0
  want = {forward: b * h * (2 * 2 * t * t * d + 2 * turn),
          backward: b * h * (5 * 2 * t * t * d + 4 * turn)}
  with jax.set_mesh(tpu_mesh), jax.default_matmul_precision('default'):
    for fn, flops in want.items():
      compiled = jax.jit(fn).lower(qkv, *tables).compile()
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      assert cost['flops'] == pytest.approx(flops, rel=0.01), fn.__name__
      assert cost['transcendentals'] >= b * h * t * t
      assert (vmem_attention.BACKWARD_NAME if fn is backward
              else vmem_attention.FORWARD_NAME) in compiled.as_text()
