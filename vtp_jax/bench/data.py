"""Benchmark the input pipeline's full three-view path and print JSON images/s.

  python -m vtp_jax.bench.data --config=configs/vtp_tiny.py --workers=2 [--batches=20]
      [--synthetic=512 --synthetic_side=256]   # in-memory JPEGs instead of config.data.source
      [--photos=128 [--photos_side=1024]]      # scikit-image's photographs as JPEGs (0 = own size)
      [--decode=full:pillow,scaled:opencv]     # data.decode[:data.views_backend], one after another

Every image goes through decode, the CLIP view, tokenisation and (for its sub-batch share) the SSL
multi-crop with masks and the reconstruction view, exactly as training sees it. The first batch
is not timed (worker start-up and thread warm-up); images/s counts CLIP examples, i.e. source
images, per second of wall time in this process; with --workers=0, `images_per_cpu_s` counts them
per CPU-second of the process (every thread), the per-core rate a host's core count multiplies.
One JSON line is printed per --decode entry, all on the same records in the same process, so the
reference path ('full:pillow': whole JPEGs, views in Pillow) and the default ('scaled:opencv') are
compared on equal terms; an entry without ':' keeps the config's views backend.
"""

import io
import json
import time

import numpy as np
from PIL import Image


class SyntheticSource:
  """`n` JPEG records of smooth random scenes at side x side (compress like photos, not noise)."""

  def __init__(self, n: int, side: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    self._records = []
    yy, xx = np.mgrid[0:side, 0:side] / side
    for i in range(n):
      a, b, c = rng.uniform(0, 6, 3)
      base = np.stack([np.sin(a * xx + b * yy + c + k) for k in range(3)], -1) * 100 + 128
      image = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
      buf = io.BytesIO()
      Image.fromarray(image).save(buf, 'JPEG', quality=90)
      self._records.append({'key': f'synthetic/{i}', 'image': buf.getvalue(),
                            'caption': f'a synthetic picture number {i} of waves', 'label': -1})

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    return self._records[index % len(self._records)]

  def __repr__(self):
    return f'SyntheticSource(n={len(self._records)})'


# scikit-image's bundled colour photographs (300x451 to 1411x1411), no download needed.
PHOTO_NAMES = ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field',
               'immunohistochemistry', 'retina', 'cat')


class PhotoSource(SyntheticSource):
  """`n` JPEG records (quality 90) cycling over scikit-image's photographs, at their own size or
  resized (bicubic) so the longest side is `side`: real image statistics for the decode path."""

  def __init__(self, n: int, side: int = 0):  # pylint: disable=super-init-not-called
    from skimage import data as skdata  # pylint: disable=g-import-not-at-top
    photos = []
    for name in PHOTO_NAMES:
      image = Image.fromarray(getattr(skdata, name)()).convert('RGB')
      if side:
        factor = side / max(image.size)
        image = image.resize((round(image.width * factor), round(image.height * factor)),
                             Image.BICUBIC)
      buf = io.BytesIO()
      image.save(buf, 'JPEG', quality=90)
      photos.append((name, buf.getvalue()))
    self._records = [{'key': f'photo/{i}/{photos[i % len(photos)][0]}',
                      'image': photos[i % len(photos)][1], 'caption': f'a photograph number {i}',
                      'label': -1} for i in range(n)]


def bench(config, *, workers: int, batches: int, source=None, decode: str | None = None) -> dict:
  """`decode`: 'MODE' or 'MODE:BACKEND' (data.decode, data.views_backend); None = the config's."""
  from vtp_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.data.worker_count = workers
  if decode:
    config.data.decode, _, backend = decode.partition(':')
    if backend:
      config.data.views_backend = backend
  config.data.num_epochs = 0
  it = pipeline.make_iterator(config, process_index=0, process_count=1, source=source)
  try:
    first = next(it)
    n_local = len(first['labels'])
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
      next(it)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
  finally:
    if hasattr(it, 'close'):
      it.close()
  return {'decode': config.data.get('decode', 'full'),
          'views_backend': config.data.get('views_backend', 'opencv'),
          'workers': workers, 'batches': batches,
          'batch_size': n_local,
          'image_size': config.data.image_size, 'global_crop_size': config.data.global_crop_size,
          'local_crop_size': config.data.local_crop_size,
          'n_local_crops': config.data.n_local_crops,
          'branches': [b for b in ('clip', 'ssl', 'rec') if b in first],
          'seconds': elapsed, 'images_per_s': n_local * batches / elapsed,
          # CPU seconds of this process (all its threads): images per core-second, which a shared
          # or busy host does not distort. With workers > 0 the work is in the workers: None.
          'cpu_seconds': cpu if not workers else None,
          'images_per_cpu_s': n_local * batches / cpu if not workers and cpu else None}


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if f.photos:
    source = PhotoSource(f.photos, f.photos_side)
  else:
    source = SyntheticSource(f.synthetic, f.synthetic_side) if f.synthetic else None
  for mode in (f.decode or [None]):
    result = bench(f.config, workers=f.workers, batches=f.batches, source=source, decode=mode)
    result['source'] = repr(source) if source is not None else f.config.data.source
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'config file', lock_config=False)
  flags.DEFINE_integer('workers', 0, 'Grain worker processes (overrides data.worker_count)')
  flags.DEFINE_integer('batches', 10, 'timed batches after the first')
  flags.DEFINE_integer('synthetic', 0, 'use this many in-memory JPEGs instead of data.source')
  flags.DEFINE_integer('synthetic_side', 256, 'side of the synthetic JPEGs in pixels')
  flags.DEFINE_integer('photos', 0, 'use this many JPEGs of scikit-image photographs instead')
  flags.DEFINE_integer('photos_side', 0, 'longest side of the photographs; 0 = their own size')
  flags.DEFINE_list('decode', [], 'data.decode modes to measure in turn (full, scaled), each '
                    "optionally :views_backend (opencv, pillow); empty = the config's")
  flags.mark_flags_as_required(['config'])
  app.run(main)
