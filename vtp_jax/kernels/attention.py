"""`precision.attention`: the one entry point the model calls for softmax attention.

Every backend computes softmax(q k^T / sqrt(head_dim)) v with float32 scores and the same
parameters; they differ in where and how fast. Two array layouts exist: 'xla', 'cpu' and 'splash'
take heads-first (batch, heads, tokens, head_dim) arrays, which spare XLA the transposes around the
attention matmuls; 'cudnn' and 'jax' take jax.nn.dot_product_attention's tokens-first
(batch, tokens, heads, head_dim). `heads_first` tells the caller which to build.
"""

import jax

OPTION = 'precision.attention'
BACKENDS = {
    'xla': "our XLA kernel with FlashAttention's backward identity (kernels/xla_attention.py)",
    'cpu': 'a compiled float32 XLA:CPU kernel (kernels/cpu_attention.py)',
    'cudnn': "cuDNN's fused GPU kernel, jax.nn.dot_product_attention (kernels/cudnn_attention.py)",
    'jax': "jax.nn.dot_product_attention's own XLA path (kernels/cudnn_attention.py)",
    'splash': 'the TPU splash attention Pallas kernel (kernels/splash_attention.py)',
}
_HEADS_FIRST = ('xla', 'cpu', 'splash')


def check(backend: str) -> None:
  if backend not in BACKENDS:
    choices = '; '.join(f'{name!r}: {what}' for name, what in BACKENDS.items())
    raise ValueError(f'{OPTION}={backend!r} is not a backend; use one of {choices}.')


def heads_first(backend: str) -> bool:
  """Whether `backend` takes (batch, heads, tokens, head_dim) rather than (batch, tokens, ...)."""
  check(backend)
  return backend in _HEADS_FIRST


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                      backend: str) -> jax.Array:
  """Attention of q, k, v in `backend`'s layout (see `heads_first`), output in the same layout."""
  check(backend)
  # Imported on use: the 'cpu' backend builds C++ and 'splash' pulls in Pallas, neither of which the
  # default path should pay for.
  if backend == 'xla':
    from vtp_jax.kernels import xla_attention
    return xla_attention.softmax_attention(q, k, v, causal)
  if backend == 'cpu':
    from vtp_jax.kernels import cpu_attention
    return cpu_attention.softmax_attention(q, k, v, causal)
  if backend == 'splash':
    from vtp_jax.kernels import splash_attention
    return splash_attention.softmax_attention(q, k, v, causal)
  from vtp_jax.kernels import cudnn_attention
  return cudnn_attention.softmax_attention(q, k, v, causal,
                                           implementation='cudnn' if backend == 'cudnn' else None)
