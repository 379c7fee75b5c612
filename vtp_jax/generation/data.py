"""The generator's input pipeline: latents written by `python -m vtp_jax.tools.export_latents`,
normalised by the per-channel statistics it writes, into host-local batches of the contract in
generation/batch.py, through Grain (shuffled, sliced by process, checkpointable).

    MapDataset.source(ArrayRecord files of latents.source) -> shuffle(data.seed) -> repeat
      -> map_with_index(decode: plain or flipped latent, (z - mean) / std * multiplier, label)
      -> [process_index::process_count] -> to_iter_dataset -> batch(B / process_count)

As LightningDiT's ImgLatentDataset, each example is the plain or the horizontally flipped latent
with probability 1/2 (latents.flip), drawn from Generator(data.seed, global index), so restoring the
iterator state replays the same batches.

latents.source and latents.stats may be local or in a bucket (`gs://BUCKET/...`): ArrayRecord
reads gs:// itself; a bucket glob takes `*` per folder, not `**` (vtp_jax/paths.py, glob_files).
"""

import os

import grain
import jax
import numpy as np

from vtp_jax import paths
from vtp_jax.generation import batch as gen_batch
from vtp_jax.tools import export_latents

STATS_KEYS = ('mean', 'std')


def latent_files(config) -> list:
  source = str(config.latents.get('source', ''))
  kind, _, pattern = source.partition(':')
  if kind != 'arrayrecord' or not pattern:
    raise ValueError(f'latents.source={source!r}; set it to arrayrecord:GLOB of the files '
                     '`python -m vtp_jax.tools.export_latents --out=DIR` writes '
                     '(e.g. arrayrecord:DIR/latents-*.array_record).')
  files = paths.glob_files(pattern)
  if not files:
    raise ValueError(f'latents.source={source!r}: no file matches {pattern!r}; check the glob.')
  return files


def load_stats(config) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std), float32 (C,), from latents.stats or latents_stats.npz beside the first file."""
  path = config.latents.get('stats', '') or os.fspath(
      paths.path(latent_files(config)[0]).parent / export_latents.STATS_FILE)
  if not paths.path(path).exists():
    raise ValueError(f'latent statistics {path} not found; set latents.stats to the '
                     f'{export_latents.STATS_FILE} export_latents wrote (or run it with '
                     '--merge_stats_only).')
  f = export_latents.read_npz(path)
  mean, std = (np.asarray(f[k], np.float32).reshape(-1) for k in STATS_KEYS)
  channels = int(config.dit.in_channels)
  if mean.shape != (channels,) or std.shape != (channels,):
    raise ValueError(f'{path}: statistics of {mean.shape[0]} channels, but dit.in_channels='
                     f'{channels}.')
  if np.any(std <= 0):
    raise ValueError(f'{path}: a channel has std <= 0; the latents cannot be normalised.')
  return mean, std


class _Decode:
  """map_with_index fn: a record -> {'latent': normalised (h, w, C) float32, 'label': int32}."""

  def __init__(self, config, mean, std):
    self.seed = int(config.data.seed)
    self.flip = bool(config.latents.flip)
    self.scale = float(config.latents.multiplier) / std
    self.mean = mean
    d = config.dit
    self.shape = (d.input_size, d.input_size, d.in_channels)
    self.num_classes = int(d.num_classes)

  def __call__(self, index, data):
    rec = export_latents.read_record(data)
    use_flip = self.flip and np.random.default_rng([self.seed, int(index)]).random() < 0.5
    z = np.asarray(rec['latent_flip' if use_flip else 'latent'], np.float32)
    if z.shape != self.shape:
      raise ValueError(f'a latent of shape {z.shape} in latents.source, but the config expects '
                       f'{self.shape} (dit.input_size, dit.in_channels); match them.')
    label = int(rec['label'])
    if not 0 <= label < self.num_classes:
      raise ValueError(f'label {label} of record {rec["index"]} is outside [0, dit.num_classes='
                       f'{self.num_classes}); set dit.num_classes to the dataset\'s class count.')
    return {'latent': (z - self.mean) * self.scale, 'label': np.int32(label)}


def make_dataset(config, *, process_index=None, process_count=None, epoch_seed=None):
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  b = int(config.data.batch_size)
  if b % process_count:
    raise ValueError(f'data.batch_size={b} does not divide over {process_count} JAX processes.')
  mean, std = load_stats(config)
  source = grain.sources.ArrayRecordDataSource(latent_files(config))
  if len(source) == 0:
    raise ValueError(f'latents.source={config.latents.source!r} holds no records.')
  seed = int(config.data.seed if epoch_seed is None else epoch_seed)
  d = config.data
  ds = grain.MapDataset.source(source).shuffle(seed=seed)
  ds = ds.repeat(d.num_epochs if d.num_epochs > 0 else None)
  ds = ds.map_with_index(_Decode(config, mean, std))
  ds = ds[process_index::process_count]
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=d.read_threads,
                                            prefetch_buffer_size=d.read_buffer_size))
  ds = ds.batch(b // process_count, drop_remainder=True)
  return ds.map(_as_branch)


def _as_branch(fields: dict) -> dict:
  return {gen_batch.BRANCH: fields}


def make_iterator(config, *, process_index=None, process_count=None, epoch_seed=None):
  """A checkpointable iterator of host-local batches {'dit': {'latent', 'label'}}."""
  return iter(make_dataset(config, process_index=process_index, process_count=process_count,
                           epoch_seed=epoch_seed))
