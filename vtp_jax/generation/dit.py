"""LightningDiT (hustvl/LightningDiT, models/lightningdit.py) in Flax: the velocity network of the
downstream generator (spec 4.1 "Generation": LightningDiT-XL/1 or B/1 over 64-channel latents).

    latents (B, h, w, C) -> patchify (p x p) -> linear -> + fixed 2-D sin-cos position embedding
    c = MLP(sinusoid(t)) + class_embedding(y)        (row `num_classes` is the null class of CFG)
    depth x adaLN-Zero block:  x += g1 * attn(modulate(RMSNorm x, s1, b1))   (2-D RoPE on q, k)
                               x += g2 * SwiGLU(modulate(RMSNorm x, s2, b2))
    final: modulate(RMSNorm x) -> linear (zero-initialised) -> unpatchify -> velocity (B, h, w, C)

where modulate(x, shift, scale) = x (1 + scale) + shift and (shift, scale, gate) come from
SiLU(c) -> linear (zero-initialised), so every block is the identity at init (adaLN-Zero).
Initialisation follows LightningDiT: xavier-uniform linears, zero biases, timestep MLP N(0, 0.02),
class table N(0, 0.02), adaLN and output layers zero.

RoPE: LightningDiT (EVA's VisionRotaryEmbeddingFast) rotates interleaved feature pairs; we rotate
the pair (i, i + head_dim/2), the layout `models/rope.py` applies, with the same angles: for a
token at grid row r, column c, the first head_dim/4 pairs turn by r * theta^(-4j/head_dim) and the
next head_dim/4 by c * theta^(-4j/head_dim), j = 0 .. head_dim/4 - 1. The two layouts differ by a
fixed permutation of q and k features, which the qkv weights absorb (the function class is the
same; importing LightningDiT weights would permute those columns).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vtp_jax.models import layers

param_with_axes = layers.param_with_axes
ZEROS = layers.ZEROS


def block_spec(config) -> layers.BlockSpec:
  d, p = config.dit, config.precision
  return layers.BlockSpec(
      width=d.width, heads=d.heads, mlp='swiglu', mlp_ratio=d.mlp_ratio, norm='rmsnorm',
      norm_eps=d.norm_eps, qkv_bias=True, qk_norm=d.qk_norm, layerscale=0.0,
      dtype=p.compute_dtype, rope_dtype='float32', attention=p.attention, dense=p.dense,
      init='xavier')


def xavier_uniform(fan_in: int, fan_out: int):
  bound = math.sqrt(6.0 / (fan_in + fan_out))
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def rope_tables(grid: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
  """(sin, cos), each (grid^2, head_dim), of LightningDiT's 2-D RoPE in the split-half layout."""
  if head_dim % 4:
    raise ValueError(f'dit.width / dit.heads = {head_dim} must be divisible by 4 for 2-D RoPE.')
  quarter = head_dim // 4
  freqs = 1.0 / theta ** (np.arange(0, head_dim // 2, 2, dtype=np.float64) / (head_dim // 2))
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing='ij')
  angles = np.concatenate([rows.reshape(-1, 1) * freqs[:quarter],
                           cols.reshape(-1, 1) * freqs[:quarter]], axis=1)
  angles = np.tile(angles, (1, 2))
  return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def sincos_pos_embed(width: int, grid: int) -> np.ndarray:
  """(grid^2, width) fixed 2-D sin-cos embedding (MAE/DiT): first half from the column index
  (DiT's meshgrid puts w first), second half from the row index; each half [sin, cos]."""
  if width % 4:
    raise ValueError(f'dit.width={width} must be divisible by 4 (2-D sin-cos embedding).')
  omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4))
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing='ij')

  def one_axis(pos):
    out = pos.reshape(-1, 1).astype(np.float64) * omega
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """[cos(t f), sin(t f)], f_i = max_period^(-i / (dim/2)); t in [0, 1], as LightningDiT feeds it."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def modulate(x, shift, scale):
  out = x * (1 + scale[:, None, :])
  return out if shift is None else out + shift[:, None, :]


class Modulation(nn.Module):
  """SiLU(c) -> n vectors of width D (the adaLN-Zero linear, zero-initialised)."""
  n: int
  width: int
  dtype: object

  @nn.compact
  def __call__(self, c):
    out = layers.DenseND((self.n, self.width), 1, ('embed', None, 'modulation'),
                         (None, 'modulation'), self.dtype, ZEROS, name='adaLN')(nn.silu(c))
    return [out[:, i] for i in range(self.n)]


class DiTBlock(nn.Module):
  """adaLN-Zero block; returns (x, None) so it can be an nn.scan body."""
  spec: layers.BlockSpec
  wo_shift: bool = False

  @nn.compact
  def __call__(self, x, c, sin, cos):
    s, dtype = self.spec, layers.dtype_of(self.spec.dtype)
    if self.wo_shift:
      scale1, gate1, scale2, gate2 = Modulation(4, s.width, dtype, name='modulation')(c)
      shift1 = shift2 = None
    else:
      shift1, scale1, gate1, shift2, scale2, gate2 = Modulation(6, s.width, dtype,
                                                                name='modulation')(c)
    norm1 = layers.RMSNorm(eps=s.norm_eps, name='norm1')
    norm2 = layers.RMSNorm(eps=s.norm_eps, name='norm2')
    h = layers.Attention(s, name='attn')(modulate(norm1(x), shift1, scale1), sin, cos)
    x = x + gate1[:, None, :] * h
    h = layers.Mlp(s, name='mlp')(modulate(norm2(x), shift2, scale2))
    x = x + gate2[:, None, :] * h
    x = nn.with_logical_constraint(x, ('act_batch', 'act_seq', 'act_embed'))
    return x, None


class LightningDiT(nn.Module):
  """v = model(x_t (B, h, w, C), t (B,) in [0, 1], y (B,) int in [0, num_classes]); y ==
  num_classes is the null (unconditional) class."""
  input_size: int
  in_channels: int
  patch_size: int
  depth: int
  spec: layers.BlockSpec
  num_classes: int
  class_dropout: float
  wo_shift: bool
  rope_base: float
  timestep_freqs: int
  scan: bool = False
  remat_policy: str = 'none'

  @nn.compact
  def __call__(self, x, t, y):
    s, p = self.spec, self.patch_size
    dtype = layers.dtype_of(s.dtype)
    b, h, w, ch = x.shape
    if (h, w, ch) != (self.input_size, self.input_size, self.in_channels):
      raise ValueError(f'latents of shape {x.shape[1:]} do not match dit.input_size='
                       f'{self.input_size} and dit.in_channels={self.in_channels}.')
    grid = h // p
    tokens = x.reshape(b, grid, p, grid, p, ch).transpose(0, 1, 3, 2, 4, 5)
    tokens = tokens.reshape(b, grid * grid, p * p * ch)
    tokens = layers.dense(s.width, 'latent_channels', 'embed', 'x_embedder', dtype,
                          init=xavier_uniform(p * p * ch, s.width))(tokens)
    # Fixed tables stay NumPy constants of the program: nothing is placed on a device to build
    # them, so abstract init and ahead-of-time lowering run nothing (train/state.py's rule).
    tokens = tokens + sincos_pos_embed(s.width, grid).astype(dtype)[None]
    tokens = nn.with_logical_constraint(tokens, ('act_batch', 'act_seq', 'act_embed'))

    normal = nn.initializers.normal(0.02)
    t_freq = timestep_embedding(t, self.timestep_freqs).astype(dtype)
    c = layers.dense(s.width, 'timestep_freq', 'embed', 't_embedder_0', dtype, init=normal)(t_freq)
    c = layers.dense(s.width, 'embed', 'mlp', 't_embedder_2', dtype, init=normal)(nn.silu(c))
    table_rows = self.num_classes + (1 if self.class_dropout > 0 else 0)
    table = self.param('y_embedder', param_with_axes(normal, ('classes', 'embed')),
                       (table_rows, s.width), jnp.float32)
    c = c + jnp.take(table, y, axis=0).astype(dtype)
    c = nn.with_logical_constraint(c, ('act_batch', 'act_embed'))  # (B, D), one vector an example

    sin, cos = rope_tables(grid, s.head_dim, self.rope_base)
    block = DiTBlock
    if self.remat_policy != 'none':
      block = nn.remat(DiTBlock, policy=layers.REMAT_POLICIES[self.remat_policy],
                       prevent_cse=not self.scan)
    if self.scan:
      stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=self.depth,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      tokens, _ = stack(s, self.wo_shift, name='blocks')(tokens, c, sin, cos)
    else:
      for i in range(self.depth):
        tokens, _ = block(s, self.wo_shift, name=f'blocks_{i}')(tokens, c, sin, cos)

    shift, scale = Modulation(2, s.width, dtype, name='final_modulation')(c)
    tokens = modulate(layers.RMSNorm(eps=s.norm_eps, name='final_norm')(tokens), shift, scale)
    out = layers.dense(p * p * ch, 'embed', 'latent_channels', 'final_linear', dtype,
                       init=ZEROS)(tokens)
    out = out.reshape(b, grid, grid, p, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, ch)
    return out.astype(jnp.float32)


def build(config) -> LightningDiT:
  d = config.dit
  if d.input_size % d.patch_size:
    raise ValueError(f'dit.input_size={d.input_size} is not a multiple of dit.patch_size='
                     f'{d.patch_size}.')
  if config.precision.remat_policy not in layers.REMAT_POLICIES:
    raise ValueError(f'precision.remat_policy={config.precision.remat_policy!r}; use one of '
                     f'{sorted(layers.REMAT_POLICIES)}.')
  return LightningDiT(
      input_size=d.input_size, in_channels=d.in_channels, patch_size=d.patch_size, depth=d.depth,
      spec=block_spec(config), num_classes=d.num_classes, class_dropout=d.class_dropout,
      wo_shift=d.wo_shift, rope_base=d.rope_base, timestep_freqs=d.timestep_freqs,
      scan=config.precision.scan_layers, remat_policy=config.precision.remat_policy)


def init_inputs(config, batch: int = 1):
  d = config.dit
  return (jnp.zeros((batch, d.input_size, d.input_size, d.in_channels), jnp.float32),
          jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.int32))


def param_count(config) -> int:
  """Parameters of the generator, from shapes alone (jax.eval_shape: nothing is allocated)."""
  model = build(config)
  shapes = jax.eval_shape(lambda k: model.init({'params': k}, *init_inputs(config))['params'],
                          jax.eval_shape(jax.random.key, 0))
  shapes = jax.tree.map(lambda x: x.unbox() if isinstance(x, nn.Partitioned) else x, shapes,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))
