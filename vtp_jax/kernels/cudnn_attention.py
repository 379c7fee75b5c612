"""`precision.attention='cudnn'` (and 'jax'): `jax.nn.dot_product_attention` on tokens-first
(batch, tokens, heads, head_dim) arrays.

'cudnn' asks for cuDNN's fused flash-attention kernel (NVIDIA GPUs, float16/bfloat16; jax raises
where cuDNN cannot serve the call, e.g. on CPU or in float32); 'jax' lets the function pick its
own XLA path, which runs anywhere and is the numerical reference the two share.
"""

import jax

IMPLEMENTATIONS = (None, 'xla', 'cudnn')


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = False,
                      implementation: str | None = 'cudnn') -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v through jax.nn.dot_product_attention."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'implementation={implementation!r}; use one of {IMPLEMENTATIONS}.')
  try:
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
  except (RuntimeError, ValueError, NotImplementedError) as e:
    if implementation != 'cudnn':
      raise
    raise ValueError(f"precision.attention='cudnn' cannot serve q {q.shape} {q.dtype} on "
                     f'{jax.default_backend()}: {e}. cuDNN attention needs an NVIDIA GPU and '
                     "float16/bfloat16; use precision.attention='xla' elsewhere.") from e
