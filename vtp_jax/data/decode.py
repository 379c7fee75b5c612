"""Raw record -> clean (key, RGB uint8 image, caption, label), or a named reason to skip it.

Every source (vtp_jax/data/sources.py) yields raw, undecoded records; this file owns turning one
into something the views can use. Anything wrong with a record raises `BadRecord(reason)` with a
reason from `SKIP_REASONS`, which the pipeline counts instead of crashing: web-scale image-caption
sets always hold some broken files.

Images decode with Pillow (JPEG, PNG, WebP, plus GIF/BMP/TIFF which cost nothing to allow).
Greyscale, 16-bit, CMYK (Pillow undoes Adobe's inverted CMYK), palette and alpha images all become
RGB; alpha, including palette/RGB `transparency`, is composited on white. Tiny images are kept:
the views upscale them.

With data.decode='scaled' (the pipeline passes `reduction_for`) a JPEG is decoded at reduced DCT
scale (libjpeg's 1/2, 1/4, 1/8, through Pillow's `draft`): the caller sees the header's size (EXIF
orientation applied) before any pixel is decoded and names the reduction its crops allow
(views.decode_reduction). Decode time and every later resize shrink with the pixel count; the
record keeps the stored size (`source_hw`) so the views draw the same crops as on the full image
(tests/data/test_decode.py compares both paths on photographs). Other formats are read whole.
"""

import io

import numpy as np
import simplejpeg
from PIL import Image, ImageFile, ImageOps

SKIP_REASONS = ('missing_image', 'missing_caption', 'empty_caption', 'undecodable_image')

# Pillow's own bomb guard warns at MAX_IMAGE_PIXELS and raises at twice that; we refuse at this
# limit ourselves so a hostile header never allocates gigabytes inside a data worker.
MAX_PIXELS = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS (about 0.25 GiB of RGBA)

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that exif_transpose turns by 90 degrees

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
  return decode_image_scaled(data)[0]


def _orientation(img: Image.Image) -> int | None:
  """The EXIF orientation (1 where none is stored); None where the EXIF block is malformed."""
  try:
    return img.getexif().get(_EXIF_ORIENTATION, 1)
  except Exception:  # pylint: disable=broad-except
    return None


def _oriented_hw(img: Image.Image, orientation: int | None) -> tuple[int, int]:
  """(height, width) the image will have after exif_transpose (which skips malformed EXIF too)."""
  width, height = img.size
  return (width, height) if orientation in _TRANSPOSED else (height, width)


def decode_image_scaled(data: bytes, reduction_for=None) -> tuple[np.ndarray, tuple[int, int]]:
  """(RGB uint8 (h, w, 3), the stored image's oriented (H, W)); raises BadRecord.

  `reduction_for(source_hw) -> r` (1, 2, 4 or 8) names the DCT reduction a JPEG may be decoded
  at; without it, or for other formats, the image is decoded whole and (h, w) == (H, W).
  """
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
    orientation = _orientation(img)
    source_hw = _oriented_hw(img, orientation)
    reduction = 1
    if reduction_for is not None and img.format in ('JPEG', 'MPO'):
      reduction = reduction_for(source_hw)
    if reduction_for is not None and _plain_jpeg(img, orientation):
      # libjpeg-turbo through simplejpeg: the same decoder as Pillow's (bit for bit, reduced or
      # whole) with less work around it, 2.0 against 3.3 ms for a 512 px JPEG (docs/scaling.md,
      # 'The host keeps up'). min_* of ceil(side / r) selects the scale r; strict raises on
      # truncation.
      rgb = simplejpeg.decode_jpeg(data, colorspace='RGB', min_height=-(-height // reduction),
                                   min_width=-(-width // reduction))
      return _scaled_result(rgb, source_hw, reduction)
    if reduction > 1:
      # draft() picks the largest DCT scale whose output is at least the requested size; asking
      # for floor(side / r) selects exactly r. Mode None keeps the colour space (CMYK stays
      # CMYK for _to_rgb to convert).
      img.draft(None, (max(1, width // reduction), max(1, height // reduction)))
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
  return _scaled_result(rgb, source_hw, reduction)


def _plain_jpeg(img: Image.Image, orientation: int | None) -> bool:
  """A baseline or progressive YCbCr/grey JPEG without an EXIF turn: what simplejpeg decodes
  exactly as Pillow does; CMYK, turned, malformed-EXIF and other images take Pillow's path."""
  return img.format == 'JPEG' and img.mode in ('RGB', 'L') and orientation == 1


def _scaled_result(rgb: np.ndarray, source_hw, reduction: int):
  if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
    raise BadRecord('undecodable_image', f'decoded to shape {rgb.shape}')
  if reduction == 1 or rgb.shape[:2] != tuple(-(-s // reduction) for s in source_hw):
    # Whole, or not the reduction asked for (a draft refused, an EXIF turn not applied): the
    # crops are then drawn on the pixels as decoded, as on the full path.
    source_hw = rgb.shape[:2]
  return np.ascontiguousarray(rgb, dtype=np.uint8), tuple(source_hw)


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


def decode_record(raw: dict, reduction_for=None) -> dict:
  """A raw source record -> {'key', 'image': uint8 (H, W, 3), 'caption': str, 'label': int}.

  `raw['image']` is encoded bytes (JPEG/PNG/WebP/...), or an already-decoded uint8 array of shape
  (H, W), (H, W, 1|2|3|4) (TFDS sources whose image feature is not skip-decodable), or None.
  `raw['caption']` is str, UTF-8 bytes, or None. Checks run cheapest first, so a record with
  several faults reports the first of: missing_image, missing_caption, empty_caption,
  undecodable_image. `reduction_for` as in decode_image_scaled; the record's 'source_hw' is the
  stored image's (H, W), which the views draw crops in.

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
    rgb, source_hw = decode_image_scaled(bytes(image), reduction_for)
  else:
    rgb = _array_to_rgb(image)
    source_hw = rgb.shape[:2]
  label = raw.get('label', -1)
  return {'key': raw.get('key'), 'image': rgb, 'source_hw': tuple(source_hw), 'caption': caption,
          'label': -1 if label is None else int(label)}
