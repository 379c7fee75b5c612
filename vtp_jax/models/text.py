"""The OpenCLIP text tower (spec 1.6): token and learned position embeddings, causal pre-LN blocks
with exact-GELU MLPs, final LayerNorm, pooling at the end-of-text token, linear projection."""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from vtp_jax.models import layers


@dataclasses.dataclass(frozen=True)
class TextSpec:
  block: layers.BlockSpec
  depth: int
  context_length: int = 77
  vocab_size: int = 49408
  embed_dim: int = 768  # CLIP joint embedding width
  scan: bool = True
  remat_policy: str = 'none'


class TextTower(nn.Module):
  """Token ids (B, L) int -> unnormalised CLIP text embeddings (B, embed_dim).

  Pooling takes the token with the largest id, the end-of-text token (49407) in CLIP's BPE, after
  `ln_final`, as OpenCLIP's 'argmax' pooling does.
  """
  spec: TextSpec

  @nn.compact
  def __call__(self, tokens):
    s, b = self.spec, self.spec.block
    dtype = layers.dtype_of(b.dtype)
    if tokens.ndim != 2 or tokens.shape[1] > s.context_length:
      raise ValueError(f'tokens must be (B, L) with L <= {s.context_length}, got {tokens.shape}.')
    embed = nn.Embed(s.vocab_size, b.width, dtype=dtype, param_dtype=jnp.float32,
                     embedding_init=layers.param_with_axes(nn.initializers.normal(0.02),
                                                           ('vocab', 'embed')),
                     name='token_embedding')
    positions = self.param('positional_embedding',
                           layers.param_with_axes(nn.initializers.normal(0.01), ('ctx', 'embed')),
                           (s.context_length, b.width))
    x = embed(tokens) + positions[: tokens.shape[1]].astype(dtype)
    x = nn.with_logical_constraint(x, ('act_batch', 'act_seq', 'act_embed'))
    x, _ = layers.run_blocks(b, s.depth, x, None, None, scan=s.scan, remat_policy=s.remat_policy)
    x = layers.LayerNorm(eps=b.norm_eps, name='ln_final')(x)
    pooled = jnp.take_along_axis(x, jnp.argmax(tokens, axis=-1)[:, None, None], axis=1)[:, 0]
    projection = self.param('projection',
                            layers.param_with_axes(nn.initializers.normal(b.width ** -0.5),
                                                   ('embed', 'proj')),
                            (b.width, s.embed_dim))
    return pooled @ projection.astype(dtype)
