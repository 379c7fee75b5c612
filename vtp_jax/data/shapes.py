"""vtp_shapes: the embedded, offline image-caption dataset with measurable labels.

Each example is rendered deterministically from (split, index): 1 to 3 coloured shapes over a
desaturated, textured background, with a caption generated from the scene. The largest object is
at least ~2x the area of any other and its colour and shape are the labels (`label = colour *
len(SHAPES) + shape`), so a model's zero-shot and linear-probe accuracy over `class_names()` says
whether it learned to see and to read.

The TFDS builder `VtpShapes` (name 'vtp_shapes') writes array_record files with no network;
`prepare(data_dir, num_train, num_val, image_size)` builds it. Sizes live in the builder config
name ('train20000_val2000_px64'), so differently sized preparations sit side by side in data_dir.
data_dir may be a bucket (`gs://BUCKET/...`): TFDS reads it there itself, and `prepare` renders
into a local temporary folder and uploads the result (ArrayRecord cannot write to a bucket).
"""

from concurrent import futures
import contextlib
import dataclasses
import fcntl
import functools
import io
import multiprocessing
import os
import tempfile
import time
import zlib

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image, ImageDraw

from vtp_jax import paths

# Eight hues spaced around the colour wheel, saturated so they stand out on the grey-ish
# backgrounds below.
COLOURS = ('red', 'orange', 'yellow', 'green', 'cyan', 'blue', 'purple', 'pink')
_RGB = np.array([(220, 30, 30), (250, 135, 10), (245, 220, 20), (35, 165, 45),
                 (20, 205, 225), (30, 65, 225), (135, 40, 190), (250, 105, 185)], np.float32)
# Six outlines that stay distinct under any rotation at 64 px (no diamond: it is a turned square;
# no hexagon: at 64 px it reads as a circle).
SHAPES = ('circle', 'square', 'triangle', 'star', 'cross', 'heart')
# Rotation range in degrees per shape: hearts stay roughly upright so they still read as hearts.
_MAX_ROTATION = {'circle': 0, 'square': 45, 'triangle': 180, 'star': 180, 'cross': 45, 'heart': 25}

SUPERSAMPLE = 4  # object masks are drawn at 4x and box-filtered down: anti-aliased edges
# sqrt(area) of the largest object as a fraction of the image side, for scenes of 1, 2, 3 objects.
_LARGEST_SIDE = ((0.36, 0.5), (0.32, 0.42), (0.3, 0.38))
_OTHER_RATIO = (0.3, 0.64)  # sqrt(area) of the others relative to the largest: area ratio >= 2.4
_SPLIT_IDS = {'train': 1, 'validation': 2}


def class_names() -> list:
  """'red circle'-style names indexed by label = colour * len(SHAPES) + shape."""
  return [f'{c} {s}' for c in COLOURS for s in SHAPES]


def label_factors() -> dict:
  """name -> (number of values, labels -> factor values) for the label's two factors, colour and
  shape; an unlabelled -1 stays -1. Evaluations report each factor, so a model that knows colour
  but not shape shows it."""
  n = len(SHAPES)

  def factor(fn):
    return lambda labels: np.where(np.asarray(labels) >= 0, fn(np.asarray(labels)), -1)
  return {'colour': (len(COLOURS), factor(lambda y: y // n)),
          'shape': (n, factor(lambda y: y % n))}


def _unit_area(points: np.ndarray) -> np.ndarray:
  """Centre a polygon on its centroid and scale it to area 1 (shoelace formula)."""
  x, y = points[:, 0], points[:, 1]
  area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
  points = points - points.mean(0)
  return points / np.sqrt(area)


def _templates() -> dict:
  t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
  star_r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
  star_a = np.arange(10) * np.pi / 5 - np.pi / 2
  ht = np.linspace(0, 2 * np.pi, 96, endpoint=False)
  heart_y = 13 * np.cos(ht) - 5 * np.cos(2 * ht) - 2 * np.cos(3 * ht) - np.cos(4 * ht)
  heart = np.stack([16 * np.sin(ht) ** 3, -heart_y], -1)  # image y points down
  a, b = 1.0, 0.32  # plus sign: arm half-length and half-width
  cross = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b),
           (-a, -b), (-b, -b)]
  tri_a = np.arange(3) * 2 * np.pi / 3 - np.pi / 2
  return {
      'circle': _unit_area(np.stack([np.cos(t), np.sin(t)], -1)),
      'square': _unit_area(np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], np.float64)),
      'triangle': _unit_area(np.stack([np.cos(tri_a), np.sin(tri_a)], -1)),
      'star': _unit_area(np.stack([star_r * np.cos(star_a), star_r * np.sin(star_a)], -1)),
      'cross': _unit_area(np.array(cross, np.float64)),
      'heart': _unit_area(heart),
  }


_TEMPLATES = _templates()
_RADIUS = {k: float(np.max(np.linalg.norm(v, axis=1))) for k, v in _TEMPLATES.items()}


def _rng(split: str, index: int) -> np.random.Generator:
  split_id = _SPLIT_IDS.get(split, zlib.crc32(split.encode()))
  return np.random.default_rng([0x5A17E5, split_id, int(index)])


@functools.lru_cache(maxsize=8)
def _pixel_centres(side: int) -> np.ndarray:
  """(2, side, side) float32 y, x coordinates of pixel centres in [0, 1]."""
  return (np.mgrid[0:side, 0:side].astype(np.float32) + 0.5) / side


def _background(rng, side: int) -> tuple:
  """A desaturated mid-tone texture (side, side, 3) float32 in [0, 255] and its kind's name."""
  def tone():
    grey = rng.uniform(85, 175)
    tint = rng.uniform(-1, 1, 3) * rng.uniform(0, 22)  # a faint hue, never a saturated one
    return grey + tint
  kind = ('plain', 'gradient', 'striped', 'checkered', 'noisy')[rng.integers(5)]
  yy, xx = _pixel_centres(side)
  c0, c1 = tone(), tone()
  if kind == 'plain':
    w = np.zeros_like(xx)
  elif kind == 'gradient':
    angle = rng.uniform(0, 2 * np.pi)
    w = np.cos(angle) * xx + np.sin(angle) * yy
    w = (w - w.min()) / max(float(np.ptp(w)), 1e-6)
  elif kind == 'striped':
    angle, period = rng.uniform(0, np.pi), rng.uniform(0.08, 0.25)
    w = (np.floor((np.cos(angle) * xx + np.sin(angle) * yy) / period) % 2) * rng.uniform(0.3, 0.6)
  elif kind == 'checkered':
    period = rng.uniform(0.1, 0.25)
    w = ((np.floor(xx / period) + np.floor(yy / period)) % 2) * rng.uniform(0.3, 0.6)
  else:  # smooth value noise: a coarse random grid upsampled bilinearly
    grid = rng.uniform(0, 1, (5, 5)).astype(np.float32)
    w = np.asarray(Image.fromarray(grid, mode='F').resize((side, side), Image.BILINEAR))
  bg = c0[None, None, :] * (1 - w[..., None]) + c1[None, None, :] * w[..., None]
  bg = bg + rng.normal(0, 6, (side, side, 1)).astype(np.float32)  # film grain, colourless
  return bg.astype(np.float32), kind


def _place(rng, sizes, shapes, side):
  """Rejection-samples centres inside the frame with no overlaps; returns [(object, centre)].

  Objects that find no room are dropped (the largest, placed first, always fits alone).
  """
  placed = []  # (object index, centre, bounding radius)
  for obj, (size, shape) in enumerate(zip(sizes, shapes)):
    radius = size * _RADIUS[shape]
    for _ in range(20):
      centre = rng.uniform(radius, side - radius, 2)
      if all(np.linalg.norm(centre - c) > radius + r + 0.02 * side for _, c, r in placed):
        placed.append((obj, centre, radius))
        break
  return [(obj, centre) for obj, centre, _ in placed]


def _position_word(centre, side):
  col = ('left', 'middle', 'right')[min(int(3 * centre[0] / side), 2)]
  row = ('top', 'middle', 'bottom')[min(int(3 * centre[1] / side), 2)]
  if row == col == 'middle':
    return 'centre'
  return col if row == 'middle' else (row if col == 'middle' else f'{row} {col}')


def _a(word):
  return f'an {word}' if word[0] in 'aeiou' else f'a {word}'


def _caption(rng, objects, bg_kind, side) -> str:
  """Varied wording; always names the largest object's colour and shape, mentioned first."""
  (c0, s0, centre0), rest = objects[0], objects[1:]
  main = f'{COLOURS[c0]} {SHAPES[s0]}'
  others = [f'{COLOURS[c]} {SHAPES[s]}' for c, s, _ in rest]
  if not rest:
    templates = [f'a photo of {_a(main)}', _a(main), f'a picture of {_a(main)}',
                 f'{_a(main)} on {_a(bg_kind)} background',
                 f'there is {_a(main)} on {_a(bg_kind)} background',
                 f'{_a(main)} in the {_position_word(centre0, side)}',
                 f'an image showing a single {main}', f'a large {main}']
  else:
    listed = ' and '.join(_a(o) for o in others)
    small = ' and '.join(_a(f'small {o}') for o in others)
    many = f'{len(rest)} smaller shape{"s" if len(rest) > 1 else ""}'
    templates = [f'a big {main} next to {small}', f'a large {main} and {listed}',
                 f'a photo of {_a(main)} with {many}',
                 f'{_a(main)}, the biggest of {len(objects)} shapes',
                 f'there is {_a(main)} and {listed} on {_a(bg_kind)} background',
                 f'{_a(main)} in the {_position_word(centre0, side)} and {small}']
  return templates[rng.integers(len(templates))]


def render_example(index: int, split: str = 'train', image_size: int = 64) -> dict:
  """Renders example `index` of `split`: image uint8 (S, S, 3), caption, colour, shape, label.

  Also returns 'num_objects' (1 to 3, after placement) for tests and inspection.
  """
  rng = _rng(split, index)
  canvas, bg_kind = _background(rng, image_size)
  n = int(rng.choice([1, 2, 3], p=[0.34, 0.33, 0.33]))
  # Scenes with more objects get a somewhat smaller main object, so the others fit beside it.
  largest = rng.uniform(*_LARGEST_SIDE[n - 1]) * image_size
  sizes = [largest] + list(largest * rng.uniform(*_OTHER_RATIO, n - 1))
  colours = rng.integers(len(COLOURS), size=n)
  shapes = rng.integers(len(SHAPES), size=n)
  placed = _place(rng, sizes, [SHAPES[s] for s in shapes], image_size)
  objects = []
  side = image_size * SUPERSAMPLE
  for obj, centre in placed:
    shape = SHAPES[shapes[obj]]
    angle = np.deg2rad(rng.uniform(-1, 1) * _MAX_ROTATION[shape])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = (_TEMPLATES[shape] @ rot.T * sizes[obj] + centre) * SUPERSAMPLE
    # Only the coverage mask is supersampled: box-filtering it down anti-aliases the edges.
    mask = Image.new('L', (side, side), 0)
    ImageDraw.Draw(mask).polygon(points.ravel().tolist(), fill=255)
    alpha = np.asarray(mask.reduce(SUPERSAMPLE), np.float32)[..., None] / 255.0
    rgb = np.clip(_RGB[colours[obj]] * rng.uniform(0.9, 1.05), 0, 255)  # slight shading variety
    canvas = canvas * (1 - alpha) + rgb * alpha
    objects.append((int(colours[obj]), int(shapes[obj]), centre))
  colour, shape = objects[0][0], objects[0][1]
  return {'image': np.clip(np.rint(canvas), 0, 255).astype(np.uint8),
          'caption': _caption(rng, objects, bg_kind, image_size),
          'colour': colour, 'shape': shape, 'label': colour * len(SHAPES) + shape,
          'num_objects': len(objects)}


def config_name(num_train: int, num_val: int, image_size: int) -> str:
  """The TFDS config name holding a preparation's sizes, e.g. 'train20000_val2000_px64'."""
  return f'train{int(num_train)}_val{int(num_val)}_px{int(image_size)}'


@dataclasses.dataclass(eq=False)
class VtpShapesConfig(tfds.core.BuilderConfig):
  """Sizes of one preparation; its name (config_name) keeps different sizes apart on disk."""
  num_train: int = 20000
  num_val: int = 2000
  image_size: int = 64


def _png(image: np.ndarray) -> bytes:
  # Encoded here with Pillow: TFDS would encode numpy images with TensorFlow, which we do not need.
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG', compress_level=1)
  return buf.getvalue()


class VtpShapes(tfds.core.GeneratorBasedBuilder):
  """Coloured shapes with generated captions; every example is a pure function of (split, index)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [VtpShapesConfig(name=config_name(20000, 2000, 64))]
  # TFDS looks for a download-checksums file beside `code_path`, and finding that path needs the
  # optional `importlib_resources` package; we download nothing, so there is no such file.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 3), encoding_format='png'),
            'caption': tfds.features.Text(),
            'colour': tfds.features.ClassLabel(names=COLOURS),
            'shape': tfds.features.ClassLabel(names=SHAPES),
            'label': tfds.features.ClassLabel(names=[n.replace(' ', '_') for n in class_names()]),
        }),
        supervised_keys=('image', 'label'),
        # Keep generation order, so record i of a split is render_example(i, split): easy to
        # inspect, and no TFDS key hashing (Grain shuffles at read time anyway).
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the data is rendered
    cfg = self.builder_config
    return {'train': self._generate_examples('train', cfg.num_train),
            'validation': self._generate_examples('validation', cfg.num_val)}

  def _generate_examples(self, split: str, num: int):
    size = self.builder_config.image_size
    jobs = [(split, index, size) for index in range(num)]
    workers = min(len(os.sched_getaffinity(0)), 16)
    done = 0
    if num >= 2000 and workers > 1:
      # Rendering is CPU-bound Python: spread it over processes. 'spawn', not fork: the caller may
      # already run JAX's threads, and forking a multithreaded process can deadlock.
      try:
        spawn = multiprocessing.get_context('spawn')
        with futures.ProcessPoolExecutor(workers, mp_context=spawn) as ex:
          for item in ex.map(_render_for_tfds, jobs, chunksize=64):
            yield item
            done += 1
      except futures.process.BrokenProcessPool as e:
        # Spawned workers re-import the parent's __main__, which fails for `python - <script`.
        logging.warning('vtp_shapes: worker processes failed (%s); rendering in this process.', e)
    yield from map(_render_for_tfds, jobs[done:])


def _render_for_tfds(job):
  split, index, size = job
  ex = render_example(index, split, size)
  return index, {'image': _png(ex['image']), 'caption': ex['caption'], 'colour': ex['colour'],
                 'shape': ex['shape'], 'label': ex['label']}


def builder(data_dir, num_train: int, num_val: int, image_size: int) -> VtpShapes:
  """The (possibly not yet prepared) builder for these sizes, reading/writing under data_dir."""
  name = config_name(num_train, num_val, image_size)
  # TFDS refuses a config object named like a predefined one: pass the predefined one by name.
  config = name if name in VtpShapes.builder_configs else VtpShapesConfig(
      name=name, num_train=num_train, num_val=num_val, image_size=image_size)
  return VtpShapes(data_dir=os.fspath(data_dir) if data_dir else None, config=config,
                   file_format='array_record')


@contextlib.contextmanager
def _file_lock(path):
  """An exclusive advisory lock, so processes sharing a data_dir prepare the dataset once."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare(data_dir, num_train: int, num_val: int, image_size: int) -> VtpShapes:
  """Renders and writes vtp_shapes (array_record) under data_dir unless already there; no network.

  Safe to call from several processes at once: one prepares while the others wait on a lock.
  From 2000 examples on, rendering uses spawned worker processes, which re-import the caller's
  main module: scripts need the usual `if __name__ == '__main__':` guard (if workers cannot
  start, rendering falls back to this process). Returns a builder whose
  `as_data_source(split)` reads it.
  """
  b = builder(data_dir, num_train, num_val, image_size)
  if b.is_prepared():
    return b
  if data_dir and paths.is_bucket(data_dir):
    return _prepare_in_bucket(data_dir, num_train, num_val, image_size)
  with _file_lock(os.path.join(os.path.dirname(os.fspath(b.data_dir)), '.prepare.lock')):
    b = builder(data_dir, num_train, num_val, image_size)  # another process may have finished it
    if not b.is_prepared():
      logging.info('Preparing vtp_shapes %s (%d train / %d validation at %d px) in %s ...',
                   b.builder_config.name, num_train, num_val, image_size, b.data_dir)
      start = time.perf_counter()
      b.download_and_prepare(download_config=tfds.download.DownloadConfig(
          try_download_gcs=False, download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
      logging.info('Prepared vtp_shapes in %.1f s.', time.perf_counter() - start)
      b = builder(data_dir, num_train, num_val, image_size)
  return b


def _prepare_in_bucket(data_dir, num_train: int, num_val: int, image_size: int) -> VtpShapes:
  """`prepare` for a data_dir in a bucket: rendered into a local temporary folder, then its
  variant folder (vtp_shapes/<config>/<version>) uploaded file by file, dataset_info.json last:
  TFDS counts a variant folder as prepared once that file exists, so a reader never finds half a
  dataset. Processes preparing at once each upload the same files (no lock in a bucket); the
  copies are identical and each object is written whole."""
  with tempfile.TemporaryDirectory(prefix='vtp_shapes_') as tmp:
    local = prepare(tmp, num_train, num_val, image_size)
    variant = paths.path(local.data_dir)
    target = paths.path(builder(data_dir, num_train, num_val, image_size).data_dir)
    files = paths.files_under(variant)
    files.sort(key=lambda f: f.name == 'dataset_info.json')  # stable: that one last
    logging.info('Uploading vtp_shapes %s to %s ...', local.builder_config.name, target)
    for f in files:
      dst = target / os.path.relpath(os.fspath(f), os.fspath(variant))
      dst.parent.mkdir(parents=True, exist_ok=True)
      f.copy(dst, overwrite=True)
  return builder(data_dir, num_train, num_val, image_size)
