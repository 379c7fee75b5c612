"""Transformer building blocks shared by the vision encoder and the pixel decoder.

Pre-norm ViT blocks (DINOv3 style): RMSNorm or LayerNorm, fused-qkv attention with optional QK-norm
and 2-D RoPE, SwiGLU or GELU MLP, optional LayerScale, and DINOv2's batch-subset stochastic depth.
Every parameter carries logical axis names; `vtp_jax/sharding.py` alone maps them to mesh axes.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtp_jax.kernels import attention as attention_backends
from vtp_jax.kernels import dense as dense_backends
from vtp_jax.models import rope as rope_lib

# Initialisers of the reference (spec 1.13): trunc-normal(0.02) linears, zero biases, unit norms.
DENSE_INIT = nn.initializers.truncated_normal(0.02)
ZEROS = nn.initializers.zeros_init()
ONES = nn.initializers.ones_init()


def param_with_axes(init, names):
  return nn.with_logical_partitioning(init, names)


def dtype_of(name: str):
  return {'bfloat16': jnp.bfloat16, 'float32': jnp.float32, 'float16': jnp.float16}[name]


def swiglu_hidden(width: int, mlp_ratio: float) -> int:
  """DINOv3 SwiGLU hidden size: 2/3 of ratio*width, rounded up to a multiple of 8 (spec 1.2)."""
  hidden = int(int(width * mlp_ratio) * 2 / 3)
  return (hidden + 7) // 8 * 8


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Static description of one pre-norm transformer block (hashable for Flax transforms)."""
  width: int
  heads: int
  mlp: str = 'swiglu'  # 'swiglu' or 'gelu'
  mlp_ratio: float = 4.0
  norm: str = 'rmsnorm'  # 'rmsnorm' or 'layernorm'
  norm_eps: float = 1e-5
  qkv_bias: bool = True
  qk_norm: bool = False
  qk_norm_eps: float = 1e-5  # the reference's q/k RMSNorm eps, independent of norm_eps
  layerscale: float = 0.0  # 0 disables LayerScale
  dtype: str = 'float32'  # compute dtype
  rope_dtype: str = 'bfloat16'
  attention: str = 'xla'  # precision.attention: a backend of kernels/attention.py
  dense: str = 'xla'  # precision.dense: a backend of kernels/dense.py
  drop_path_mode: str = 'subset'  # 'subset' (DINOv2) or 'sample' (Bernoulli per sample)
  causal: bool = False  # causal self-attention (text tower)
  # 'vit': trunc-normal(0.02) everywhere (the reference); 'fan_in': trunc-normal(fan_in^-0.5);
  # 'openclip': OpenCLIP text-tower stds; 'xavier': LightningDiT's xavier-uniform (generation/dit.py)
  init: str = 'vit'
  depth_for_init: int = 1  # tower depth, for OpenCLIP's depth-scaled output-projection std

  def __post_init__(self):
    if self.width % self.heads:
      raise ValueError(f'width {self.width} is not divisible by heads {self.heads}.')
    if self.mlp not in ('swiglu', 'gelu'):
      raise ValueError(f"mlp={self.mlp!r}; use 'swiglu' or 'gelu'.")
    if self.norm not in ('rmsnorm', 'layernorm'):
      raise ValueError(f"norm={self.norm!r}; use 'rmsnorm' or 'layernorm'.")
    attention_backends.check(self.attention)
    dense_backends.check(self.dense)
    if self.init not in ('vit', 'fan_in', 'openclip', 'xavier'):
      raise ValueError(f"model.encoder/decoder.init={self.init!r}; use 'vit' (trunc-normal "
                       "0.02, the reference) or 'fan_in' (trunc-normal fan_in^-0.5).")
    if self.drop_path_mode not in ('subset', 'sample'):
      raise ValueError(f"drop_path_mode={self.drop_path_mode!r}; use 'subset' or 'sample'.")

  def init_for(self, which: str):
    """Kernel initialiser of 'qkv', 'proj', 'fc' (MLP in) or 'fc_out' (MLP out).

    OpenCLIP's text tower (spec 1.6): attention std w^-0.5, output projections w^-0.5 (2 depth)^-0.5,
    MLP input (2w)^-0.5. The ViT towers use trunc-normal(0.02) throughout (spec 1.13), a scale set
    for widths near 768; 'fan_in' uses each layer's fan-in instead (LeCun), since at width 128 the
    0.02 is a quarter of w^-0.5. What each changes is measured in docs/benchmarks.md, 'The demo
    learns colour, not shape'.
    """
    if self.init == 'vit':
      return DENSE_INIT
    w = self.width
    if self.init == 'xavier':  # bounds of torch's fused weights: qkv (3w, w), SwiGLU w12 (2h, w)
      h = self.mlp_hidden
      fans = {'qkv': (w, 3 * w), 'proj': (w, w), 'fc_out': (h, w),
              'fc': (w, 2 * h if self.mlp == 'swiglu' else h)}[which]
      bound = (6.0 / sum(fans)) ** 0.5
      return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                       bound)
    if self.init == 'fan_in':
      fan_in = self.mlp_hidden if which == 'fc_out' else w
      return nn.initializers.truncated_normal(fan_in ** -0.5)
    std = {'qkv': w ** -0.5, 'proj': w ** -0.5 * (2 * self.depth_for_init) ** -0.5,
           'fc': (2 * w) ** -0.5, 'fc_out': w ** -0.5 * (2 * self.depth_for_init) ** -0.5}[which]
    return nn.initializers.normal(std)

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  @property
  def mlp_hidden(self) -> int:
    if self.mlp == 'swiglu':
      return swiglu_hidden(self.width, self.mlp_ratio)
    return int(self.width * self.mlp_ratio)


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) in float32, cast back, then times the weight (DINOv3 RMSNorm)."""
  eps: float = 1e-5
  axis_name: str = 'norm'

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', param_with_axes(ONES, (self.axis_name,)), (x.shape[-1],))
    xf = x.astype(jnp.float32)
    normed = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps))
    return normed.astype(x.dtype) * scale.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float):
  """(x - mean) * rsqrt(var + eps) * scale + bias over the last axis, statistics in float32, the
  result cast back to x's dtype (PyTorch's fp32 LayerNorm), with the textbook backward below.

  Why a hand-written backward: under autodiff, XLA:CPU fuses each block's LayerNorm backward into
  the residual stream's cotangent and re-computes that whole chain, from the top of the tower
  down, inside every consumer (measured: a 12-block, width-768 text tower's gradient took 3.6-4.3 s,
  1.2 s of it in those fusions; 2.4 s with this backward). The closed form saves x-hat and 1/std
  and reads them once, so the chain is materialised per block. Values are the same as autodiff's
  (tests/models/test_layers.py checks them against it).
  """
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  xf = x.astype(jnp.float32)
  centred = xf - jnp.mean(xf, axis=-1, keepdims=True)
  inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
  normed = centred * inv_std
  return (normed * scale + bias).astype(x.dtype), (normed, inv_std, scale)


def _layer_norm_bwd(eps, residuals, g):
  del eps
  normed, inv_std, scale = residuals
  gf = g.astype(jnp.float32)
  leading = tuple(range(gf.ndim - 1))
  d_normed = gf * scale
  # d/dx of (x - mean) / std: remove the cotangent's mean and its component along x-hat.
  dx = inv_std * (d_normed - jnp.mean(d_normed, axis=-1, keepdims=True)
                  - normed * jnp.mean(d_normed * normed, axis=-1, keepdims=True))
  return (dx.astype(g.dtype), jnp.sum(gf * normed, axis=leading).astype(scale.dtype),
          jnp.sum(gf, axis=leading).astype(scale.dtype))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """LayerNorm with weight and bias, statistics in float32 (as PyTorch's fp32 LayerNorm)."""
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', param_with_axes(ONES, ('norm',)), (x.shape[-1],))
    bias = self.param('bias', param_with_axes(ZEROS, ('norm',)), (x.shape[-1],))
    return layer_norm(x, scale, bias, self.eps)


def make_norm(kind: str, eps: float, name: str):
  return RMSNorm(eps=eps, name=name) if kind == 'rmsnorm' else LayerNorm(eps=eps, name=name)


def dense(features, in_axis: str, out_axis: str, name: str, dtype, use_bias=True, init=DENSE_INIT,
          impl: str = 'xla'):
  """A Dense layer with float32 parameters, `dtype` compute and logical axes on kernel and bias;
  `impl` is the precision.dense backend (kernels/dense.py)."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
      kernel_init=param_with_axes(init, (in_axis, out_axis)),
      bias_init=param_with_axes(ZEROS, (out_axis,)),
      dot_general=dense_backends.dot_general(impl))


class DenseND(nn.Module):
  """x (..., *in) -> (..., *out_shape) by a kernel of shape (*in, *out_shape), plus optional bias.

  Flax's DenseGeneral initialises a flattened kernel and reshapes it, which breaks logical
  partitioning metadata (the names describe the unflattened shape); this creates it whole.
  `equation` (an einsum of x and the kernel) replaces the default contraction when the output
  should come out in another axis order; `bias_shape` then says how the bias broadcasts onto it.
  `impl` is the precision.dense backend that contracts (kernels/dense.py).
  """
  out_shape: tuple
  in_ndim: int
  kernel_axes: tuple
  bias_axes: tuple | None
  dtype: Any = jnp.float32
  init: Any = DENSE_INIT
  equation: str | None = None
  bias_shape: tuple | None = None
  impl: str = 'xla'

  @nn.compact
  def __call__(self, x, in_shape: tuple | None = None):
    in_shape = tuple(in_shape or x.shape[x.ndim - self.in_ndim:])
    kernel = self.param('kernel', param_with_axes(self.init, self.kernel_axes),
                        in_shape + tuple(self.out_shape), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    y = dense_backends.contract(x, kernel, self.in_ndim, self.equation, backend=self.impl)
    if self.bias_axes is not None:
      bias = self.param('bias', param_with_axes(ZEROS, self.bias_axes), tuple(self.out_shape),
                        jnp.float32)
      y = y + bias.astype(self.dtype).reshape(self.bias_shape or bias.shape)
    return y


class Mlp(nn.Module):
  """SwiGLU `w3(silu(w1 x) * w2 x)` with three biased linears, or GELU `fc2(gelu(fc1 x))`."""
  spec: BlockSpec

  @nn.compact
  def __call__(self, x):
    s, dtype = self.spec, dtype_of(self.spec.dtype)
    if s.mlp == 'swiglu':
      gate = dense(s.mlp_hidden, 'embed', 'mlp', 'w1', dtype, init=s.init_for('fc'),
                   impl=s.dense)(x)
      value = dense(s.mlp_hidden, 'embed', 'mlp', 'w2', dtype, init=s.init_for('fc'),
                   impl=s.dense)(x)
      hidden = nn.with_logical_constraint(nn.silu(gate) * value, ('act_batch', 'act_seq', 'act_mlp'))
      return dense(s.width, 'mlp', 'embed', 'w3', dtype, init=s.init_for('fc_out'),
                   impl=s.dense)(hidden)
    hidden = dense(s.mlp_hidden, 'embed', 'mlp', 'fc1', dtype, init=s.init_for('fc'),
                   impl=s.dense)(x)
    hidden = nn.with_logical_constraint(nn.gelu(hidden, approximate=False),
                                        ('act_batch', 'act_seq', 'act_mlp'))
    return dense(s.width, 'mlp', 'embed', 'fc2', dtype, init=s.init_for('fc_out'),
                   impl=s.dense)(hidden)


class Attention(nn.Module):
  """Fused-qkv multi-head attention; q/k optionally RMS-normed, then rotated by RoPE.

  The qkv kernel is (width, 3, heads, head_dim) rather than a flat (width, 3*width) so that tensor
  parallelism splits whole heads and never cuts across the q/k/v boundary.
  The projections write and read the layout the precision.attention backend takes
  (kernels/attention.py): heads-first (batch, heads, tokens, head_dim) or jax.nn's tokens-first
  (batch, tokens, heads, head_dim); 'vmem' takes the projection whole and slices and rotates q, k
  on chip (no HBM copy of either). The parameters are the same every way.
  """
  spec: BlockSpec

  @nn.compact
  def __call__(self, x, sin=None, cos=None):
    s, dtype = self.spec, dtype_of(self.spec.dtype)
    # 'auto' resolves here, at trace time: the layout the projections write depends on the choice.
    backend = attention_backends.choose(s.attention, tokens=x.shape[1], head_dim=s.head_dim,
                                        dtype=dtype, causal=s.causal)
    heads_first = attention_backends.heads_first(backend)
    qkv = DenseND((3, s.heads, s.head_dim), 1, ('embed', 'qkv', 'heads', 'head_dim'),
                  ('qkv', 'heads', 'head_dim') if s.qkv_bias else None, dtype,
                  s.init_for('qkv'), name='qkv', impl=s.dense,
                  equation='btd,dknh->kbnth' if heads_first else 'btd,dknh->kbtnh',
                  bias_shape=((3, 1, s.heads, 1, s.head_dim) if heads_first
                              else (3, 1, 1, s.heads, s.head_dim)))(x)
    names = (('act_batch', 'act_heads', 'act_seq', None) if heads_first
             else ('act_batch', 'act_seq', 'act_heads', None))
    if attention_backends.takes_projection(backend) and not s.qk_norm:
      qkv = nn.with_logical_constraint(qkv, (None,) + names)
      out = attention_backends.qkv_attention(qkv, sin, cos, causal=s.causal,
                                             rope_dtype=s.rope_dtype, backend=backend)
    else:
      q, k, v = qkv[0], qkv[1], qkv[2]
      if s.qk_norm:
        q = RMSNorm(eps=s.qk_norm_eps, axis_name='head_dim', name='q_norm')(q)
        k = RMSNorm(eps=s.qk_norm_eps, axis_name='head_dim', name='k_norm')(k)
      if sin is not None:
        token_axis = 2 if heads_first else 1
        q = rope_lib.apply_rope(q, sin, cos, s.rope_dtype, token_axis)
        k = rope_lib.apply_rope(k, sin, cos, s.rope_dtype, token_axis)
      q, k, v = (nn.with_logical_constraint(t, names) for t in (q, k, v))
      out = attention_backends.softmax_attention(q, k, v, causal=s.causal, backend=backend)
    out = nn.with_logical_constraint(out, names)
    return DenseND((s.width,), 2, ('heads', 'head_dim', 'embed'), ('embed',), dtype,
                   s.init_for('proj'), name='proj', impl=s.dense,
                   equation='bnth,nhd->btd' if heads_first else 'btnh,nhd->btd')(
                       out, in_shape=(s.heads, s.head_dim))


class LayerScale(nn.Module):
  init_value: float

  @nn.compact
  def __call__(self, x):
    gamma = self.param('gamma', param_with_axes(nn.initializers.constant(self.init_value), ('norm',)),
                       (x.shape[-1],))
    return x * gamma.astype(x.dtype)


def drop_path_residual(branch, x, rate: float, mode: str, rng):
  """x + branch(x) with stochastic depth applied to the residual.

  'subset' is DINOv2's batch-subset drop (spec 1.10): the branch runs on a random subset of
  keep = max(int(b(1-r)), 1) samples only, and its output is added back scaled by b/keep, so dropped
  samples cost no compute. 'sample' is classic per-sample Bernoulli drop with scale 1/(1-r).
  """
  if rate <= 0.0 or rng is None:
    return x + branch(x)
  b = x.shape[0]
  if mode == 'subset':
    keep = max(int(b * (1.0 - rate)), 1)
    idx = jax.random.permutation(rng, b)[:keep]
    update = branch(x[idx]) * jnp.asarray(b / keep, x.dtype)
    return x.at[idx].add(update)
  keep_mask = jax.random.bernoulli(rng, 1.0 - rate, (b,) + (1,) * (x.ndim - 1))
  return x + branch(x) * keep_mask.astype(x.dtype) / jnp.asarray(1.0 - rate, x.dtype)


class Block(nn.Module):
  """Pre-norm block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x)).

  `drop_rate` > 0 (training only) draws from the 'drop_path' rng stream.
  Returns (x, x or None) so it can serve as an `nn.scan` body that can emit every layer's output.
  """
  spec: BlockSpec
  drop_rate: float = 0.0
  emit: bool = False  # also return this block's output (scan 'ys'), for intermediate layers

  @nn.compact
  def __call__(self, x, sin, cos):
    s = self.spec
    norm1 = make_norm(s.norm, s.norm_eps, 'norm1')
    norm2 = make_norm(s.norm, s.norm_eps, 'norm2')
    attn = Attention(s, name='attn')
    mlp = Mlp(s, name='mlp')
    ls1 = LayerScale(s.layerscale, name='ls1') if s.layerscale else (lambda t: t)
    ls2 = LayerScale(s.layerscale, name='ls2') if s.layerscale else (lambda t: t)
    rngs = (tuple(jax.random.split(self.make_rng('drop_path'))) if self.drop_rate > 0
            else (None, None))
    x = drop_path_residual(lambda t: ls1(attn(norm1(t), sin, cos)), x, self.drop_rate,
                           s.drop_path_mode, rngs[0])
    x = drop_path_residual(lambda t: ls2(mlp(norm2(t))), x, self.drop_rate,
                           s.drop_path_mode, rngs[1])
    x = nn.with_logical_constraint(x, ('act_batch', 'act_seq', 'act_embed'))
    return x, (x if self.emit else None)


REMAT_POLICIES: dict[str, Any] = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def run_blocks(spec: BlockSpec, depth: int, x, sin, cos, *, scan: bool = True,
               remat_policy: str = 'none', drop_rate: float = 0.0, keep_outputs: bool = False):
  """Runs `depth` blocks as submodules of the calling module (call it inside a compact method).

  Scanned, the params of all blocks are stacked on a leading 'layers' axis under 'blocks'; unrolled,
  they live under 'blocks_0', 'blocks_1', ... (`vtp_jax.models.layout` converts between the two).
  Returns the final tokens and, when `keep_outputs`, every block's output stacked on axis 0.
  """
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f'precision.remat_policy={remat_policy!r}; use one of '
                     f'{sorted(REMAT_POLICIES)}.')
  block_cls = Block
  if remat_policy != 'none':
    # prevent_cse is only needed outside scan (scan already stops CSE across iterations).
    block_cls = nn.remat(Block, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan)
  if scan:
    stack = nn.scan(
        block_cls, variable_axes={'params': 0}, split_rngs={'params': True, 'drop_path': True},
        in_axes=(nn.broadcast, nn.broadcast), length=depth,
        metadata_params={nn.PARTITION_NAME: 'layers'})
    return stack(spec, drop_rate, keep_outputs, name='blocks')(x, sin, cos)
  outputs = []
  for i in range(depth):
    x, _ = block_cls(spec, drop_rate, name=f'blocks_{i}')(x, sin, cos)
    outputs.append(x)
  return x, (jnp.stack(outputs) if keep_outputs else None)


def block_forward_flops(n_tokens: int, width: int, mlp_hidden: int, mlp: str,
                        causal: bool = False, attention: bool = True) -> float:
  """Forward FLOPs of one pre-norm transformer block on one sequence (train/flops.py states the
  convention: 2 m k n a matmul, attention 4 N^2 D, halved under a causal mask)."""
  n, d, f = n_tokens, width, mlp_hidden
  dense = 2 * n * d * 3 * d + 2 * n * d * d + (3 if mlp == 'swiglu' else 2) * 2 * n * d * f
  attn = 4 * n * n * d * (0.5 if causal else 1.0) if attention else 0.0
  return dense + attn
