"""`precision.attention='cudnn'` (and 'jax'): `jax.nn.dot_product_attention` on tokens-first
(batch, tokens, heads, head_dim) arrays.

'cudnn' asks for cuDNN's fused flash-attention kernel (NVIDIA GPUs, float16/bfloat16; jax raises
where cuDNN cannot serve the call, e.g. on CPU or in float32); 'jax' lets the function pick its
own XLA path, which runs anywhere and is the numerical reference the two share.

`unsupported` states, for `precision.attention='auto'` (kernels/attention.py), which calls cuDNN
takes, as jax 0.10's own checks do (jax/_src/cudnn/fused_attention_stablehlo.py: `check_layout`,
`check_is_flash_attention`, and the partitioner's sharding rules), so that 'auto' never picks a
call jax would refuse.
"""

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = (None, 'xla', 'cudnn')
DTYPES = ('bfloat16', 'float16')  # check_layout: Q must be fp16/bf16 (or fp8, which we never pass)
HEAD_DIM_MULTIPLE = 8  # check_is_flash_attention: "head dim must be <= H_max and a multiple of 8"
# H_max: 256 on Hopper (compute capability 9.0) and later, 128 before. jax reads the capability
# from the default backend's first GPU, so a GPU program compiled on a CPU host (bench.aot) gets
# 128 whatever the target.
MAX_HEAD_DIM, MAX_HEAD_DIM_HOPPER = 128, 256
# cuDNN's fused flash attention (fprop and bprop) runs on Ampere (8.0) and later (cuDNN developer
# guide, "Fused Flash Attention"); jax does not check this itself, cuDNN fails when compiling.
MIN_COMPUTE_CAPABILITY = (8, 0)


def _capability(text: str | None) -> tuple[int, ...] | None:
  return None if not text else tuple(int(x) for x in str(text).split('.'))


def unsupported(*, head_dim: int, dtype: str, seq_sharded: bool, device_kind: str,
                compute_capability: str | None = None) -> str | None:
  """Why cuDNN's fused attention cannot take this call on a GPU, or None if it can.

  Sequence length and causal masks need no check: `softmax_attention` pads odd lengths to the
  even ones jax's cuDNN training path takes, and cuDNN has a causal mask type.
  """
  if 'nvidia' not in device_kind.lower():
    return f'{device_kind or "this GPU"} is not an NVIDIA GPU (cuDNN is NVIDIA-only)'
  capability = _capability(compute_capability)
  if capability is not None and capability < MIN_COMPUTE_CAPABILITY:
    return (f'compute capability {compute_capability} is below the 8.0 (Ampere) that cuDNN '
            'flash attention needs')
  if dtype not in DTYPES:
    return f'cuDNN attention takes float16/bfloat16, not {dtype}'
  hopper = capability is not None and capability >= (9, 0)
  limit = MAX_HEAD_DIM_HOPPER if hopper else MAX_HEAD_DIM
  if head_dim % HEAD_DIM_MULTIPLE or head_dim > limit:
    return (f'head dim {head_dim} is not a multiple of {HEAD_DIM_MULTIPLE} up to {limit}'
            + ('' if hopper else '; jax allows 256 only when it compiles on a Hopper GPU'))
  if seq_sharded:
    return "the token axis is sharded (jax's cuDNN partitioner refuses a sharded sequence)"
  return None


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = False,
                      implementation: str | None = 'cudnn', pad_odd: bool | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v through jax.nn.dot_product_attention.

  An odd token count (VTP's CLS + patches: 197, 257; the text tower's 77) is padded by one token
  that the sequence lengths mask out as a key, and sliced off the output, for 'cudnn' (or when
  `pad_odd` says so): jax 0.10's cuDNN training path passes a bias placeholder to its own
  check_is_flash_attention, which then refuses odd lengths ("Unsupported sequence length").
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'implementation={implementation!r}; use one of {IMPLEMENTATIONS}.')
  tokens = q.shape[1]
  pad = (implementation == 'cudnn' if pad_odd is None else pad_odd) and tokens % 2 == 1
  kwargs = {}
  if pad:
    widths = [(0, 0), (0, 1), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    lengths = jnp.full((q.shape[0],), tokens, jnp.int32)
    kwargs = dict(query_seq_lengths=lengths, key_value_seq_lengths=lengths)
  try:
    out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation,
                                       **kwargs)
  except (RuntimeError, ValueError, NotImplementedError) as e:
    if implementation != 'cudnn':
      raise
    raise ValueError(f"precision.attention='cudnn' cannot serve q {q.shape} {q.dtype} on "
                     f'{jax.default_backend()}: {e}. cuDNN attention needs an NVIDIA GPU and '
                     "float16/bfloat16; use precision.attention='xla' elsewhere.") from e
  return out[:, :tokens] if pad else out
