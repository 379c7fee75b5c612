"""The DINOv3-style vision encoder (the VTP trunk) with its bias-free latent bottleneck (spec 1.3).

Tokens are [CLS, registers, patches]; position comes from 2-D RoPE only. The encoder returns the
final-normed CLS and patch tokens at full width, optionally their 64-d bottleneck projections (the
latents), and optionally the normed outputs of the last n blocks (`get_intermediate_layers`).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtp_jax.models import layers
from vtp_jax.models import rope as rope_lib


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  block: layers.BlockSpec
  depth: int
  patch_size: int = 16
  n_registers: int = 0
  bottleneck_dim: int = 64
  rope: rope_lib.RopeSpec | None = None
  scan: bool = True
  remat_policy: str = 'none'


def patch_embed_init(patch_size: int):
  """PyTorch's default Conv2d init, U(+-1/sqrt(3 p^2)), for weight and bias (spec 1.13)."""
  bound = (3 * patch_size * patch_size) ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class VisionEncoder(nn.Module):
  """Images (B, H, W, 3) in model space -> dict of normed tokens (and latents, intermediates).

  Call arguments:
    mask: optional bool (B, h*w); True patches are replaced by the mask token (iBOT student).
    drop_rate: per-path stochastic-depth rate of this forward (0 at eval and for the teacher).
    train: enables the RoPE coordinate augmentation (draws from the 'rope' rng stream).
    use_bottleneck: also return the 64-d latents of the normed tokens.
    n_intermediate: also return the normed outputs of the last n blocks.
  """
  spec: EncoderSpec

  @nn.compact
  def __call__(self, images, mask=None, drop_rate: float = 0.0, train: bool = False,
               use_bottleneck: bool = False, n_intermediate: int = 0):
    s, b = self.spec, self.spec.block
    dtype = layers.dtype_of(b.dtype)
    p = s.patch_size
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be (B, H, W, 3) channels-last, got shape {images.shape}.')
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f'image size {images.shape[1:3]} must be a multiple of the patch size {p}.')
    init = patch_embed_init(p)
    x = nn.Conv(b.width, (p, p), strides=(p, p), padding='VALID', dtype=dtype,
                param_dtype=jnp.float32, name='patch_embed',
                kernel_init=layers.param_with_axes(init, ('patch_h', 'patch_w', 'rgb', 'embed')),
                bias_init=layers.param_with_axes(init, ('embed',)))(images.astype(dtype))
    bsz, h, w, _ = x.shape
    x = x.reshape(bsz, h * w, b.width)

    token_init = layers.param_with_axes(nn.initializers.normal(0.02), ('norm',))
    cls_token = self.param('cls_token', token_init, (b.width,))
    mask_token = self.param('mask_token', layers.param_with_axes(layers.ZEROS, ('norm',)),
                            (b.width,))
    if mask is not None:
      if mask.shape != (bsz, h * w):
        raise ValueError(f'mask must be (B, h*w) = {(bsz, h * w)}, got {mask.shape}.')
      x = jnp.where(mask[..., None], mask_token.astype(dtype), x)
    prefix = [jnp.broadcast_to(cls_token.astype(dtype), (bsz, 1, b.width))]
    if s.n_registers:
      registers = self.param(
          'registers', layers.param_with_axes(nn.initializers.normal(0.02), ('registers', 'norm')),
          (s.n_registers, b.width))
      prefix.append(jnp.broadcast_to(registers.astype(dtype), (bsz, s.n_registers, b.width)))
    x = jnp.concatenate(prefix + [x], axis=1)
    x = nn.with_logical_constraint(x, ('act_batch', 'act_seq', 'act_embed'))

    rope_rng = self.make_rng('rope') if (train and s.rope and s.rope.augmented) else None
    sin, cos = rope_lib.rope_tables(s.rope, h, w, rope_rng) if s.rope else (None, None)
    x, outputs = layers.run_blocks(b, s.depth, x, sin, cos, scan=s.scan,
                                   remat_policy=s.remat_policy, drop_rate=drop_rate,
                                   keep_outputs=n_intermediate > 0)

    norm = layers.make_norm(b.norm, b.norm_eps, 'norm')
    n_prefix = 1 + s.n_registers
    normed = norm(x)
    out = {'cls': normed[:, 0], 'patches': normed[:, n_prefix:], 'grid': (h, w)}
    if use_bottleneck:
      bottleneck = layers.dense(s.bottleneck_dim, 'embed', 'latent', 'bottleneck', dtype,
                                use_bias=False)
      out['latent_cls'] = bottleneck(normed[:, 0])
      out['latent_patches'] = bottleneck(normed[:, n_prefix:])
    if n_intermediate:
      if n_intermediate > s.depth:
        raise ValueError(f'n_intermediate={n_intermediate} exceeds the encoder depth {s.depth}.')
      picked = norm(outputs[s.depth - n_intermediate:])
      out['intermediate'] = [(picked[i, :, n_prefix:], picked[i, :, 0])
                             for i in range(n_intermediate)]
    return out
