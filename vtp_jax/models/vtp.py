"""The VTP model: trunk + bottleneck, pixel decoder, text tower, DINO head and CLIP head, wired with the
`bottleneck_ae_only` / `clip_feat` semantics of spec 1.5, and built from an ml_collections config.

Params are one plain nested dict {'encoder', 'decoder', 'text', 'dino_head', 'clip'}. Each branch of
training or inference calls one method through `model.apply(params, ..., method=...)`, so a caller
that needs only the encoder needs only `params['encoder']`.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from vtp_jax.models import decoder as decoder_lib
from vtp_jax.models import heads
from vtp_jax.models import layers
from vtp_jax.models import rope as rope_lib
from vtp_jax.models import text as text_lib
from vtp_jax.models import vision

CLIP_FEATS = ('cls', 'pooled')


@dataclasses.dataclass(frozen=True)
class VTPSpec:
  encoder: vision.EncoderSpec
  decoder: decoder_lib.DecoderSpec
  text: text_lib.TextSpec
  dino_hidden: int = 2048
  dino_bottleneck: int = 256
  dino_prototypes: int = 65536
  dino_nlayers: int = 3
  clip_dim: int = 768
  init_logit_scale: float = 2.6592600369262695
  logit_bias: bool = False
  init_logit_bias: float = -10.0
  bottleneck_ae_only: bool = True
  clip_feat: str = 'cls'
  dtype: str = 'float32'

  def __post_init__(self):
    if self.clip_feat not in CLIP_FEATS:
      raise ValueError(f'model.clip_feat={self.clip_feat!r}; use one of {CLIP_FEATS}.')


def _block_spec(tower, precision, **overrides) -> layers.BlockSpec:
  fields = dict(
      width=tower.width, heads=tower.heads, mlp=tower.get('mlp', 'gelu'),
      mlp_ratio=tower.mlp_ratio, norm=tower.get('norm', 'layernorm'), norm_eps=tower.norm_eps,
      qkv_bias=tower.get('qkv_bias', True), qk_norm=tower.get('qk_norm', False),
      qk_norm_eps=tower.get('qk_norm_eps', 1e-5),
      layerscale=tower.get('layerscale', 0.0), init=tower.get('init', 'vit'),
      dtype=precision.compute_dtype,
      rope_dtype=precision.rope_dtype, attention=precision.attention,
      dense=precision.get('dense', 'xla'))
  fields.update(overrides)
  return layers.BlockSpec(**fields)


def spec_from_config(config) -> VTPSpec:
  """Builds the static model description from the `model` and `precision` config sections."""
  m, prec = config.model, config.precision
  enc, dec, txt = m.encoder, m.decoder, m.text
  rope_kwargs = dict(base=m.rope.base, min_period=m.rope.min_period, max_period=m.rope.max_period,
                     normalize_coords=m.rope.normalize_coords, dtype=prec.rope_dtype)
  encoder = vision.EncoderSpec(
      block=_block_spec(enc, prec, drop_path_mode=enc.drop_path_mode),
      depth=enc.depth, patch_size=m.patch_size, n_registers=enc.n_registers,
      bottleneck_dim=m.bottleneck_dim,
      rope=rope_lib.RopeSpec(head_dim=enc.width // enc.heads, shift=m.rope.shift,
                             jitter=m.rope.jitter, rescale=m.rope.rescale, **rope_kwargs),
      scan=prec.scan_layers, remat_policy=prec.remat_policy)
  decoder = decoder_lib.DecoderSpec(
      block=_block_spec(dec, prec), depth=dec.depth, patch_size=m.patch_size,
      rope=rope_lib.RopeSpec(head_dim=dec.width // dec.heads, **rope_kwargs),
      scan=prec.scan_layers, remat_policy=prec.remat_policy)
  text = text_lib.TextSpec(
      block=_block_spec(txt, prec, mlp='gelu', norm='layernorm', causal=txt.causal,
                        init='openclip', depth_for_init=txt.depth),
      depth=txt.depth, context_length=txt.context_length, vocab_size=txt.vocab_size,
      embed_dim=m.clip_dim, scan=prec.scan_layers, remat_policy=prec.remat_policy)
  return VTPSpec(
      encoder=encoder, decoder=decoder, text=text, dino_hidden=m.dino_head.hidden,
      dino_bottleneck=m.dino_head.bottleneck, dino_prototypes=m.dino_head.prototypes,
      dino_nlayers=m.dino_head.nlayers, clip_dim=m.clip_dim, init_logit_scale=m.init_logit_scale,
      logit_bias=m.logit_bias, init_logit_bias=m.init_logit_bias,
      bottleneck_ae_only=m.bottleneck_ae_only, clip_feat=m.clip_feat, dtype=prec.compute_dtype)


def tokens_to_grid(tokens, grid):
  """(B, h*w, d) -> (B, h, w, d), row-major as the reference's reshape."""
  h, w = grid
  return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1])


class VTP(nn.Module):
  spec: VTPSpec

  def setup(self):
    s = self.spec
    self.encoder = vision.VisionEncoder(s.encoder)
    self.decoder = decoder_lib.PixelDecoder(s.decoder)
    self.text = text_lib.TextTower(s.text)
    self.dino_head = heads.DINOHead(s.dino_hidden, s.dino_bottleneck, s.dino_prototypes,
                                    s.dino_nlayers, dtype=s.dtype)
    self.clip = heads.ClipImageHead(s.clip_dim, s.init_logit_scale, s.logit_bias,
                                    s.init_logit_bias, dtype=s.dtype)

  def __call__(self, images, tokens):
    """Touches every parameter once (used by `init`); returns the main outputs."""
    latents = self.latents(images)
    feats = self.encode(images, use_bottleneck=True)
    head_input = feats['cls'] if self.spec.bottleneck_ae_only else feats['latent_cls']
    return {
        'latents': latents,
        'decoded': self.decode(latents),
        'clip_image': self.clip_image_features(images),
        'clip_text': self.clip_text_features(tokens),
        'dino': self.dino(head_input),
        'logit_scale': self.clip.temperature()[0],
    }

  def encode(self, images, mask=None, drop_rate: float = 0.0, train: bool = False,
             use_bottleneck: bool = False, n_intermediate: int = 0):
    """Full-width normed tokens {'cls', 'patches', 'grid'[, 'latent_*', 'intermediate']}."""
    return self.encoder(images, mask=mask, drop_rate=drop_rate, train=train,
                        use_bottleneck=use_bottleneck, n_intermediate=n_intermediate)

  def latents(self, images, drop_rate: float = 0.0, train: bool = False):
    """Bottleneck latents (B, H/16, W/16, d) of the normed patch tokens."""
    out = self.encoder(images, drop_rate=drop_rate, train=train, use_bottleneck=True)
    return tokens_to_grid(out['latent_patches'], out['grid'])

  def decode(self, latents):
    """Latents (B, h, w, d) -> images (B, 16h, 16w, 3) in model space, float32."""
    return self.decoder(latents)

  def clip_image_from_features(self, feats):
    """CLIP image embedding (unnormalised) from encoder outputs, per `clip_feat` and bottleneck."""
    s = self.spec
    prefix = '' if s.bottleneck_ae_only else 'latent_'
    if s.clip_feat == 'cls':
      pooled = feats[prefix + 'cls']
    else:
      pooled = jnp.mean(feats[prefix + 'patches'], axis=1)
    return self.clip(pooled)

  def clip_image_features(self, images, drop_rate: float = 0.0, train: bool = False):
    feats = self.encoder(images, drop_rate=drop_rate, train=train,
                         use_bottleneck=not self.spec.bottleneck_ae_only)
    return self.clip_image_from_features(feats)

  def clip_text_features(self, tokens):
    return self.text(tokens)

  def dino(self, features):
    """DINO/iBOT head logits (..., K) of full-width (or latent) CLS or patch features."""
    return self.dino_head(features)

  def temperature(self):
    """(log logit scale, logit bias or None)."""
    return self.clip.temperature()


def build(config) -> VTP:
  return VTP(spec_from_config(config))
