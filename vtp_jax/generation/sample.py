"""Samples images from a trained generator and writes them with their labels and a preview grid.

    python -m vtp_jax.generation.sample --checkpoint=runs/dit_tiny --tokenizer=runs/vtp_tiny \\
        --num_images=48 [--labels=0,5,7] [--cfg_scale=4] [--steps=30] [--solver=heun] --out=samples/

Writes OUT/samples.npz ('images': uint8 (N, H, W, 3), 'labels': int32 (N,)) and OUT/grid.png,
each written whole. --checkpoint, --tokenizer, --latent_stats and --out may be local or in a
bucket (`gs://BUCKET/...`).
Labels: --labels (comma-separated class ids, repeated to N), else 0, 1, ..., num_classes - 1 in
turn. Sampling settings default to the checkpoint's config.sample; the flags override them. The
latents are sampled sharded over all devices (data parallel) and decoded by Tokenizer.decode.
"""

import io
import json
import math
import os

from absl import app
from absl import flags
import numpy as np

from vtp_jax import paths


def parse_labels(text: str, n: int, num_classes: int) -> np.ndarray:
  """`n` labels: the comma list repeated, or every class in turn when empty."""
  if not text:
    return (np.arange(n) % num_classes).astype(np.int32)
  try:
    given = [int(v) for v in text.split(',') if v.strip()]
  except ValueError:
    raise ValueError(f'--labels={text!r}: give comma-separated integer class ids.') from None
  if not given:
    raise ValueError(f'--labels={text!r} names no class.')
  bad = [v for v in given if not 0 <= v < num_classes]
  if bad:
    raise ValueError(f'--labels: {bad} outside [0, {num_classes}) (dit.num_classes).')
  return np.resize(np.asarray(given, np.int32), n)


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
  """(N, H, W, 3) uint8 -> one (rows H, columns W, 3) image, blank cells black."""
  n, h, w, c = images.shape
  columns = columns or max(1, math.ceil(math.sqrt(n)))
  rows = max(1, math.ceil(n / columns))
  grid = np.zeros((rows * h, columns * w, c), np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
  return grid


def write(out_dir, images: np.ndarray, labels: np.ndarray) -> None:
  """OUT/samples.npz and OUT/grid.png, each written whole (a folder or a bucket)."""
  from PIL import Image
  out_dir = paths.path(out_dir)
  buf = io.BytesIO()
  np.savez(buf, images=images.astype(np.uint8), labels=labels.astype(np.int32))
  paths.write_whole(out_dir / 'samples.npz', buf.getvalue())
  buf = io.BytesIO()
  Image.fromarray(image_grid(images)).save(buf, format='PNG')
  paths.write_whole(out_dir / 'grid.png', buf.getvalue())


def run(checkpoint: str, tokenizer: str, num_images: int, out: str, labels: str = '', *,
        seed: int = 0, weights: str = 'ema', latent_stats: str = '', **overrides) -> dict:
  """The command's work; returns what it prints. `overrides`: steps, solver, cfg_scale,
  timestep_shift, cfg_interval_start (None keeps the config's)."""
  from vtp_jax.generation.generator import Generator
  from vtp_jax.inference import Tokenizer
  if num_images < 1:
    raise ValueError(f'--num_images={num_images} must be at least 1.')
  gen = Generator.load(checkpoint, weights=weights, latent_stats=latent_stats)
  tok = Tokenizer.load(tokenizer)
  chosen = parse_labels(labels, num_images, int(gen.config.dit.num_classes))
  images, chosen = gen.generate(tok, chosen, seed=seed, **overrides)
  write(out, images, chosen)
  return {'images': int(images.shape[0]), 'shape': list(images.shape[1:]),
          'out': os.fspath(paths.path(out) / 'samples.npz'),
          'grid': os.fspath(paths.path(out) / 'grid.png')}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  from vtp_jax import checkpoints  # local: keeps --help fast
  with checkpoints.report_unreadable():  # a damaged checkpoint: one line, exit status 2
    result = run(f.checkpoint, f.tokenizer, f.num_images, f.out, f.labels, seed=f.seed,
                 weights=f.weights, latent_stats=f.latent_stats, steps=f.steps,
                 solver=f.solver, cfg_scale=f.cfg_scale, timestep_shift=f.timestep_shift,
                 cfg_interval_start=f.cfg_interval_start)
  print(json.dumps(result))


def define_flags():
  flags.DEFINE_string('checkpoint', None, 'generator training workdir (or one of its step folders)')
  flags.DEFINE_string('tokenizer', None, 'tokenizer checkpoint folder or workdir whose latents it '
                      'was trained on')
  flags.DEFINE_integer('num_images', 16, 'images to sample')
  flags.DEFINE_string('labels', '', 'comma-separated class ids, repeated to num_images; '
                      "'' = every class in turn")
  flags.DEFINE_float('cfg_scale', None, 'classifier-free guidance scale (default: config)')
  flags.DEFINE_integer('steps', None, 'ODE grid points (default: config sample.steps)')
  flags.DEFINE_enum('solver', None, ['euler', 'heun'], 'ODE solver (default: config)')
  flags.DEFINE_float('timestep_shift', None, 'timestep shift (default: config)')
  flags.DEFINE_float('cfg_interval_start', None, 'guide only where t >= this (default: config)')
  flags.DEFINE_integer('seed', 0, 'noise seed')
  flags.DEFINE_enum('weights', 'ema', ['ema', 'params'], 'which weights to sample with')
  flags.DEFINE_string('latent_stats', '', "latents_stats.npz; '' = the training run's")
  flags.DEFINE_string('out', None, 'output folder for samples.npz and grid.png')
  flags.mark_flags_as_required(['checkpoint', 'tokenizer', 'out'])


if __name__ == '__main__':
  define_flags()
  app.run(main)
