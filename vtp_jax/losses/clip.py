"""Image-text contrastive losses: softmax CLIP (OpenCLIP `ClipLoss`) and sigmoid SigLIP.

This file owns the CLIP-branch objective and the logit-scale clamp. Both losses are written over the
*global* batch: under `jax.jit` with the batch axis sharded, GSPMD inserts the all-gathers that
OpenCLIP's `gather_features` does by hand, so there is no per-device code here.

Spec section 2.2: softmax CLIP is what VTP trains [C]; SigLIP is supported by the reference code
but unused in the released models [C]. `logit_scale` is always the LOG scale: s = exp(logit_scale).
"""

import math

import jax
import jax.numpy as jnp

# OpenCLIP / CLIP `F.normalize` epsilon: only matters for an all-zero embedding.
_NORMALIZE_EPS = 1e-12


def _check_pair(image_emb: jax.Array, text_emb: jax.Array) -> None:
  if image_emb.ndim != 2 or text_emb.ndim != 2:
    raise ValueError(
        f'image_emb and text_emb must be 2-D (batch, dim); got image_emb {image_emb.shape} and '
        f'text_emb {text_emb.shape}. Flatten any extra leading axes before calling.')
  if image_emb.shape != text_emb.shape:
    raise ValueError(
        f'image_emb {image_emb.shape} and text_emb {text_emb.shape} must have the same shape: '
        'row i of each is one image-caption pair, and both live in the joint embedding space.')


def _scalar(name: str, value) -> jax.Array:
  value = jnp.asarray(value, jnp.float32)
  if value.size != 1:
    raise ValueError(f'{name} must be a scalar (or a size-1 array); got shape {value.shape}.')
  return value.reshape(())


def l2_normalize(x: jax.Array, eps: float = _NORMALIZE_EPS) -> jax.Array:
  """x / max(||x||, eps) along the last axis, in float32 (torch `F.normalize` semantics)."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def _pair_logits(image_emb, text_emb, logit_scale):
  """s * I T^T over normalised features. Normalising again is harmless if the model already did."""
  _check_pair(image_emb, text_emb)
  scale = jnp.exp(_scalar('logit_scale', logit_scale))
  image = l2_normalize(image_emb)
  text = l2_normalize(text_emb)
  return scale * image @ text.T, scale


def _retrieval_accuracy(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Top-1 accuracy of picking the paired caption for each image (rows) and image per caption."""
  target = jnp.arange(logits.shape[0])
  i2t = jnp.mean((jnp.argmax(logits, axis=1) == target).astype(jnp.float32))
  t2i = jnp.mean((jnp.argmax(logits, axis=0) == target).astype(jnp.float32))
  return i2t, t2i


def clip_softmax_loss(image_emb: jax.Array, text_emb: jax.Array,
                      logit_scale: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric InfoNCE, OpenCLIP `ClipLoss`: (CE(s I T^T, diag) + CE(s T I^T, diag)) / 2.

  Args:
    image_emb: (B, D) image embeddings of the global batch (any float dtype; L2-normalised here).
    text_emb: (B, D) text embeddings; row i is the caption of image i.
    logit_scale: scalar LOG scale; the logits are multiplied by exp(logit_scale).

  Returns:
    (loss, metrics): metrics holds the top-1 retrieval accuracies 'clip_i2t_acc' and 'clip_t2i_acc'
    and 'clip_scale' (= exp(logit_scale)).
  """
  logits, scale = _pair_logits(image_emb, text_emb, logit_scale)
  # log_softmax along rows scores image->text; along columns scores text->image (= rows of logits.T).
  diag_i2t = jnp.diagonal(jax.nn.log_softmax(logits, axis=1))
  diag_t2i = jnp.diagonal(jax.nn.log_softmax(logits, axis=0))
  loss = -(jnp.mean(diag_i2t) + jnp.mean(diag_t2i)) / 2
  i2t, t2i = _retrieval_accuracy(logits)
  return loss, {'clip_i2t_acc': i2t, 'clip_t2i_acc': t2i, 'clip_scale': scale}


def clip_sigmoid_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                      logit_bias: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SigLIP pairwise sigmoid loss, as big_vision `siglip`.

  z_ij = s x_i.y_j + b with label +1 on the diagonal and -1 elsewhere;
  loss = mean_i sum_j -log sigmoid(label_ij z_ij), i.e. the total divided by the batch size.

  Returns:
    (loss, metrics) with the same retrieval accuracies as `clip_softmax_loss`, the scale and the bias.
  """
  logits, scale = _pair_logits(image_emb, text_emb, logit_scale)
  bias = _scalar('logit_bias', logit_bias)
  logits = logits + bias
  labels = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
  loss = -jnp.mean(jnp.sum(jax.nn.log_sigmoid(labels * logits), axis=-1))
  i2t, t2i = _retrieval_accuracy(logits)
  return loss, {'clip_i2t_acc': i2t, 'clip_t2i_acc': t2i, 'clip_scale': scale, 'clip_bias': bias}


def clamp_logit_scale(logit_scale: jax.Array, max_log_scale: float = math.log(100.0)) -> jax.Array:
  """Clip the LOG scale to [0, ln 100] (OpenCLIP does this in place after every optimiser step).

  The cap keeps the temperature from collapsing (s > 100 makes the softmax near one-hot and unstable).
  """
  return jnp.clip(logit_scale, 0.0, max_log_scale)
