"""`precision.dense`: how the transformer blocks' linear layers contract inputs with kernels.

'xla' is jnp (XLA's own dot, any platform, any dtype); 'cpu' is a compiled float32 BLAS matmul
(kernels/cpu_dense.py). The parameters are the same either way.
"""

import jax
import jax.numpy as jnp

OPTION = 'precision.dense'
BACKENDS = {
    'xla': "XLA's own dot (jnp)",
    'cpu': 'a compiled float32 BLAS matmul for XLA:CPU (kernels/cpu_dense.py)',
}


def check(backend: str) -> None:
  if backend not in BACKENDS:
    choices = '; '.join(f'{name!r}: {what}' for name, what in BACKENDS.items())
    raise ValueError(f'{OPTION}={backend!r} is not a backend; use one of {choices}.')


def dot_general(backend: str):
  """The `dot_general` a flax nn.Dense should use, or None for Flax's own."""
  check(backend)
  if backend == 'xla':
    return None
  from vtp_jax.kernels import cpu_dense  # on use: builds C++ the default path never needs
  return cpu_dense.dot_general


def contract(x: jax.Array, kernel: jax.Array, in_ndim: int, equation: str | None, *,
             backend: str) -> jax.Array:
  """x's last `in_ndim` axes against the kernel's first ones, or `equation` when given."""
  check(backend)
  if backend == 'cpu':
    from vtp_jax.kernels import cpu_dense  # as above
    return (cpu_dense.einsum(equation, x, kernel, in_ndim) if equation
            else cpu_dense.matmul(x, kernel, in_ndim))
  if equation:
    return jnp.einsum(equation, x, kernel)
  return jnp.tensordot(x, kernel, axes=in_ndim)
