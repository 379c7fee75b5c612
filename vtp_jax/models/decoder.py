"""The pixel decoder: 64-d latents (B, h, w, 64) -> images (B, 16h, 16w, 3) in model space (spec 1.7).

1x1 projection in, RoPE ViT blocks without a CLS token, LayerNorm, 1x1 projection to 3*16*16
channels, then a pixel shuffle in PyTorch's channel order (c, i, j), which is not `depth_to_space`.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from vtp_jax.models import layers
from vtp_jax.models import rope as rope_lib


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
  block: layers.BlockSpec
  depth: int
  patch_size: int = 16
  rope: rope_lib.RopeSpec | None = None
  scan: bool = True
  remat_policy: str = 'none'


def pixel_shuffle(x, patch_size: int):
  """(B, h, w, 3 p p) with PyTorch channel index c p^2 + i p + j -> (B, h p, w p, 3)."""
  bsz, h, w, _ = x.shape
  p = patch_size
  x = x.reshape(bsz, h, w, 3, p, p).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(bsz, h * p, w * p, 3)


class PixelDecoder(nn.Module):
  spec: DecoderSpec

  @nn.compact
  def __call__(self, latents):
    s, b = self.spec, self.spec.block
    dtype = layers.dtype_of(b.dtype)
    if latents.ndim != 4:
      raise ValueError(f'latents must be (B, h, w, d) channels-last, got shape {latents.shape}.')
    bsz, h, w, _ = latents.shape
    x = layers.dense(b.width, 'latent', 'embed', 'proj_in', dtype)(latents.astype(dtype))
    x = x.reshape(bsz, h * w, b.width)
    x = nn.with_logical_constraint(x, ('act_batch', 'act_seq', 'act_embed'))
    sin, cos = rope_lib.rope_tables(s.rope, h, w) if s.rope else (None, None)
    x, _ = layers.run_blocks(b, s.depth, x, sin, cos, scan=s.scan, remat_policy=s.remat_policy)
    x = layers.make_norm(b.norm, b.norm_eps, 'norm')(x)
    x = layers.dense(3 * s.patch_size ** 2, 'embed', 'pixels', 'proj_out', dtype)(x)
    return pixel_shuffle(x.reshape(bsz, h, w, -1), s.patch_size).astype(jnp.float32)
