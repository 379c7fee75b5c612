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

Crop geometry is drawn in the coordinates of the image as stored (`source_hw`), so it does not
depend on how the image was decoded: with data.decode='scaled' the JPEG decoder shrinks an image
by 2, 4 or 8 (DCT scaling) and each crop box is mapped onto the smaller pixels. `decode_reduction`
draws every view's parameters from the header's size alone (the same random streams the views
then use) and picks the largest reduction that leaves every drawn crop at least its output side,
so no view upscales what it would have downscaled from the full image.

Two backends apply the same draws: handed a PIL image, every view is computed in Pillow
(data.views_backend='pillow', the torchvision reference); handed a uint8 array, in OpenCV
(views_opencv.py, 'opencv', the default: several times faster, statistically the same).
"""

import math

import numpy as np
import scipy.ndimage
from PIL import Image, ImageEnhance

from vtp_jax.data import views_opencv

JPEG_REDUCTIONS = (8, 4, 2)  # the DCT scales libjpeg decodes at, largest first

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


def resized_crop(image, box, size: int, source_hw=None):
  """The crop `box` (top, left, h, w) in source coordinates, resized to (size, size) with
  Pillow's (antialiased) bicubic filter; an array is cut and resized by views_opencv instead.

  At full size: crop first, since resize(box=...) would let the bicubic filter read pixels outside
  the box (torchvision's order). On a reduced decode the box, scaled, has fractional edges: crop
  the pixels it touches and let resize(box=...) take the fraction (at most one pixel of margin).
  """
  if isinstance(image, np.ndarray):
    return views_opencv.resized_crop(image, box, size, source_hw)
  top, left, h, w = box
  src_h, src_w = source_hw or (image.height, image.width)
  if (src_h, src_w) == (image.height, image.width):
    return image.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
  fy, fx = image.height / src_h, image.width / src_w
  x0, y0, x1, y1 = left * fx, top * fy, (left + w) * fx, (top + h) * fy
  ix0, iy0 = int(math.floor(x0)), int(math.floor(y0))
  ix1, iy1 = min(image.width, int(math.ceil(x1))), min(image.height, int(math.ceil(y1)))
  return image.crop((ix0, iy0, ix1, iy1)).resize(
      (size, size), Image.BICUBIC, box=(x0 - ix0, y0 - iy0, min(x1, ix1) - ix0, min(y1, iy1) - iy0))


def random_resized_crop(image, size: int, scale, ratio, rng: np.random.Generator,
                        source_hw=None):
  """Crop a random box (drawn in source coordinates) and resize it to (size, size)."""
  src_h, src_w = source_hw or _size(image)
  box = crop_params(src_h, src_w, scale, ratio, rng)
  return resized_crop(image, box, size, (src_h, src_w))


def _size(image) -> tuple:
  """(height, width) of a PIL image or an (H, W, 3) array."""
  return image.shape[:2] if isinstance(image, np.ndarray) else (image.height, image.width)


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
  """Separable Gaussian blur with reflect padding (torchvision's gaussian_blur), uint8 in/out.

  scipy's correlate1d runs each pass in C (a fifth of the time of shifted NumPy sums); its
  'mirror' is NumPy's/torch's 'reflect' (d c b | a b c d). Reflect padding needs the side to
  exceed the radius; tiny crops fall back to 'symmetric' (scipy's 'reflect').
  """
  k = gaussian_kernel(sigma, size)
  mode = 'mirror' if min(array.shape[:2]) > size // 2 else 'reflect'
  x = scipy.ndimage.correlate1d(array.astype(np.float32), k, axis=0, mode=mode)
  x = scipy.ndimage.correlate1d(x, k, axis=1, mode=mode)
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
  return apply_jitter(image, strengths, *draw_jitter(strengths, rng))


def draw_jitter(strengths, rng: np.random.Generator):
  """ColorJitter's random draws: (factors, order of the four ops)."""
  b, c, s, h = strengths
  factors = (rng.uniform(max(0.0, 1 - b), 1 + b), rng.uniform(max(0.0, 1 - c), 1 + c),
             rng.uniform(max(0.0, 1 - s), 1 + s), rng.uniform(-h, h))
  return factors, rng.permutation(4)


def apply_jitter(image: Image.Image, strengths, factors, order) -> Image.Image:
  for op in order:
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


def draw_ssl_crop(source_hw, size: int, scale, blur_p: float, solarize_p: float, d,
                  rng: np.random.Generator) -> dict:
  """Every random draw of one DINOv2 crop, in the order ssl_crop has always drawn them."""
  p = {'size': size, 'box': crop_params(*source_hw, scale, d.crop_ratio, rng)}
  p['flip'] = rng.random() < d.flip_probability
  p['jitter'] = (draw_jitter(d.color_jitter, rng)
                 if rng.random() < d.color_jitter_probability else None)
  p['grey'] = rng.random() < d.grayscale_probability
  p['blur'] = rng.uniform(*d.blur_sigma) if rng.random() < blur_p else None
  p['solarize'] = rng.random() < solarize_p
  return p


def apply_ssl_crop(image, p: dict, d, source_hw=None) -> np.ndarray:
  """One DINOv2 crop: geometry (RRC + flip), colour (jitter p, grayscale p), blur, solarise; in
  OpenCV when handed an array, in Pillow (the reference) when handed a PIL image."""
  crop = resized_crop(image, p['box'], p['size'], source_hw)
  cv = isinstance(crop, np.ndarray)
  if p['flip']:
    crop = np.ascontiguousarray(flip(crop)) if cv else crop.transpose(Image.FLIP_LEFT_RIGHT)
  if p['jitter'] is not None:
    crop = (views_opencv.apply_jitter if cv else apply_jitter)(crop, d.color_jitter, *p['jitter'])
  out = np.asarray(crop)
  if p['grey']:
    out = (views_opencv.grayscale if cv else grayscale)(out)
  if p['blur'] is not None:
    out = (views_opencv.gaussian_blur(out, p['blur'], BLUR_KERNEL) if cv else
           gaussian_blur(out, p['blur']))
  if p['solarize']:
    out = solarize(out)
  return np.ascontiguousarray(out, dtype=np.uint8)


def ssl_crop(image, size: int, scale, blur_p: float, solarize_p: float, d,
             rng: np.random.Generator, source_hw=None) -> np.ndarray:
  source_hw = source_hw or _size(image)
  return apply_ssl_crop(image, draw_ssl_crop(source_hw, size, scale, blur_p, solarize_p, d, rng),
                        d, source_hw)


def draw_ssl_views(source_hw, d, rng: np.random.Generator) -> list:
  """The parameters of the 2 global and n_local_crops local crops, in drawing order."""
  blur_g1, blur_g2, blur_local = d.blur_probability
  g, lc = d.global_crop_size, d.local_crop_size
  return ([draw_ssl_crop(source_hw, g, d.global_crop_scale, blur_g1, 0.0, d, rng),
           draw_ssl_crop(source_hw, g, d.global_crop_scale, blur_g2, d.solarize_probability, d,
                         rng)] +
          [draw_ssl_crop(source_hw, lc, d.local_crop_scale, blur_local, 0.0, d, rng)
           for _ in range(d.n_local_crops)])


def clip_view(image, config, rng: np.random.Generator,
              source_hw=None) -> np.ndarray:
  d = config.data
  return np.asarray(random_resized_crop(image, d.image_size, d.clip_crop_scale, d.crop_ratio, rng,
                                        source_hw))


def rec_view(image, config, rng: np.random.Generator,
             source_hw=None) -> np.ndarray:
  d = config.data
  out = np.asarray(random_resized_crop(image, d.image_size, d.rec_crop_scale, d.crop_ratio, rng,
                                       source_hw))
  if rng.random() < d.rec_flip_probability:
    out = flip(out)
  return np.ascontiguousarray(out)


def ssl_views(image, config, rng: np.random.Generator,
              source_hw=None) -> tuple[np.ndarray, np.ndarray]:
  """(global (2, G, G, 3), local (n_local, Lc, Lc, 3)) uint8 crops of one image."""
  d = config.data
  source_hw = source_hw or _size(image)
  crops = [apply_ssl_crop(image, p, d, source_hw) for p in draw_ssl_views(source_hw, d, rng)]
  lc = d.local_crop_size
  local = np.stack(crops[2:]) if crops[2:] else np.zeros((0, lc, lc, 3), np.uint8)
  return np.stack(crops[:2]), local


def view_boxes(source_hw, config, branches, rngs: dict) -> list:
  """(box, output side) of every crop the active branches draw for one image: the same draws as
  clip_view, rec_view and ssl_views make from the same fresh generators (rngs: branch -> rng)."""
  d = config.data
  out = []
  if 'clip' in branches:
    out.append((crop_params(*source_hw, d.clip_crop_scale, d.crop_ratio, rngs['clip']),
                d.image_size))
  if 'rec' in branches:
    out.append((crop_params(*source_hw, d.rec_crop_scale, d.crop_ratio, rngs['rec']),
                d.image_size))
  if 'ssl' in branches:
    out.extend((p['box'], p['size']) for p in draw_ssl_views(source_hw, d, rngs['ssl']))
  return out


def decode_reduction(source_hw, boxes) -> int:
  """The largest JPEG scale-down (8, 4, 2, else 1) that keeps every crop at its output side.

  A reduction by r decodes ceil(H / r) x ceil(W / r) pixels; a box then keeps its shorter side
  times that fraction. Allowed when every box keeps at least its output side, or (a box already
  smaller than its output at full size) none is made smaller at all.
  """
  src_h, src_w = source_hw
  for r in JPEG_REDUCTIONS:
    fy, fx = -(-src_h // r) / src_h, -(-src_w // r) / src_w
    if all(min(h * fy, w * fx) >= min(size, h, w) for (_, _, h, w), size in boxes):
      return r
  return 1


def as_pil(array: np.ndarray) -> Image.Image:
  return Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), 'RGB')
