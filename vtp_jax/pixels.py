"""Model space: the ImageNet mean/std normalisation every VTP tower reads and the decoder writes
(spec 1.12), and conversions from and to uint8 RGB, on host (NumPy) and on device (jnp)."""

import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def to_model_space(images_uint8) -> np.ndarray:
  """uint8 RGB (..., 3) -> float32 ImageNet-normalised, on the host."""
  images = np.asarray(images_uint8)
  if images.dtype != np.uint8 or images.shape[-1] != 3:
    raise ValueError(f'expected uint8 RGB images (..., 3), got {images.dtype} {images.shape}.')
  return (images.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def to_uint8(images) -> np.ndarray:
  """Model-space images -> uint8 RGB, clamped to [0, 1] and truncated as the reference saves PNGs."""
  pixels = np.asarray(images, np.float32) * IMAGENET_STD + IMAGENET_MEAN
  return (np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)


def normalize_on_device(images_uint8):
  """uint8 RGB -> ImageNet-normalised float32 inside jit (images cross to devices as uint8)."""
  return (images_uint8.astype(jnp.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def denormalize(x):
  """Model space -> [0, 1] pixel values (jnp)."""
  return x.astype(jnp.float32) * IMAGENET_STD + IMAGENET_MEAN
