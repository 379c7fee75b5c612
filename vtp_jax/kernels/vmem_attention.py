"""`precision.attention='vmem'`: softmax attention as a Pallas TPU kernel that holds each head's
whole sequence in VMEM, for the sequence lengths of ViTs and text towers (up to MAX_TOKENS).

Why beside splash: splash tiles tokens in 128-blocks, so a ViT's 1 + 256 tokens are padded to 384
(and 1 + 196 to 256) by copies of q, k and v in HBM, its output is sliced back, and its saved
log-sum-exp is a float32 array broadcast over 128 lanes that XLA copies into another layout: in the
VTP-S roofline (docs/scaling.md, 'Attention kernels') that was about 40% of the image towers' HBM
bytes. At these lengths one head's scores fit on chip ([T, T] float32 is 258 KiB at T = 257), so
this kernel reads q, k, v once and writes the output once, unpadded (a block that spans a whole
axis needs no (8, 128) alignment), and keeps no residual but q, k, v: the backward recomputes the
softmax of the whole row, so it needs neither the output nor a log-sum-exp, and uses
rowsum(P * dP) for the softmax's row term.

Numerics follow kernels/xla_attention.py: float32 scores and softmax, probabilities cast to v's
dtype before the second matmul, the causal mask a finite floor. Layout is heads-first (batch,
heads, tokens, head_dim); under a mesh the call is a shard_map over batch and heads as the logical
axis rules shard them (GSPMD does not partition a Pallas call), and a sharded token axis raises.
`interpret=True` runs the same kernels through Pallas's interpreter on any platform, which is how
the tests check them on CPU; on TPU they compile with the program (bench.aot compiles them for any
slice).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from vtp_jax import sharding

OPTION = 'precision.attention'
# One head's float32 scores and probabilities ([T, T] each, lanes padded to 128) stay in VMEM with
# its q, k, v blocks; at 512 tokens the backward of 20 heads compiles within the 16 MiB of scoped VMEM that
# v5e and v5p give a kernel (at 640 it does not).
MAX_TOKENS = 512
MAX_HEAD_DIM = 256
DTYPES = ('float32', 'bfloat16')
BF16_PRECISIONS = (None, 'default', 'bfloat16')  # as splash: Mosaic refuses others' bf16 matmuls
# VMEM for one grid step's blocks (double-buffered by Pallas), sizing how many images a step takes.
BLOCK_BUDGET_BYTES = 8 * 2**20
MAX_IMAGES_PER_STEP = 8
# The kernels' names in the compiled program (bench.aot's kernel_calls counts them by name).
FORWARD_NAME, BACKWARD_NAME = 'vmem_attention_fwd', 'vmem_attention_bwd'
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def unsupported(*, tokens: int, head_dim: int, dtype: str, seq_sharded: bool,
                matmul_precision: str | None = None) -> str | None:
  """Why this kernel cannot take a (heads, tokens, head_dim) call on TPU, or None if it can."""
  if tokens > MAX_TOKENS:
    return f'{tokens} tokens is over the {MAX_TOKENS} whose scores it holds in VMEM'
  if head_dim > MAX_HEAD_DIM or head_dim % 8:
    return f'head dim {head_dim} is not a multiple of 8 up to {MAX_HEAD_DIM}'
  if dtype not in DTYPES:
    return f'it takes float32/bfloat16, not {dtype}'
  if dtype != 'float32' and matmul_precision not in BF16_PRECISIONS:
    return (f'jax_default_matmul_precision={matmul_precision!r}, under which Mosaic refuses '
            f'{dtype} matmuls')
  if seq_sharded:
    return 'the token axis is sharded (the kernel is shard_mapped over batch and heads only)'
  return None


def _padded_bytes(heads: int, tokens: int, head_dim: int, itemsize: int) -> int:
  """VMEM of one image's (heads, tokens, head_dim) block: tiles of 8 sublanes by 128 lanes."""
  return heads * (-(-tokens // 8) * 8) * (-(-head_dim // 128) * 128) * itemsize


def block_per_step(batch: int, heads: int, tokens: int, head_dim: int, itemsize: int,
                   arrays: int) -> tuple[int, int]:
  """(images, heads) of one grid step: the most whole images (a divisor of `batch`, at most
  MAX_IMAGES_PER_STEP) whose `arrays` blocks, double buffered, fit BLOCK_BUDGET_BYTES; when one
  image with all its heads does not fit (VTP-H's 20 heads: 19 MiB in the backward, over the 16 MiB
  of scoped VMEM Mosaic gives a kernel), one image and the most heads (a divisor) that fit."""
  per_head = 2 * arrays * _padded_bytes(1, tokens, head_dim, itemsize)
  if heads * per_head > BLOCK_BUDGET_BYTES:
    fitting = [n for n in range(1, heads + 1) if heads % n == 0 and n * per_head <= BLOCK_BUDGET_BYTES]
    return 1, max(fitting, default=1)
  images = [n for n in range(1, min(batch, MAX_IMAGES_PER_STEP) + 1)
            if batch % n == 0 and n * heads * per_head <= BLOCK_BUDGET_BYTES]
  return max(images), heads


def _rounding(rope_dtype: str):
  """The rounding models/rope.py applies after each RoPE op: to bfloat16 in 'bfloat16' mode."""
  if rope_dtype == 'bfloat16':
    return lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
  return lambda x: x


def rotate_half_matrix(head_dim: int) -> np.ndarray:
  """R with x @ R = rotate_half(x) = [-x2, x1] (models/rope.py); R^T = -R. A signed permutation,
  so the product is exact on the MXU, where Mosaic has no cheap shuffle of half a head's lanes."""
  half = head_dim // 2
  r = np.zeros((head_dim, head_dim), np.float32)
  r[np.arange(half) + half, np.arange(half)] = -1.0
  r[np.arange(half), np.arange(half) + half] = 1.0
  return r


def _times_signed_permutation(x, rot):
  """x @ rot for a 0/+-1 matrix `rot` (bfloat16), exact for float32 x too: x is split into three
  bfloat16 parts (8 + 8 + 8 mantissa bits), each product of which is exact. The products are
  bfloat16 at the default precision whatever jax_default_matmul_precision says: under 'highest'
  Mosaic refuses bfloat16 operands ("Bad lhs type"), and exactness needs no more."""
  def times(part):
    return jax.lax.dot_general(part, rot, _NN, precision=jax.lax.Precision.DEFAULT,
                               preferred_element_type=jnp.float32)
  if x.dtype == jnp.bfloat16:
    return times(x)
  out, rest = 0.0, x
  for _ in range(3):
    part = rest.astype(jnp.bfloat16)
    out = out + times(part)
    rest = rest - part.astype(jnp.float32)
  return out


def _rope(x, sin, cos, rot, round_):
  """models/rope.apply_rope of one head's (tokens, head_dim) x, op for op, in x's dtype."""
  xf = round_(x.astype(jnp.float32))
  turned = round_(_times_signed_permutation(x, rot))
  return round_(round_(xf * cos) + round_(turned * sin)).astype(x.dtype)


def _rope_transpose(g, sin, cos, rot):
  """The cotangent of x given that of _rope(x): g cos + R^T (g sin) = g cos - (g sin) R."""
  return g * cos - _times_signed_permutation(g * sin, rot)


def _probabilities(q, k, scale: float, causal: bool):
  """softmax(q k^T * scale) of one head, [Tq, Tk] float32, normalised per query row."""
  s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * np.float32(scale)
  if causal:
    rows = jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    s = jnp.where(cols <= rows, s, jnp.finfo(jnp.float32).min)
  e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  return e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))


def _heads(qkv_ref, rope_refs, i, h, round_):
  """q, k (rotated when there are tables) and v of image i, head h, from the qkv block."""
  q, k, v = qkv_ref[0, i, h], qkv_ref[1, i, h], qkv_ref[2, i, h]
  if rope_refs:
    sin, cos, rot = (ref[...] for ref in rope_refs)
    q, k = _rope(q, sin, cos, rot, round_), _rope(k, sin, cos, rot, round_)
  return q, k, v


def _each_head(qkv_ref, body) -> None:
  """body(i, h) for every image i and head h of the grid step's block, in one loop."""
  heads = qkv_ref.shape[2]

  def step(index, carry):
    body(index // heads, index % heads)
    return carry

  jax.lax.fori_loop(0, qkv_ref.shape[1] * heads, step, 0)


def _forward_kernel(qkv_ref, *refs, scale, causal, rope_dtype):
  rope_refs, (o_ref,) = refs[:-1], refs[-1:]
  round_ = _rounding(rope_dtype)

  def one_head(i, h):
    q, k, v = _heads(qkv_ref, rope_refs, i, h, round_)
    p = _probabilities(q, k, scale, causal)
    o = jax.lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
    o_ref[i, h] = o.astype(o_ref.dtype)

  _each_head(qkv_ref, one_head)


def _backward_kernel(qkv_ref, do_ref, *refs, scale, causal, rope_dtype):
  rope_refs, (dqkv_ref,) = refs[:-1], refs[-1:]
  round_ = _rounding(rope_dtype)

  def one_head(i, h):
    q, k, v = _heads(qkv_ref, rope_refs, i, h, round_)
    do = do_ref[i, h]
    p = _probabilities(q, k, scale, causal)
    dv = jax.lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    # The softmax backward's row term rowsum(P * dP); masked entries have P = 0 and drop out.
    ds = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True)) * np.float32(scale)
    dq = jax.lax.dot_general(ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32)
    dk = jax.lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32)
    if rope_refs:
      sin, cos, rot = (ref[...] for ref in rope_refs)
      # Rounded to the operands' dtype first, as the cotangent the unfused RoPE receives.
      dq = _rope_transpose(dq.astype(q.dtype).astype(jnp.float32), sin, cos, rot)
      dk = _rope_transpose(dk.astype(k.dtype).astype(jnp.float32), sin, cos, rot)
    dqkv_ref[0, i, h] = dq.astype(dqkv_ref.dtype)
    dqkv_ref[1, i, h] = dk.astype(dqkv_ref.dtype)
    dqkv_ref[2, i, h] = dv.astype(dqkv_ref.dtype)

  _each_head(qkv_ref, one_head)


def cost(name: str, batch: int, heads: int, tokens: int, head_dim: int, itemsize: int,
         rope: bool, rope_parts: int = 1) -> dict:
  """What one call of the forward (FORWARD_NAME) or backward kernel computes and moves: FLOPs of
  its matmuls (2 per multiply-add), exponentials, HBM bytes of its blocks. XLA's cost analysis
  cannot see inside a Pallas call, so the call declares these (pl.CostEstimate) and bench.aot's
  totals and step-time estimate include attention.

  Per image and head: the forward's q k^T and p v are 2 T^2 d each; the backward recomputes q k^T
  and adds dv, dp, dq, dk (5 of them). RoPE turns q and k by a (d, d) matmul per bfloat16 part of
  the operand (`rope_parts`: 1 for bfloat16, 3 for float32), twice more in the backward for the
  cotangents. Each recomputed softmax takes T^2 exponentials."""
  per_matmul = 2 * tokens * tokens * head_dim
  per_turn = 2 * tokens * head_dim * head_dim * rope_parts
  forward = name == FORWARD_NAME
  matmuls = 2 if forward else 5
  turns = (2 if forward else 4) if rope else 0
  block = batch * heads * tokens * head_dim * itemsize
  moved = (3 + 1) * block if forward else (3 + 1 + 3) * block  # qkv (+ d_out) in, out / d_qkv
  if rope:
    moved += 2 * tokens * head_dim * 4 + head_dim * head_dim * 2  # sin, cos (f32), R (bf16)
  return {'flops': batch * heads * (matmuls * per_matmul + turns * per_turn),
          'transcendentals': batch * heads * tokens * tokens,
          'bytes_accessed': moved}


def _call(kernel, name: str, qkv, extra, tables, out_shape, causal, rope_dtype, interpret):
  """pallas_call of `kernel` over grid steps of whole images and heads (all tokens): qkv's
  (3, images, heads, ...) block, the (images, heads, ...) blocks of `extra`, the whole RoPE
  `tables`."""
  from jax.experimental import pallas as pl  # Pallas on use only
  from jax.experimental.pallas import tpu as pltpu
  _, batch, heads, tokens, head_dim = qkv.shape
  arrays = 3 + len(extra) + (3 if len(out_shape.shape) == 5 else 1)
  images, step_heads = block_per_step(batch, heads, tokens, head_dim, qkv.dtype.itemsize, arrays)
  block = (images, step_heads, tokens, head_dim)
  stacked = pl.BlockSpec((3,) + block, lambda step, head: (0, step, head, 0, 0))
  single = pl.BlockSpec(block, lambda step, head: (step, head, 0, 0))
  whole = [pl.BlockSpec(t.shape, lambda step, head: (0, 0)) for t in tables]
  return pl.pallas_call(
      functools.partial(kernel, scale=head_dim ** -0.5, causal=causal, rope_dtype=rope_dtype),
      grid=(batch // images, heads // step_heads),
      in_specs=[stacked] + [single] * len(extra) + whole,
      out_specs=stacked if len(out_shape.shape) == 5 else single,
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel')),
      cost_estimate=pl.CostEstimate(**cost(
          name, batch, heads, tokens, head_dim, qkv.dtype.itemsize, bool(tables),
          1 if qkv.dtype == jnp.bfloat16 else 3)),
      interpret=interpret,
      name=name,
  )(qkv, *extra, *tables)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _attention(qkv, sin, cos, causal: bool, rope: bool, rope_dtype: str, interpret: bool):
  tables = _tables(qkv, sin, cos) if rope else ()
  out_shape = jax.ShapeDtypeStruct(qkv.shape[1:], qkv.dtype)
  return _call(_forward_kernel, FORWARD_NAME, qkv, (), tables, out_shape, causal, rope_dtype,
               interpret)


def _tables(qkv, sin, cos):
  rot = jnp.asarray(rotate_half_matrix(qkv.shape[-1]), jnp.bfloat16)
  return sin.astype(jnp.float32), cos.astype(jnp.float32), rot


def _attention_fwd(qkv, sin, cos, causal, rope, rope_dtype, interpret):
  return _attention(qkv, sin, cos, causal, rope, rope_dtype, interpret), (qkv, sin, cos)


def _attention_bwd(causal, rope, rope_dtype, interpret, residuals, d_out):
  qkv, sin, cos = residuals
  tables = _tables(qkv, sin, cos) if rope else ()
  out_shape = jax.ShapeDtypeStruct(qkv.shape, qkv.dtype)
  d_qkv = _call(_backward_kernel, BACKWARD_NAME, qkv, (d_out.astype(qkv.dtype),), tables,
                out_shape, causal, rope_dtype, interpret)
  # The tables are constants of the position grid (or of its augmentation draw): no gradient.
  return d_qkv, jnp.zeros_like(sin), jnp.zeros_like(cos)


_attention.defvjp(_attention_fwd, _attention_bwd)


def full_tables(sin, cos, tokens: int):
  """RoPE tables over all `tokens`: the prefix (CLS, registers) rows cos 1, sin 0, as
  models/rope.apply_rope pads them, so every token takes the same elementwise rotation."""
  n_prefix = tokens - sin.shape[0]
  if n_prefix:
    sin = jnp.concatenate([jnp.zeros((n_prefix,) + sin.shape[1:], sin.dtype), sin])
    cos = jnp.concatenate([jnp.ones((n_prefix,) + cos.shape[1:], cos.dtype), cos])
  return sin, cos


def qkv_attention(qkv: jax.Array, sin=None, cos=None, causal: bool = False, *,
                  rope_dtype: str = 'bfloat16', interpret: bool = False) -> jax.Array:
  """softmax(q' k'^T / sqrt(head_dim)) v of the stacked (3, batch, heads, tokens, head_dim)
  projections, q' and k' rotated by RoPE in the kernel when `sin`, `cos` ((patch tokens,
  head_dim) tables, models/rope.py) are given. Returns (batch, heads, tokens, head_dim).

  Reading the projection's output whole is what spares HBM the copies of q, k, v sliced out of
  it and of the rotated q, k; the backward writes the projection's cotangent whole likewise."""
  if qkv.ndim != 5 or qkv.shape[0] != 3:
    raise ValueError(f"{OPTION}='vmem' takes stacked (3, batch, heads, tokens, head_dim) "
                     f'projections; got shape {qkv.shape}.')
  why_not = unsupported(tokens=qkv.shape[3], head_dim=qkv.shape[4],
                        dtype=jnp.dtype(qkv.dtype).name, seq_sharded=False)
  if why_not:
    raise ValueError(f"{OPTION}='vmem' cannot take projections of shape {qkv.shape} {qkv.dtype}: "
                     f"{why_not}; use {OPTION}='splash' or 'xla' for it.")
  if not interpret and jax.default_backend() != 'tpu' and not _lowering_for_tpu():
    raise ValueError(f"{OPTION}='vmem' is a TPU kernel and this runs on "
                     f"{jax.default_backend()}; use {OPTION}='xla' (or 'cudnn' on GPU).")
  rope = sin is not None
  if rope:
    sin, cos = full_tables(sin, cos, qkv.shape[3])
  else:
    sin = cos = jnp.zeros((1, 1), jnp.float32)  # unused placeholders of the custom_vjp

  def run(qkv, sin, cos):
    return _attention(qkv, sin, cos, bool(causal), rope, rope_dtype, bool(interpret))

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return run(qkv, sin, cos)
  names = ('act_batch', 'act_heads', 'act_seq', None)
  spec = sharding.fit_spec(P(*nn.logical_to_mesh_axes(names)), qkv.shape[1:], mesh)
  if spec[2] is not None:
    raise ValueError(f"{OPTION}='vmem' needs whole sequences on each device, but the logical "
                     f"axis rules shard 'act_seq' (tokens) over {spec[2]!r}; map 'act_seq' to "
                     f"None in mesh.rules or use {OPTION}='xla'.")
  local = jax.shard_map(run, mesh=mesh, in_specs=(P(None, *spec), P(), P()), out_specs=spec,
                        check_vma=False)
  return local(qkv, sin, cos)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = False, *,
                      interpret: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v on (batch, heads, tokens, head_dim) arrays (stacked into
  one array for the kernel: models/layers.py hands it the projection whole instead)."""
  return qkv_attention(jnp.stack([q, k, v]), causal=causal, interpret=interpret)


def _lowering_for_tpu() -> bool:
  """True while tracing under a mesh of TPU devices that are not the default backend's (a
  compile-only TPU topology on a CPU host)."""
  device = getattr(jax.sharding.get_abstract_mesh(), 'abstract_device', None)
  return getattr(device, 'platform', None) == 'tpu'
