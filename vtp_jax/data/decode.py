"""Raw record -> clean (key, RGB uint8 image, caption, label), or a named reason to skip it.

Every source (vtp_jax/data/sources.py) yields raw, undecoded records; this file owns turning one
into something the views can use. Anything wrong with a record raises `BadRecord(reason)` with a
reason from `SKIP_REASONS`, which the pipeline counts instead of crashing: web-scale image-caption
sets always hold some broken files.

Images decode with Pillow (JPEG, PNG, WebP, plus GIF/BMP/TIFF which cost nothing to allow).
Greyscale, 16-bit, CMYK (Pillow undoes Adobe's inverted CMYK), palette and alpha images all become
RGB; alpha, including palette/RGB `transparency`, is composited on white. Tiny images are kept:
the views upscale them.
"""

import io

import numpy as np
from PIL import Image, ImageFile, ImageOps

SKIP_REASONS = ('missing_image', 'missing_caption', 'empty_caption', 'undecodable_image')

# Pillow's own bomb guard warns at MAX_IMAGE_PIXELS and raises at twice that; we refuse at this
# limit ourselves so a hostile header never allocates gigabytes inside a data worker.
MAX_PIXELS = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS (about 0.25 GiB of RGBA)

# JPEG, its multi-picture variant (some cameras), PNG and WebP are what img2dataset writes.
# Image.init() registers every plugin; without it `formats=` fails on the lazily loaded ones.
Image.init()
_FORMATS = tuple(f for f in ('JPEG', 'MPO', 'PNG', 'WEBP', 'GIF', 'BMP', 'TIFF') if f in Image.OPEN)


class BadRecord(Exception):
  """A record the pipeline must skip; `reason` is one of SKIP_REASONS, `detail` says why."""

  def __init__(self, reason: str, detail: str = ''):
    if reason not in SKIP_REASONS:
      raise ValueError(f'BadRecord reason {reason!r} is not one of {SKIP_REASONS}.')
    super().__init__(f'{reason}: {detail}' if detail else reason)
    self.reason = reason
    self.detail = detail

  def __reduce__(self):
    # Keeps (reason, detail) when the exception crosses a worker-process boundary.
    return (BadRecord, (self.reason, self.detail))


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
  """(H, W, 4) uint8 straight alpha -> (H, W, 3) uint8 over a white background."""
  rgb = rgba[..., :3].astype(np.float32)
  alpha = rgba[..., 3:4].astype(np.float32) / 255.0
  out = rgb * alpha + 255.0 * (1.0 - alpha)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image) -> np.ndarray:
  """Any Pillow mode -> (H, W, 3) uint8 RGB."""
  mode = img.mode
  if mode.startswith('I;16') or mode == 'I':
    # 16-bit greyscale: convert('L') would clip at 255 instead of rescaling, so do it by hand.
    # Mode 'I' (32-bit, e.g. TIFF) says nothing of the bit depth: values above 255 mean 16 bits.
    grey = np.asarray(img).astype(np.int64)
    if mode != 'I' or grey.max(initial=0) > 255:
      grey = grey >> 8
    grey = np.clip(grey, 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  if mode == 'F':
    grey = np.clip(np.rint(np.asarray(img, np.float32)), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  has_alpha = mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in img.info
  if has_alpha:
    # P/L/RGB images with a tRNS chunk carry alpha in info['transparency']; RGBA conversion
    # applies it, so one composite path covers every alpha flavour.
    return _composite_on_white(np.asarray(img.convert('RGBA')))
  if mode != 'RGB':
    img = img.convert('RGB')  # L, 1, P, CMYK (incl. Adobe-inverted), YCbCr, LAB, HSV
  return np.asarray(img)


def decode_image(data: bytes) -> np.ndarray:
  """Encoded image bytes -> (H, W, 3) uint8 RGB; raises BadRecord('undecodable_image')."""
  if ImageFile.LOAD_TRUNCATED_IMAGES:
    # Someone enabled Pillow's global "pad truncated images with grey": we would silently train
    # on half-grey pictures instead of skipping them.
    raise RuntimeError('PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; vtp_jax needs '
                       'it False so truncated images are detected and skipped. Find what set it.')
  try:
    img = Image.open(io.BytesIO(data), formats=_FORMATS)
    width, height = img.size
    if width * height > MAX_PIXELS:
      raise BadRecord('undecodable_image',
                      f'decompression bomb guard: {width}x{height} exceeds {MAX_PIXELS} pixels')
    img.load()  # Image.open is lazy: force the full decode so truncation surfaces here.
    try:
      img = ImageOps.exif_transpose(img)
    except Exception:  # pylint: disable=broad-except
      pass  # a malformed EXIF block only costs us the orientation, not the image
    rgb = _to_rgb(img)
  except BadRecord:
    raise
  except Image.DecompressionBombError as e:
    raise BadRecord('undecodable_image', f'decompression bomb guard: {e}') from None
  except Exception as e:  # pylint: disable=broad-except
    # Pillow raises OSError, SyntaxError, ValueError, struct.error, ... on corrupt input.
    raise BadRecord('undecodable_image', f'{type(e).__name__}: {e}') from None
  if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
    raise BadRecord('undecodable_image', f'decoded to shape {rgb.shape}')
  return np.ascontiguousarray(rgb, dtype=np.uint8)


def _array_to_rgb(image: np.ndarray) -> np.ndarray:
  """An already-decoded array (TFDS decodes some features itself) -> (H, W, 3) uint8 RGB."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise BadRecord('undecodable_image', f'decoded image has dtype {image.dtype}, expected uint8')
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
    raise BadRecord('undecodable_image', f'decoded image has shape {image.shape}')
  channels = image.shape[-1]
  if channels == 1:
    return np.repeat(image, 3, axis=-1)
  if channels == 2:  # grey + alpha
    grey = np.repeat(image[..., :1], 3, axis=-1)
    return _composite_on_white(np.concatenate([grey, image[..., 1:]], axis=-1))
  if channels == 3:
    return np.ascontiguousarray(image)
  if channels == 4:
    return _composite_on_white(image)
  raise BadRecord('undecodable_image', f'decoded image has {channels} channels')


def decode_record(raw: dict) -> dict:
  """A raw source record -> {'key', 'image': uint8 (H, W, 3), 'caption': str, 'label': int}.

  `raw['image']` is encoded bytes (JPEG/PNG/WebP/...), or an already-decoded uint8 array of shape
  (H, W), (H, W, 1|2|3|4) (TFDS sources whose image feature is not skip-decodable), or None.
  `raw['caption']` is str, UTF-8 bytes, or None. Checks run cheapest first, so a record with
  several faults reports the first of: missing_image, missing_caption, empty_caption,
  undecodable_image.

  Raises:
    BadRecord: the record must be skipped; `.reason` names why.
  """
  image, caption = raw.get('image'), raw.get('caption')
  if image is None:
    raise BadRecord('missing_image', str(raw.get('key')))
  if caption is None:
    raise BadRecord('missing_caption', str(raw.get('key')))
  if isinstance(caption, (bytes, np.bytes_)):
    caption = bytes(caption).decode('utf-8', errors='replace')
  caption = str(caption).strip()
  if not caption:
    raise BadRecord('empty_caption', str(raw.get('key')))
  if isinstance(image, (bytes, bytearray, memoryview, np.bytes_)):
    rgb = decode_image(bytes(image))
  else:
    rgb = _array_to_rgb(image)
  label = raw.get('label', -1)
  return {'key': raw.get('key'), 'image': rgb, 'caption': caption,
          'label': -1 if label is None else int(label)}
