"""`precision.attention='splash'`: softmax attention as the TPU splash attention Pallas kernel
(`jax.experimental.pallas.ops.tpu.splash_attention`), on heads-first (batch, heads, tokens,
head_dim) arrays like kernels/xla_attention.py.

Splash tiles the sequence in blocks of 128 query and 128 key tokens (its lane width), so the token
count is padded up to a multiple of 128 here: ViT sequences (1 + 196 or 1 + 256 tokens) never are.
Padded keys carry segment id 1 and real tokens 0, and splash attends only within a segment, so no
real query sees a padded key; the padded query rows are sliced off. The 1/sqrt(head_dim) scale is
applied to q beforehand (splash does not scale). The head dim must be a multiple of 64 (128 is the
lane width; 64 is what VTP's heads use and what Mosaic lays out): other head dims raise an error.

With bfloat16 inputs, leave `jax_default_matmul_precision` at its default: under 'highest' Mosaic
refuses the kernel's bfloat16 matmuls ("Bad lhs type"). On TPU the kernel runs compiled;
`interpret=True` runs the same kernel through Pallas's interpreter on any platform, which is how the
tests check it against the XLA kernel on CPU. Under a mesh the call is a shard_map over batch and
heads as the logical axis rules shard them (splash is per head, and GSPMD does not partition a
Pallas call). The token axis must not be sharded: each device would attend within its slice of
the tokens only, so that raises.

`unsupported` states which calls the kernel takes, for `precision.attention='auto'`
(kernels/attention.py): the head dim rule above; float32 or bfloat16 (Mosaic refuses float16
loads on v5e, "Invalid vector type for load"); for bfloat16, a default matmul precision of None,
'default' or 'bfloat16' (with 'highest' / 'float32' Mosaic fails with "Bad lhs type", with 'high' /
'tensorfloat32' "Unsupported dot precision: HIGH"); an unsharded token axis. These were found by
compiling this module for a v5e 2x2 topology with jax 0.10.2 / libtpu 0.0.42. Any token count is
taken (padded as above). The 64 rule is this module's, stricter than Mosaic's: Mosaic also
compiled head dims 32, 80, 96 and 192 there, each padded to 128 lanes, which wastes MXU width.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from vtp_jax import sharding

OPTION = 'precision.attention'
BLOCK = 128  # splash's block sizes must be multiples of the TPU lane width, 128
HEAD_DIM_MULTIPLE = 64
LOGICAL_AXES = ('act_batch', 'act_heads', 'act_seq', None)
DTYPES = ('float32', 'bfloat16')
# jax_default_matmul_precision values under which Mosaic compiles the kernel's bfloat16 matmuls.
BF16_PRECISIONS = (None, 'default', 'bfloat16')


def padded_length(tokens: int) -> int:
  return -(-tokens // BLOCK) * BLOCK


@functools.lru_cache(maxsize=32)
def _kernel(heads: int, length: int, causal: bool, interpret: bool):
  """The splash kernel for one (heads, length, causal): its mask tables are built on the host."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # Pallas on use only
  shape = (length, length)
  mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
  blocks = splash.BlockSizes(block_q=BLOCK, block_kv=BLOCK, block_kv_compute=BLOCK,
                             block_q_dkv=BLOCK, block_kv_dkv=BLOCK, block_kv_dkv_compute=BLOCK,
                             block_q_dq=BLOCK, block_kv_dq=BLOCK)
  return splash.make_splash_mha_single_device(
      splash.MultiHeadMask([mask] * heads), block_sizes=blocks, interpret=interpret)


def unsupported(*, head_dim: int, dtype: str, seq_sharded: bool,
                matmul_precision: str | None = None) -> str | None:
  """Why this module cannot run a (heads, tokens, head_dim) call on TPU, or None if it can."""
  if head_dim % HEAD_DIM_MULTIPLE:
    return f'head dim {head_dim} is not a multiple of {HEAD_DIM_MULTIPLE}'
  if dtype not in DTYPES:
    return f'splash takes float32/bfloat16, not {dtype}'
  if dtype != 'float32' and matmul_precision not in BF16_PRECISIONS:
    return (f'jax_default_matmul_precision={matmul_precision!r}, under which Mosaic refuses '
            f'{dtype} matmuls')
  if seq_sharded:
    return 'the token axis is sharded (splash is shard_mapped over batch and heads only)'
  return None


def check_shape(q: jax.Array) -> None:
  if q.ndim != 4:
    raise ValueError(f'{OPTION}=splash takes heads-first (batch, heads, tokens, head_dim) arrays; '
                     f'got shape {q.shape}.')
  if q.shape[-1] % HEAD_DIM_MULTIPLE:
    raise ValueError(f"{OPTION}='splash' needs a head dim that is a multiple of "
                     f'{HEAD_DIM_MULTIPLE}; this model has {q.shape[-1]} (width / heads). Use '
                     f"{OPTION}='xla' for it, or choose heads so that width / heads is 64 or 128.")


def _local(q, k, v, causal: bool, interpret: bool):
  batch, heads, tokens, head_dim = q.shape
  length = padded_length(tokens)
  kernel = _kernel(heads, length, bool(causal), bool(interpret))
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  q = (q.astype(jnp.float32) * np.float32(head_dim ** -0.5)).astype(q.dtype)
  pad = [(0, 0), (0, 0), (0, length - tokens), (0, 0)]
  q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
  segment_ids = None
  if length != tokens:
    ids = jnp.asarray(np.arange(length) >= tokens, jnp.int32)
    segment_ids = splash.SegmentIds(q=ids, kv=ids)
  out = jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=segment_ids))(q, k, v)
  return out[:, :, :tokens].astype(v.dtype)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = False, *,
                      interpret: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v on (batch, heads, tokens, head_dim) arrays with splash."""
  check_shape(q)
  if not interpret and jax.default_backend() != 'tpu' and not _lowering_for_tpu():
    raise ValueError(f"{OPTION}='splash' is a TPU kernel and this runs on "
                     f"{jax.default_backend()}; use {OPTION}='xla' (or 'cudnn' on GPU).")
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return _local(q, k, v, causal, interpret)
  spec = sharding.fit_spec(P(*nn.logical_to_mesh_axes(LOGICAL_AXES)), q.shape, mesh)
  if spec[2] is not None:
    raise ValueError(f"{OPTION}='splash' needs whole sequences on each device, but the logical "
                     f"axis rules shard 'act_seq' (tokens) over {spec[2]!r}; map 'act_seq' to "
                     f"None in mesh.rules or use {OPTION}='xla'.")
  local = jax.shard_map(lambda a, b, c: _local(a, b, c, causal, interpret), mesh=mesh,
                        in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
  return local(q, k, v)


def _lowering_for_tpu() -> bool:
  """True while tracing under a mesh of TPU devices that are not the default backend's (a
  compile-only TPU topology on a CPU host)."""
  device = getattr(jax.sharding.get_abstract_mesh(), 'abstract_device', None)
  return getattr(device, 'platform', None) == 'tpu'
