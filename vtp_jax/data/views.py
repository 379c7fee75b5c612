"""The three VTP views of one decoded image, in numpy and Pillow, drawn from a numpy Generator.

- CLIP view: random resized crop (scale data.clip_crop_scale) at data.image_size [R OpenCLIP];
- reconstruction view: a mild random resized crop (data.rec_crop_scale) plus a flip, at image_size;
- SSL views: DINOv2's multi-crop (spec 2.3): 2 global crops and N local crops, each a bicubic
  random resized crop with a flip, colour jitter, grayscale, Gaussian blur, and (global 2 only)
  solarise.

Semantics follow torchvision's PIL path (what DINOv2 and OpenCLIP run): RandomResizedCrop's
10-attempt sampler with the centre-crop fallback, ColorJitter's random order of PIL enhancers,
PIL's 'L' grayscale, GaussianBlur with a 9-tap kernel and reflect padding, solarise at 128. Every
output is uint8; images smaller than a crop are simply upscaled by the resize.
"""

import math

import numpy as np
from PIL import Image, ImageEnhance

BLUR_KERNEL = 9  # torchvision GaussianBlur(kernel_size=9) as DINOv2 uses it [R DINOv2]
SOLARIZE_THRESHOLD = 128  # RandomSolarize(threshold=128) [R DINOv2]


def crop_params(height: int, width: int, scale, ratio, rng: np.random.Generator):
  """torchvision RandomResizedCrop.get_params: (top, left, h, w) of the crop box."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: the largest centre crop whose aspect lies within `ratio`.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, max(h, 1), max(w, 1)


def random_resized_crop(image: Image.Image, size: int, scale, ratio,
                        rng: np.random.Generator) -> Image.Image:
  """Crop a random box and resize it to (size, size) with Pillow's (antialiased) bicubic filter."""
  top, left, h, w = crop_params(image.height, image.width, scale, ratio, rng)
  # Crop first: resize(box=...) would let the bicubic filter read pixels outside the box.
  return image.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)


def flip(array: np.ndarray) -> np.ndarray:
  return array[:, ::-1]


def grayscale(array: np.ndarray) -> np.ndarray:
  """PIL 'L' conversion (ITU-R 601-2 luma), repeated over 3 channels as RandomGrayscale does."""
  grey = np.asarray(Image.fromarray(array).convert('L'))
  return np.repeat(grey[..., None], 3, axis=-1)


def solarize(array: np.ndarray, threshold: int = SOLARIZE_THRESHOLD) -> np.ndarray:
  return np.where(array >= threshold, 255 - array, array).astype(np.uint8)


def gaussian_kernel(sigma: float, size: int = BLUR_KERNEL) -> np.ndarray:
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2
  k = np.exp(-0.5 * (x / sigma) ** 2)
  return (k / k.sum()).astype(np.float32)


def gaussian_blur(array: np.ndarray, sigma: float, size: int = BLUR_KERNEL) -> np.ndarray:
  """Separable Gaussian blur with reflect padding (torchvision's gaussian_blur), uint8 in/out."""
  k = gaussian_kernel(sigma, size)
  r = size // 2
  x = array.astype(np.float32)
  # Reflect padding needs the side to exceed the radius; tiny crops fall back to 'symmetric'.
  mode = 'reflect' if min(x.shape[:2]) > r else 'symmetric'
  x = np.pad(x, ((r, r), (0, 0), (0, 0)), mode=mode)
  x = sum(k[i] * x[i:i + array.shape[0]] for i in range(size))
  x = np.pad(x, ((0, 0), (r, r), (0, 0)), mode=mode)
  x = sum(k[i] * x[:, i:i + array.shape[1]] for i in range(size))
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _adjust_hue(image: Image.Image, factor: float) -> Image.Image:
  """torchvision's PIL adjust_hue: shift the HSV hue channel by factor * 255 (mod 256)."""
  h, s, v = image.convert('HSV').split()
  # torchvision adds np.array(factor * 255).astype(uint8), i.e. the truncated shift, wrapping.
  shift = int(factor * 255) % 256
  hue = ((np.asarray(h, np.uint8).astype(np.int32) + shift) % 256).astype(np.uint8)
  return Image.merge('HSV', (Image.fromarray(hue, 'L'), s, v)).convert('RGB')


def color_jitter(image: Image.Image, strengths, rng: np.random.Generator) -> Image.Image:
  """torchvision ColorJitter(brightness, contrast, saturation, hue) on a PIL image.

  Factors are drawn first (brightness/contrast/saturation in [max(0, 1-s), 1+s], hue in
  [-h, h]), then applied in a random order, as torchvision does; a strength of 0 skips its op
  (torchvision stores None for it), which matters because the HSV round trip is lossy.
  """
  b, c, s, h = strengths
  factors = (rng.uniform(max(0.0, 1 - b), 1 + b), rng.uniform(max(0.0, 1 - c), 1 + c),
             rng.uniform(max(0.0, 1 - s), 1 + s), rng.uniform(-h, h))
  for op in rng.permutation(4):
    if not strengths[op]:
      continue
    if op == 0:
      image = ImageEnhance.Brightness(image).enhance(factors[0])
    elif op == 1:
      image = ImageEnhance.Contrast(image).enhance(factors[1])
    elif op == 2:
      image = ImageEnhance.Color(image).enhance(factors[2])
    else:
      image = _adjust_hue(image, factors[3])
  return image


def ssl_crop(image: Image.Image, size: int, scale, blur_p: float, solarize_p: float, d,
             rng: np.random.Generator) -> np.ndarray:
  """One DINOv2 crop: geometry (RRC + flip), colour (jitter p, grayscale p), blur, solarise."""
  crop = random_resized_crop(image, size, scale, d.crop_ratio, rng)
  if rng.random() < d.flip_probability:
    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
  if rng.random() < d.color_jitter_probability:
    crop = color_jitter(crop, d.color_jitter, rng)
  out = np.asarray(crop)
  if rng.random() < d.grayscale_probability:
    out = grayscale(out)
  if rng.random() < blur_p:
    out = gaussian_blur(out, rng.uniform(*d.blur_sigma))
  if rng.random() < solarize_p:
    out = solarize(out)
  return np.ascontiguousarray(out, dtype=np.uint8)


def clip_view(image: Image.Image, config, rng: np.random.Generator) -> np.ndarray:
  d = config.data
  return np.asarray(random_resized_crop(image, d.image_size, d.clip_crop_scale, d.crop_ratio, rng))


def rec_view(image: Image.Image, config, rng: np.random.Generator) -> np.ndarray:
  d = config.data
  out = np.asarray(random_resized_crop(image, d.image_size, d.rec_crop_scale, d.crop_ratio, rng))
  if rng.random() < d.rec_flip_probability:
    out = flip(out)
  return np.ascontiguousarray(out)


def ssl_views(image: Image.Image, config,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """(global (2, G, G, 3), local (n_local, Lc, Lc, 3)) uint8 crops of one image."""
  d = config.data
  blur_g1, blur_g2, blur_local = d.blur_probability
  g = d.global_crop_size
  globals_ = [ssl_crop(image, g, d.global_crop_scale, blur_g1, 0.0, d, rng),
              ssl_crop(image, g, d.global_crop_scale, blur_g2, d.solarize_probability, d, rng)]
  lc = d.local_crop_size
  locals_ = [ssl_crop(image, lc, d.local_crop_scale, blur_local, 0.0, d, rng)
             for _ in range(d.n_local_crops)]
  local = np.stack(locals_) if locals_ else np.zeros((0, lc, lc, 3), np.uint8)
  return np.stack(globals_), local


def as_pil(array: np.ndarray) -> Image.Image:
  return Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), 'RGB')
