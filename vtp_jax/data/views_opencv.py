"""The views' pixel operations in OpenCV, on uint8 arrays (data.views_backend='opencv', the default).

views.py draws every crop and every augmentation parameter, and applies them with Pillow when
handed a PIL image (torchvision's PIL path, what DINOv2 and OpenCLIP run: the reference) or with
the functions here when handed a numpy array. The draws are shared, so both backends cut the same
boxes with the same flips, jitter factors and order, grayscale, blur sigmas and solarisation; only
how the pixels are computed differs:

- resize (`resize`): bicubic where the crop grows; where it shrinks, whole-block box averages,
  bicubic to twice the output and a 2 x 2 box average, against Pillow's antialiased bicubic. On
  48 random crops (15-100% of the short side) of four scikit-image photographs resized to 96, 224
  and 256 px: 0.71 grey levels mean absolute difference from Pillow's output (3.5 at most),
  edges (mean absolute neighbour difference) 0.996x Pillow's on average (10% apart at most), in
  0.81 ms a crop against Pillow's 4.43;
- colour jitter: the PIL enhancers' blends written out (brightness and contrast are a lookup
  table, saturation a weighted sum with the ITU-R 601 grey), the hue shift on OpenCV's 8-bit HSV
  (hue over 0-255 as PIL's): 0.36 ms for a 512 px image against PIL's 7.3 ms;
- Gaussian blur: OpenCV's separable 9-tap kernel with reflect-101 borders (torchvision's 'reflect').

Each operation reads and writes uint8; tests/data/test_views_opencv.py checks each against its
formula and tests/data/test_decode.py the views' statistics against the reference path.
"""

import cv2
import numpy as np

# One thread per call: a data worker is one core's worth of work and Grain runs one worker per
# core; OpenCV's own thread pool would only contend with the other workers.
cv2.setNumThreads(1)


def resized_crop(array: np.ndarray, box, size: int, source_hw=None) -> np.ndarray:
  """The crop `box` (top, left, h, w, in source coordinates) of `array` resized to (size, size).

  On a reduced decode the box is scaled to the array's pixels and rounded to whole pixels (at most
  half a pixel of the reduced image on each edge).
  """
  top, left, h, w = box
  src_h, src_w = source_hw or array.shape[:2]
  fy, fx = array.shape[0] / src_h, array.shape[1] / src_w
  y0, x0 = int(round(top * fy)), int(round(left * fx))
  y1 = min(array.shape[0], max(y0 + 1, int(round((top + h) * fy))))
  x1 = min(array.shape[1], max(x0 + 1, int(round((left + w) * fx))))
  return resize(array[y0:y1, x0:x1], size)


def resize(crop: np.ndarray, size: int) -> np.ndarray:
  """(h, w, 3) -> (size, size, 3), antialiased where it shrinks.

  Growing: bicubic. Shrinking by s = min(h, w) / size: a box average over whole k x k blocks
  (k = floor(s), when 2 or more; OpenCV's exact integer-factor area path), bicubic to twice the
  output side, then a 2 x 2 box average. The result is a bicubic-weighted area filter about one
  output pixel wide, which is what Pillow's antialiased bicubic computes; OpenCV's own area
  filter at a fractional factor is as close but twice as slow. The crop is padded (last row and
  column repeated) to whole blocks, and the bicubic step scales the reduced image so that the
  crop's own h / k rows fill the 2 * size output rows, cutting the padding off: the geometry
  stays the crop's to a rounding of the intermediate size.
  """
  h, w = crop.shape[:2]
  shrink = min(h, w) / size
  if shrink <= 1:
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_CUBIC)
  k = int(shrink)
  if k >= 2:
    if h % k or w % k:
      crop = cv2.copyMakeBorder(crop, 0, -h % k, 0, -w % k, cv2.BORDER_REPLICATE)
    crop = cv2.resize(crop, (crop.shape[1] // k, crop.shape[0] // k), interpolation=cv2.INTER_AREA)
  doubled = (round(2 * size * crop.shape[1] * k / w), round(2 * size * crop.shape[0] * k / h))
  crop = cv2.resize(crop, doubled, interpolation=cv2.INTER_CUBIC)[:2 * size, :2 * size]
  return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def _grey(array: np.ndarray) -> np.ndarray:
  return cv2.cvtColor(array, cv2.COLOR_RGB2GRAY)  # ITU-R 601-2 luma, as PIL's 'L'


def _lut(array: np.ndarray, fn) -> np.ndarray:
  # Truncated, as PIL's blend stores its float result (each rounding up would brighten a view by
  # half a grey level per enhancer).
  table = np.clip(np.floor(fn(np.arange(256, dtype=np.float32))), 0, 255).astype(np.uint8)
  return cv2.LUT(array, table)


def adjust_brightness(array: np.ndarray, factor: float) -> np.ndarray:
  """PIL's Brightness: a blend with black, x * factor."""
  return _lut(array, lambda x: x * factor)


def adjust_contrast(array: np.ndarray, factor: float) -> np.ndarray:
  """PIL's Contrast: a blend with the image's mean grey, rounded as PIL rounds it."""
  mean = int(_grey(array).mean() + 0.5)
  return _lut(array, lambda x: mean + factor * (x - mean))


def adjust_saturation(array: np.ndarray, factor: float) -> np.ndarray:
  """PIL's Color: a blend with the grey image, grey + factor * (x - grey)."""
  grey = cv2.cvtColor(_grey(array), cv2.COLOR_GRAY2RGB)
  # addWeighted rounds to nearest; the offset makes it truncate as PIL's blend does (a value
  # within 0.001 below an integer rounds up, which no statistic sees).
  return cv2.addWeighted(array, factor, grey, 1.0 - factor, -0.499)


def adjust_hue(array: np.ndarray, factor: float) -> np.ndarray:
  """torchvision's adjust_hue: the 8-bit HSV hue shifted by int(factor * 255), wrapping."""
  hsv = cv2.cvtColor(array, cv2.COLOR_RGB2HSV_FULL)
  hsv[..., 0] += np.uint8(int(factor * 255) % 256)  # uint8 addition wraps mod 256
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def apply_jitter(array: np.ndarray, strengths, factors, order) -> np.ndarray:
  """ColorJitter with drawn `factors` in drawn `order` (views.draw_jitter); strength 0 skips."""
  for op in order:
    if strengths[op]:
      array = _JITTER_OPS[op](array, factors[op])
  return array


def grayscale(array: np.ndarray) -> np.ndarray:
  return cv2.cvtColor(_grey(array), cv2.COLOR_GRAY2RGB)


def gaussian_blur(array: np.ndarray, sigma: float, size: int) -> np.ndarray:
  """torchvision's gaussian_blur (reflect padding) with a `size`-tap kernel of `sigma`."""
  # Reflect-101 needs a side longer than the radius; smaller crops mirror with the edge repeated.
  border = cv2.BORDER_REFLECT_101 if min(array.shape[:2]) > size // 2 else cv2.BORDER_REFLECT
  return cv2.GaussianBlur(array, (size, size), sigmaX=sigma, sigmaY=sigma, borderType=border)

