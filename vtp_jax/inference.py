"""The tokenizer for downstream generation: load a vtp-jax checkpoint, encode images to latents,
decode latents to images, and read CLIP and DINO features.

    from vtp_jax.inference import Tokenizer
    tok = Tokenizer.load('ckpt_dir')
    z = tok.encode(tok.to_model_space(uint8_images))   # (B, H/16, W/16, 64)
    images = tok.to_uint8(tok.decode(z))

Images are NHWC float32 in model space (ImageNet mean/std, spec 1.12); `to_model_space` and
`to_uint8` convert from and to uint8 RGB. Every method is jitted once per input shape and works on
the whole batch, or in chunks of `batch_size` when given (the last chunk is padded, so a new batch
size does not recompile).
"""

import functools

import jax
import jax.numpy as jnp

from vtp_jax.models import layout
from vtp_jax.models import vtp
from vtp_jax.pixels import IMAGENET_MEAN, IMAGENET_STD, to_model_space, to_uint8  # noqa: F401
from vtp_jax import checkpoints

def _l2_normalize(x):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Tokenizer:
  """A loaded VTP model with jitted, batched inference methods."""

  def __init__(self, config, params, batch_size: int | None = None):
    self.config = config
    self.model = vtp.build(config)
    self.params = layout.to_layout(params, config.precision.scan_layers)
    self.batch_size = batch_size

  @classmethod
  def load(cls, path, compute_dtype: str = 'float32', batch_size: int | None = None):
    """Restores a checkpoint folder (config.json + params, as the tools write) or a training
    workdir (its latest complete checkpoint, launch/main.py's --workdir), local or in a bucket
    (`gs://BUCKET/...`: vtp_jax/checkpoints reads both).

    `compute_dtype` overrides the training precision: float32 (default) matches the reference
    implementation to float32 rounding; 'bfloat16' is faster on accelerators.
    """
    path = checkpoints.resolve(path)
    config = checkpoints.load_config(path)
    config.precision.compute_dtype = compute_dtype
    return cls(config, checkpoints.load_item(path, 'params'), batch_size)

  @functools.cached_property
  def _fns(self):
    m = self.model

    def call(method, *args, **kwargs):
      return lambda params, x: m.apply({'params': params}, x, *args, method=method, **kwargs)

    def features(params, x):
      out = m.apply({'params': params}, x, method=m.encode)
      return {'cls_token': out['cls'], 'patch_tokens': out['patches']}

    return {
        'encode': jax.jit(call(m.latents)),
        'decode': jax.jit(call(m.decode)),
        'clip_image': jax.jit(lambda p, x: _l2_normalize(call(m.clip_image_features)(p, x))),
        'clip_text': jax.jit(lambda p, x: _l2_normalize(call(m.clip_text_features)(p, x))),
        'features': jax.jit(features),
    }

  def _batched(self, fn, inputs):
    inputs = jnp.asarray(inputs)
    if self.batch_size is None or inputs.shape[0] <= self.batch_size:
      return fn(self.params, inputs)
    chunks = []
    for start in range(0, inputs.shape[0], self.batch_size):
      chunk = inputs[start:start + self.batch_size]
      n = chunk.shape[0]
      if n < self.batch_size:
        pad = [(0, self.batch_size - n)] + [(0, 0)] * (chunk.ndim - 1)
        chunk = jnp.pad(chunk, pad)
      chunks.append(jax.tree.map(lambda y, n=n: y[:n], fn(self.params, chunk)))
    return jax.tree.map(lambda *ys: jnp.concatenate(ys), *chunks)

  def encode(self, images):
    """Latents (B, H/16, W/16, d) of model-space images (B, H, W, 3)."""
    return self._batched(self._fns['encode'], images)

  def decode(self, latents):
    """Model-space images (B, 16h, 16w, 3) of latents (B, h, w, d)."""
    return self._batched(self._fns['decode'], latents)

  def clip_image_features(self, images):
    """L2-normalised CLIP image embeddings (B, clip_dim)."""
    return self._batched(self._fns['clip_image'], images)

  def clip_text_features(self, token_ids):
    """L2-normalised CLIP text embeddings (B, clip_dim) of int token ids (B, L)."""
    return self._batched(self._fns['clip_text'], jnp.asarray(token_ids, jnp.int32))

  def clip_text_features_from_strings(self, texts):
    from vtp_jax.data import text  # local: needs the BPE package only when strings are used
    return self.clip_text_features(text.tokenize(texts, self.config.model.text.context_length))

  def features(self, images):
    """{'cls_token': (B, D), 'patch_tokens': (B, N, D)}: final-normed, without the bottleneck."""
    return self._batched(self._fns['features'], images)

  def intermediate_layers(self, images, n: int):
    """The last n blocks' outputs, normed, as a list of (patch_tokens, cls_token), oldest first."""
    fn = self._intermediate_fn(n)
    return self._batched(fn, images)

  @functools.lru_cache(maxsize=8)
  def _intermediate_fn(self, n: int):
    m = self.model
    return jax.jit(lambda p, x: m.apply({'params': p}, x, n_intermediate=n,
                                        method=m.encode)['intermediate'])

  @property
  def logit_scale(self) -> float:
    """The stored (log) CLIP logit scale."""
    return float(self.params['clip']['logit_scale'])
