"""decode_image / decode_record: every colour mode becomes the right RGB; bad records say why."""

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from vtp_jax.data import decode
from vtp_jax.data.decode import BadRecord


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kw)
  return buf.getvalue()


def _solid(img_bytes, expected, tol):
  out = decode.decode_image(img_bytes)
  assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[-1] == 3
  np.testing.assert_allclose(out.reshape(-1, 3).astype(int),
                             np.broadcast_to(expected, (out.shape[0] * out.shape[1], 3)), atol=tol)
  return out


def test_truncated_images_are_not_globally_tolerated():
  assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_cmyk_jpeg_becomes_rgb():
  # Pillow writes CMYK JPEGs Adobe-style (inverted); the decoder must undo that, not show negatives.
  # CMYK -> RGB by hand: R = 255 (1 - C)(1 - K), etc.
  for cmyk in [(0, 255, 255, 0), (0, 0, 0, 128), (255, 0, 0, 0)]:
    c, m, y, k = (v / 255 for v in cmyk)
    expected = [255 * (1 - c) * (1 - k), 255 * (1 - m) * (1 - k), 255 * (1 - y) * (1 - k)]
    _solid(_encode(Image.new('CMYK', (16, 16), cmyk), 'JPEG', quality=95), expected, tol=6)


def test_greyscale_png_8_and_16_bit():
  _solid(_encode(Image.new('L', (9, 7), 77), 'PNG'), [77, 77, 77], tol=0)
  img16 = Image.fromarray(np.full((6, 5), 40000, np.uint16))
  _solid(_encode(img16, 'PNG'), [40000 // 256] * 3, tol=0)  # rescaled, not clipped at 255


def test_palette_png_with_transparency_composites_on_white():
  img = Image.new('P', (8, 8), 0)
  img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
  pixels = np.zeros((8, 8), np.uint8)
  pixels[:, 4:] = 1
  img.putdata(pixels.reshape(-1).tolist())
  out = decode.decode_image(_encode(img, 'PNG', transparency=0))
  np.testing.assert_array_equal(out[:, :4], 255)  # palette entry 0 is transparent
  np.testing.assert_array_equal(out[:, 4:], np.broadcast_to([200, 100, 50], (8, 4, 3)))


def test_rgba_and_la_composite_on_white():
  alpha = 128 / 255
  expected = [100 * alpha + 255 * (1 - alpha), 50 * alpha + 255 * (1 - alpha),
              200 * alpha + 255 * (1 - alpha)]
  _solid(_encode(Image.new('RGBA', (5, 5), (100, 50, 200, 128)), 'PNG'), expected, tol=0.51)
  _solid(_encode(Image.new('LA', (5, 5), (60, 0)), 'PNG'), [255, 255, 255], tol=0)


def test_webp_lossless_and_lossy():
  img = Image.new('RGB', (16, 16), (12, 200, 34))
  _solid(_encode(img, 'WEBP', lossless=True), [12, 200, 34], tol=0)
  _solid(_encode(img, 'WEBP', quality=90), [12, 200, 34], tol=8)


def test_jpeg_rgb_pixels_and_tiny_image_kept():
  out = _solid(_encode(Image.new('RGB', (10, 10), (250, 10, 120)), 'JPEG', quality=95),
               [250, 10, 120], tol=6)
  assert out.shape == (10, 10, 3)


def test_truncated_and_garbage_images_are_undecodable():
  rng = np.random.default_rng(0)
  noisy = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
  jpeg = _encode(noisy, 'JPEG')
  for bad in [jpeg[:len(jpeg) // 2], b'not an image at all', b'', _encode(noisy, 'PNG')[:300]]:
    with pytest.raises(BadRecord) as info:
      decode.decode_image(bad)
    assert info.value.reason == 'undecodable_image'


def _png_with_size(width, height):
  """A valid 1x1 PNG whose IHDR claims width x height (CRC fixed): a decompression bomb header."""
  data = bytearray(_encode(Image.new('RGB', (1, 1)), 'PNG'))
  ihdr = 8 + 8  # signature, then length + 'IHDR'
  data[ihdr:ihdr + 8] = struct.pack('>II', width, height)
  crc = zlib.crc32(bytes(data[12:ihdr + 13]))
  data[ihdr + 13:ihdr + 17] = struct.pack('>I', crc)
  return bytes(data)


@pytest.mark.filterwarnings('ignore::PIL.Image.DecompressionBombWarning')
@pytest.mark.parametrize('side', [10000, 20000])  # above our limit; above Pillow's hard limit
def test_decompression_bomb_is_refused(side):
  with pytest.raises(BadRecord) as info:
    decode.decode_image(_png_with_size(side, side))
  assert info.value.reason == 'undecodable_image' and 'bomb' in info.value.detail


def test_decode_record_reasons_and_order():
  jpeg = _encode(Image.new('RGB', (4, 4), (0, 0, 255)), 'JPEG')
  cases = [({'image': None, 'caption': 'x'}, 'missing_image'),
           ({'image': None, 'caption': None}, 'missing_image'),
           ({'image': jpeg, 'caption': None}, 'missing_caption'),
           ({'image': jpeg, 'caption': ' \n\t '}, 'empty_caption'),
           ({'image': jpeg, 'caption': b''}, 'empty_caption'),
           ({'image': b'junk', 'caption': ''}, 'empty_caption'),  # cheaper check reported first
           ({'image': b'junk', 'caption': 'a cat'}, 'undecodable_image')]
  for raw, reason in cases:
    with pytest.raises(BadRecord) as info:
      decode.decode_record({'key': 'k', 'label': -1, **raw})
    assert info.value.reason == reason, raw
    assert info.value.reason in decode.SKIP_REASONS


def test_decode_record_good_bytes_and_arrays():
  jpeg = _encode(Image.new('RGB', (4, 6), (0, 0, 255)), 'JPEG')
  raw = {'key': 'k', 'image': jpeg, 'caption': b' a blue \xc3\xa9 ', 'label': 7}
  out = decode.decode_record(raw)
  assert out['key'] == 'k' and out['caption'] == 'a blue \u00e9' and out['label'] == 7
  assert out['image'].shape == (6, 4, 3)
  grey = decode.decode_record({'key': 'g', 'image': np.full((3, 2), 9, np.uint8), 'caption': 'c'})
  np.testing.assert_array_equal(grey['image'], np.full((3, 2, 3), 9))
  assert grey['label'] == -1
  rgba = np.zeros((2, 2, 4), np.uint8)  # fully transparent -> white
  np.testing.assert_array_equal(
      decode.decode_record({'key': 'a', 'image': rgba, 'caption': 'c', 'label': 1})['image'], 255)
  with pytest.raises(BadRecord) as info:
    decode.decode_record({'key': 'f', 'image': np.zeros((2, 2, 3), np.float32), 'caption': 'c'})
  assert info.value.reason == 'undecodable_image'


def test_bad_record_pickles_and_rejects_unknown_reasons():
  err = pickle.loads(pickle.dumps(BadRecord('empty_caption', 'shard/1')))
  assert err.reason == 'empty_caption' and err.detail == 'shard/1'
  with pytest.raises(ValueError):
    BadRecord('not_a_reason')



# --- Reduced (DCT-scaled) JPEG decode against the full decode, on photographs ------------------


def _photos():
  """scikit-image photographs as JPEGs: retina at its own 1411 px, two others upscaled to 1024."""
  from skimage import data as skdata
  out = {'retina': Image.fromarray(skdata.retina())}
  for name in ('astronaut', 'coffee'):
    image = Image.fromarray(getattr(skdata, name)())
    f = 1024 / max(image.size)
    out[name] = image.resize((round(image.width * f), round(image.height * f)), Image.BICUBIC)
  return {k: _encode(v, 'JPEG', quality=90) for k, v in out.items()}


def test_scaled_decode_of_jpegs_only_and_its_source_size():
  astronaut = _photos()['astronaut']
  full = decode.decode_image(astronaut)
  small, source_hw = decode.decode_image_scaled(astronaut, lambda hw: 2)
  assert full.shape == (1024, 1024, 3) and small.shape == (512, 512, 3)
  assert source_hw == (1024, 1024)
  # The reduced decode is the picture at half size: close to a box-filtered full decode.
  box = full.reshape(512, 2, 512, 2, 3).astype(np.float32).mean((1, 3))
  assert np.abs(small.astype(np.float32) - box).mean() < 2.0
  cmyk = _encode(Image.fromarray(full).convert('CMYK'), 'JPEG')
  assert np.abs(decode.decode_image_scaled(cmyk, lambda hw: 2)[0].astype(np.float32)
                - box).mean() < 3.0
  png = _encode(Image.fromarray(full), 'PNG')  # no reduced decode: whole, and not even asked
  out, hw = decode.decode_image_scaled(png, lambda hw: 1 / 0)
  assert out.shape == (1024, 1024, 3) and hw == (1024, 1024)
  # EXIF orientation 6 (turned 90 degrees): the size handed over and kept is the turned one.
  wide = Image.fromarray(full[:512])
  exif = Image.Exif()
  exif[0x0112] = 6
  buf = io.BytesIO()
  wide.save(buf, 'JPEG', exif=exif)
  asked = []
  out, hw = decode.decode_image_scaled(buf.getvalue(), lambda hw: asked.append(hw) or 4)
  assert asked == [(1024, 512)] and hw == (1024, 512) and out.shape == (256, 128, 3)


def _stats(array):
  a = array.astype(np.float32)
  sharp = np.abs(np.diff(a, axis=-2)).mean() + np.abs(np.diff(a, axis=-3)).mean()
  return a.mean(), a.std(), sharp


@pytest.mark.parametrize('backend', ['pillow', 'opencv'])
def test_views_of_the_scaled_decode_match_the_full_decode_on_photographs(backend):
  """Same seeds, the reference path (full decode, views in Pillow) against the scaled decode with
  views in `backend` (data.views_backend; 'opencv' is the default): the crops are drawn on the
  same source size (so the boxes are the same), and the outputs' brightness, contrast, sharpness
  and pixels agree."""
  from conftest import micro_config
  from vtp_jax.data import views
  config = micro_config()
  config.data.update(image_size=256, global_crop_size=224, local_crop_size=96, n_local_crops=8,
                     clip_crop_scale=(0.9, 1.0), rec_crop_scale=(0.8, 1.0),
                     global_crop_scale=(0.32, 1.0), local_crop_scale=(0.05, 0.32),
                     crop_ratio=(3 / 4, 4 / 3))
  branches = ('clip', 'rec', 'ssl')
  reduced = 0
  for name, data in _photos().items():
    full = decode.decode_image(data)
    for seed in range(3):
      rngs = lambda: {b: np.random.default_rng([seed, i]) for i, b in enumerate(branches)}
      small, hw = decode.decode_image_scaled(data, lambda hw: views.decode_reduction(
          hw, views.view_boxes(hw, config, branches, rngs())))
      assert hw == full.shape[:2]
      reduced += small.shape[0] < full.shape[0]
      outs = []
      for image in (views.as_pil(full), small if backend == 'opencv' else views.as_pil(small)):
        r = rngs()
        outs.append([views.clip_view(image, config, r['clip'], hw),
                     views.rec_view(image, config, r['rec'], hw),
                     *views.ssl_views(image, config, r['ssl'], hw)])
      for x, y in zip(*outs):
        assert x.shape == y.shape
        (ma, sa, ha), (mb, sb, hb) = _stats(x), _stats(y)
        assert abs(ma - mb) < 1.0 and abs(sa - sb) < 1.0, (name, ma, mb, sa, sb)
        assert abs(ha - hb) < 0.08 * ha + 0.3, (name, ha, hb)  # not softer nor sharper
        assert np.abs(x.astype(np.float32) - y.astype(np.float32)).mean() < 3, name
  assert reduced >= 5  # most of the 9 decodes took the reduced path


def test_scaled_decode_through_libjpeg_turbo_equals_pillows_draft_and_refuses_truncation():
  """Plain JPEGs on the scaled path go through simplejpeg: the pixels Pillow decodes (whole or with
  draft), bit for bit, progressive and greyscale too; a truncated file is a bad record, not grey
  padding."""
  from skimage import data as skdata
  photo = Image.fromarray(skdata.astronaut())
  files = {'baseline': _encode(photo, 'JPEG', quality=90),
           'progressive': _encode(photo, 'JPEG', quality=90, progressive=True),
           'grey': _encode(photo.convert('L'), 'JPEG', quality=90)}
  for name, data in files.items():
    for r in (1, 2, 4, 8):
      got, hw = decode.decode_image_scaled(data, lambda hw, r=r: r)
      assert hw == (512, 512) and got.shape == (512 // r, 512 // r, 3), name
      pil = Image.open(io.BytesIO(data))
      if r > 1:
        pil.draft(None, (512 // r, 512 // r))
      np.testing.assert_array_equal(got, np.asarray(pil.convert('RGB')), err_msg=name)
  with pytest.raises(BadRecord, match='undecodable_image'):
    decode.decode_image_scaled(files['baseline'][:len(files['baseline']) // 2], lambda hw: 2)
