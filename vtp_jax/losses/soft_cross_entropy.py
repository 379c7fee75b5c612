"""The soft-target cross-entropy of the DINO and iBOT losses, fused by a custom VJP.

  ce(s, t) = -sum_k t_k log_softmax(s / T)_k = sum(t) logsumexp(s / T) - sum_k t_k s_k / T
  d ce / d s = (sum(t) softmax(s / T) - t) / T

With 65,536 prototypes the student logits are the largest arrays of the step. Written as
`log_softmax(f32(s) / T)` then a product and a sum, autodiff saves a float32 (rows, K) log-softmax
for the backward, and whether XLA fuses such temporaries away depends on the program around the
loss; here the structure is fixed by the custom VJP whatever XLA decides. The forward is row
reductions over the logits in their own dtype (often bfloat16), converted to float32 inside the
reduction: a max, then one multi-output pass for the shifted log-sum-exp, the dot with t and sum(t).
The residuals are the logits and targets as given (no copies) and three float32 numbers per row; the
backward is one elementwise pass that writes the cotangent in the logits' dtype.

Every sum is taken relative to the row max, as `jax.nn.log_softmax` does, so the rounding is the
plain formula's: no difference of two numbers of size max(s) / T (~100 at T = 0.1) is formed.

Not chunked over rows: nothing of shape (rows, K) is written but the cotangent the caller needs (a
compile for TPU v5e at rows = 1024, K = 65,536 allocates no temporaries), so a scan over row blocks
would lower no peak, and it would serialise a row axis that GSPMD shards.

Rows whose cotangent is 0 (the iBOT buffer's padding, excluded by a `where` after this function)
get an exact 0 gradient even when their logits or targets are not finite.
"""

import jax
import jax.numpy as jnp


def soft_cross_entropy(logits: jax.Array, targets: jax.Array, temp) -> jax.Array:
  """Per row (all leading axes) -sum_k targets_k log_softmax(logits / temp)_k, in float32.

  Args:
    logits: (..., K) student logits, any float dtype; the gradient comes back in that dtype.
    targets: (..., K) target weights (teacher probabilities); rows need not sum to 1.
    temp: the temperature T, a scalar (Python float or traced).

  Returns:
    (...) float32 per-row cross-entropies. Gradients are exact for all three arguments; the one for
    `targets` (-log_softmax) and `temp` cost nothing when unused (stop_gradient): XLA drops them.
  """
  if targets.shape != logits.shape:
    raise ValueError(f'targets {targets.shape} must match logits {logits.shape}.')
  # A float32 scalar primal, so the custom VJP's temperature cotangent always has that type; autodiff
  # through this conversion casts it back to whatever the caller passed.
  return _fused(logits, targets, jnp.asarray(temp, jnp.float32))


def _shifted(logits, temp, row_max):
  # An expression, not a saved array: on TPU XLA fuses it into each reduction and into the backward's
  # elementwise pass (XLA:CPU may keep one float32 copy for the forward; memory is no issue there).
  return logits.astype(jnp.float32) / temp - row_max[..., None]


@jax.custom_vjp
def _fused(logits, targets, temp):
  return _forward(logits, targets, temp)[0]


def _forward(logits, targets, temp):
  row_max = jnp.max(logits.astype(jnp.float32) / temp, axis=-1)
  shifted = _shifted(logits, temp, row_max)
  t = targets.astype(jnp.float32)
  log_sum = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))  # logsumexp(s / T) - row_max, in [0, log K]
  t_sum = jnp.sum(t, axis=-1)
  value = t_sum * log_sum - jnp.sum(t * shifted, axis=-1)
  # The log-sum-exp stays split (row_max, log_sum): the backward's exponent (z - max) - log_sum is then
  # exact near the max, where z - logsumexp would carry the rounding of a number of size max(z).
  return value, (logits, targets, temp, row_max, log_sum, t_sum)


def _backward(residuals, cotangent):
  logits, targets, temp, row_max, log_sum, t_sum = residuals
  shifted = _shifted(logits, temp, row_max)
  t = targets.astype(jnp.float32)
  # Padding rows (cotangent 0) get 0 whatever their logits hold: 0 * nan would be nan.
  live = (cotangent != 0)[..., None]
  cot = cotangent[..., None]
  d_shifted = jnp.where(live, cot * (t_sum[..., None] * jnp.exp(shifted - log_sum[..., None]) - t),
                        0.0)
  d_logits = d_shifted / temp
  # d ce / d t_k = -log_softmax_k; d ce / d T = -sum_k (d ce / d z_k) z_k / T with z = s / T.
  d_targets = jnp.where(live, cot * (log_sum[..., None] - shifted), 0.0)
  d_temp = -jnp.sum(jnp.where(live, d_shifted * logits.astype(jnp.float32), 0.0)) / (temp * temp)
  return d_logits.astype(logits.dtype), d_targets.astype(targets.dtype), d_temp


_fused.defvjp(_forward, _backward)
