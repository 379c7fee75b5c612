"""Axial 2-D rotary position embedding, exactly as the VTP/DINOv3 reference computes it (spec 1.4).

The reference builds its tables in bfloat16 and rounds after every operation, and rotates q and k in
bfloat16. Weight parity with released checkpoints depends on that rounding (an exact float32 table
differs by up to 1.6e-2), so `rope_dtype='bfloat16'` reproduces it op by op, while `'float32'` is the
clean variant for new runs. Tables without training-time augmentation are built once on the host in
NumPy (ml_dtypes rounds each op to bfloat16 the way PyTorch does); the augmented ones (shift, jitter,
rescale) are drawn per call under jit.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

NORMALIZE_MODES = ('separate', 'min', 'max')


@dataclasses.dataclass(frozen=True)
class RopeSpec:
  """Static RoPE settings of one tower (hashable, so modules can hold it)."""
  head_dim: int
  base: float = 100.0  # > 0: periods base**(2i/(head_dim/2)); 0: use min/max periods
  min_period: float = 0.0
  max_period: float = 0.0
  normalize_coords: str = 'separate'
  shift: float = 0.0
  jitter: float = 0.0
  rescale: float = 0.0
  dtype: str = 'bfloat16'  # 'bfloat16' (reference numerics) or 'float32'

  def __post_init__(self):
    if self.head_dim % 4:
      raise ValueError(f'RoPE needs head_dim divisible by 4, got {self.head_dim}; '
                       'change model width or heads.')
    if self.normalize_coords not in NORMALIZE_MODES:
      raise ValueError(f'model.rope.normalize_coords={self.normalize_coords!r}; '
                       f'use one of {NORMALIZE_MODES}.')
    if self.dtype not in ('bfloat16', 'float32'):
      raise ValueError(f"precision.rope_dtype={self.dtype!r}; use 'bfloat16' or 'float32'.")
    if self.base <= 0 and not (0 < self.min_period < self.max_period):
      raise ValueError('model.rope: set base > 0, or base = 0 with 0 < min_period < max_period.')

  @property
  def augmented(self) -> bool:
    return bool(self.shift or self.jitter or self.rescale)


def _rounder(dtype: str):
  """Returns f(x) that rounds float32 values to the table dtype, as each reference op does."""
  if dtype == 'bfloat16':
    return lambda x: np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
  return lambda x: np.asarray(x, np.float32)


def periods(spec: RopeSpec) -> np.ndarray:
  """The (head_dim/4,) periods buffer, in the op order of the reference (float32 values)."""
  r = _rounder(spec.dtype)
  n = spec.head_dim // 4
  if spec.base > 0:
    exponent = r(r(2 * r(np.arange(n))) / (spec.head_dim // 2))
    return r(np.float32(spec.base) ** exponent)
  ratio = spec.max_period / spec.min_period
  exponent = r(np.linspace(0, 1, n, dtype=np.float32))
  p = r(np.float32(ratio) ** exponent)
  return r(r(p / np.float32(ratio)) * np.float32(spec.max_period))


def _base_coords(spec: RopeSpec, h: int, w: int, r):
  """(h*w, 2) coordinates in (-1, 1), row then column, rounded like the reference."""
  if spec.normalize_coords == 'separate':
    div_h, div_w = h, w
  elif spec.normalize_coords == 'min':
    div_h = div_w = min(h, w)
  else:
    div_h = div_w = max(h, w)
  ch = r(r(np.arange(0.5, h)) / np.float32(div_h))
  cw = r(r(np.arange(0.5, w)) / np.float32(div_w))
  coords = np.stack(np.meshgrid(ch, cw, indexing='ij'), axis=-1).reshape(h * w, 2)
  return r(r(2.0 * coords) - np.float32(1.0))


def sincos_table(spec: RopeSpec, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  """Un-augmented (sin, cos), each (h*w, head_dim) float32 holding values of the table dtype."""
  r = _rounder(spec.dtype)
  coords = _base_coords(spec, h, w, r)
  angles = r(r(np.float32(2 * math.pi) * coords[:, :, None]) / periods(spec)[None, None, :])
  angles = np.tile(angles.reshape(h * w, -1), (1, 2))
  return r(np.sin(angles)), r(np.cos(angles))


def _round_jnp(dtype: str):
  if dtype == 'bfloat16':
    return lambda x: jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)
  return lambda x: x


def augmented_sincos(spec: RopeSpec, h: int, w: int, rng: jax.Array):
  """Training-time table with DINOv3's coordinate shift, jitter and rescale, drawn from `rng`."""
  r = _round_jnp(spec.dtype)
  coords = jnp.asarray(_base_coords(spec, h, w, _rounder(spec.dtype)))
  k_shift, k_jitter, k_rescale = jax.random.split(rng, 3)
  if spec.shift:
    coords = r(coords + r(jax.random.uniform(k_shift, (2,), minval=-spec.shift, maxval=spec.shift)))
  if spec.jitter:
    lim = math.log(spec.jitter)
    coords = r(coords * r(jnp.exp(jax.random.uniform(k_jitter, (2,), minval=-lim, maxval=lim))))
  if spec.rescale:
    lim = math.log(spec.rescale)
    coords = r(coords * r(jnp.exp(jax.random.uniform(k_rescale, (1,), minval=-lim, maxval=lim))))
  angles = r(r(np.float32(2 * math.pi) * coords[:, :, None]) / jnp.asarray(periods(spec)))
  angles = jnp.tile(angles.reshape(h * w, -1), (1, 2))
  return r(jnp.sin(angles)), r(jnp.cos(angles))


def rope_tables(spec: RopeSpec, h: int, w: int, rng: jax.Array | None = None):
  """(sin, cos) for an h x w patch grid; augmented only when `rng` is given and augmentation is on."""
  if rng is not None and spec.augmented:
    return augmented_sincos(spec, h, w, rng)
  sin, cos = sincos_table(spec, h, w)
  return jnp.asarray(sin), jnp.asarray(cos)


def _rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array, dtype: str,
               token_axis: int = 1) -> jax.Array:
  """Rotates the last len(sin) tokens of x (tokens on `token_axis`, head_dim last: (B, N, heads,
  head_dim) by default, (B, heads, N, head_dim) with token_axis=2); earlier (prefix) tokens pass.
  In 'bfloat16' mode the whole of x (prefix included) round-trips through bfloat16, and every
  multiply and add is rounded to bfloat16, as the reference does; XLA would otherwise keep excess
  precision inside the fused elementwise chain.

  The prefix tokens (CLS, registers) get table rows cos = 1, sin = 0, which leave them as they are
  (x * 1 + rotate_half(x) * 0 = x), so the rotation is one elementwise pass over every token:
  splitting the prefix off and concatenating it back made XLA write each piece out in float32.
  """
  r = _round_jnp(dtype)
  out_dtype = x.dtype
  n_prefix = x.shape[token_axis] - sin.shape[0]
  if n_prefix:
    sin = jnp.concatenate([jnp.zeros((n_prefix,) + sin.shape[1:], sin.dtype), sin])
    cos = jnp.concatenate([jnp.ones((n_prefix,) + cos.shape[1:], cos.dtype), cos])
  # (tokens, head_dim) tables broadcast against x: singleton axes everywhere else.
  table_shape = [1] * x.ndim
  table_shape[token_axis], table_shape[-1] = sin.shape
  sin = sin.reshape(table_shape).astype(jnp.float32)
  cos = cos.reshape(table_shape).astype(jnp.float32)
  # Rotating the halves is exact in any dtype, so it runs on x as given (bfloat16 in training) and
  # only the products go through float32: rotating a float32 copy made XLA write that copy out.
  def f32(v):
    return r(v.astype(jnp.float32))
  return r(r(f32(x) * cos) + r(f32(_rotate_half(x)) * sin)).astype(out_dtype)
