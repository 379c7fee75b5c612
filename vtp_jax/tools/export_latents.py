"""Exports tokenizer latents of a dataset for training a latent diffusion model (spec 4.1, VTP's
`generation/` = LightningDiT's feature extraction): plain and horizontally flipped latents in
ArrayRecord, plus per-channel mean and std.

    python -m vtp_jax.tools.export_latents --checkpoint=DIR --dataset=tfds:imagenet2012 \\
        --split=train --out=latents/ [--max_examples=N] [--dtype=bfloat16]

Images: ADM `center_crop_arr(image_size)` (eval/data.py), model space, `Tokenizer.encode`; the flip
is of the preprocessed image, as LightningDiT flips its input tensor before encoding.

Files in --out (P = process count, p = process index):
  latents-{p:05d}-of-{P:05d}.array_record  one record per image of process p's contiguous slice of
      the (evenly subsampled) dataset; group_size:1, so records are randomly accessible.
  stats-{p:05d}-of-{P:05d}.npz   process p's partial sums for the statistics.
  latents_stats.npz   'mean', 'std': float32 (C,) per latent channel, over (N, H, W) of up to
      --stats_examples randomly chosen (seeded) plain latents, std with ddof=1 (torch .std) - the
      LightningDiT `latents_stats.pt` convention, whose tensors are these reshaped to (1, C, 1, 1);
      'count': number of latents used. Computed from float32 latents before any bfloat16 cast.
      A DiT reads z_norm = (z - mean) / std.
  metadata.json   the export settings and the latent shape.
Record format: a msgpack map {'index': int (record index in the source), 'label': int (-1 if
none), 'shape': [h, w, C], 'dtype': 'float32' | 'bfloat16', 'latent': bytes, 'latent_flip': bytes}
with the arrays as raw C-order little-endian bytes (NHWC, channels last). `read_record` decodes one;
`read_latents(out_dir)` iterates a folder.

Multi-process: each process (jax.process_index()/process_count(), or --process_index/
--process_count for independent jobs) encodes and writes only its own slice. The statistics are
merged by process 0 after a barrier under jax.distributed, otherwise by whichever process finds
every part present; `--merge_stats_only` merges later.

--checkpoint and --out may be local or in a bucket (`gs://BUCKET/...`). Every file appears whole
under its final name: a shard is written under a temporary name and renamed (a disk) or written
to a local temporary file and uploaded as one object (a bucket: ArrayRecord cannot write there);
the other files are written whole (vtp_jax/paths.py). The order is the same on both: a process
first removes latents_stats.npz and its own stats part if an earlier export left them, then
writes its shard, then its stats part; latents_stats.npz, which readers need
(generation/data.py), is written last, once every part is there, so a reader never sees half a
set.
"""

import io
import json
import os
import tempfile

from absl import app
from absl import flags
from absl import logging
import ml_dtypes
import msgpack
import numpy as np

from vtp_jax import paths

DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16}
STATS_FILE = 'latents_stats.npz'


def shard_name(p: int, count: int, prefix: str = 'latents', ext: str = 'array_record') -> str:
  return f'{prefix}-{p:05d}-of-{count:05d}.{ext}'


def shard_range(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  """Contiguous [start, stop) of n items for one process; sizes differ by at most one."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count}).')
  return n * process_index // process_count, n * (process_index + 1) // process_count


def encode_record(index: int, label: int, latent, latent_flip, dtype: str) -> bytes:
  np_dtype = DTYPES[dtype]
  latent = np.ascontiguousarray(np.asarray(latent, np.float32).astype(np_dtype))
  flipped = np.ascontiguousarray(np.asarray(latent_flip, np.float32).astype(np_dtype))
  return msgpack.packb({'index': int(index), 'label': int(label), 'shape': list(latent.shape),
                        'dtype': dtype, 'latent': latent.tobytes(), 'latent_flip': flipped.tobytes()})


def read_record(data: bytes) -> dict:
  """One record -> {'index', 'label', 'latent', 'latent_flip'} with (h, w, C) arrays."""
  rec = msgpack.unpackb(data)
  dtype, shape = DTYPES[rec['dtype']], tuple(rec['shape'])
  for key in ('latent', 'latent_flip'):
    rec[key] = np.frombuffer(rec[key], dtype).reshape(shape)
  return rec


def shard_files(out_dir) -> list[str]:
  """The latent shards in out_dir (local or in a bucket), sorted."""
  return paths.glob_files(os.fspath(paths.path(out_dir) / 'latents-*-of-*.array_record'))


def read_latents(out_dir):
  """Every record of every shard in out_dir (local or in a bucket), shard by shard, in order."""
  from array_record.python.array_record_module import ArrayRecordReader
  for path in shard_files(out_dir):
    reader = ArrayRecordReader(path)  # ArrayRecord reads gs:// itself
    try:
      for data in reader.read_all():
        yield read_record(data)
    finally:
      reader.close()


def stats_positions(num_examples: int, stats_examples: int, seed: int) -> np.ndarray:
  """Sorted positions (into the exported example list) whose plain latents feed the statistics."""
  if stats_examples <= 0 or stats_examples >= num_examples:
    return np.arange(num_examples)
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_examples, stats_examples, replace=False))


def export_shard(tokenizer, batches, out_dir, *, process_index: int = 0, process_count: int = 1,
                 dtype: str = 'float32', stats_positions_set=None, batch_size: int = 64) -> int:
  """Encodes (images uint8, labels, positions, indices) batches into this process's shard.

  `positions` number the examples of the whole export (0..N-1) and pick the statistics subset;
  `indices` are source record indices stored in the records. Writes the shard and partial stats;
  returns the number of records written.
  """
  from array_record.python.array_record_module import ArrayRecordWriter
  from vtp_jax import pixels
  from vtp_jax.eval import common
  from vtp_jax.tools.tar_to_arrayrecord import publish
  if dtype not in DTYPES:
    raise ValueError(f'dtype={dtype!r} is not one of {tuple(DTYPES)}.')
  out_dir = paths.path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  # An earlier export's mark and this process's part go first: until this export writes them
  # again, no reader takes the folder for a finished set and no merge counts a stale part.
  (out_dir / STATS_FILE).unlink(missing_ok=True)
  (out_dir / shard_name(process_index, process_count, 'stats', 'npz')).unlink(missing_ok=True)
  final = out_dir / shard_name(process_index, process_count)
  if paths.is_bucket(out_dir):  # ArrayRecord cannot write to a bucket: a local file, uploaded
    fd, tmp = tempfile.mkstemp(prefix=f'.{final.name}.', suffix='.tmp')
    os.close(fd)
    tmp = paths.path(tmp)
  else:
    tmp = final.with_name(final.name + '.tmp')
  writer = ArrayRecordWriter(os.fspath(tmp), 'group_size:1')
  count, total, total_sq, written = 0, None, None, 0
  try:
    for images, labels, positions, indices in batches:
      for s in range(0, images.shape[0], batch_size):
        chunk = images[s:s + batch_size]
        z = common.padded_call(tokenizer.encode, pixels.to_model_space(chunk), batch_size)
        zf = common.padded_call(tokenizer.encode, pixels.to_model_space(chunk[:, :, ::-1]),
                                batch_size)
        for i in range(chunk.shape[0]):
          writer.write(encode_record(indices[s + i], labels[s + i], z[i], zf[i], dtype))
          written += 1
          if stats_positions_set is None or int(positions[s + i]) in stats_positions_set:
            flat = np.asarray(z[i], np.float64).reshape(-1, z.shape[-1])
            total = flat.sum(0) if total is None else total + flat.sum(0)
            sq = (flat ** 2).sum(0)
            total_sq = sq if total_sq is None else total_sq + sq
            count += flat.shape[0]
  except BaseException:
    writer.close()
    if paths.is_bucket(out_dir):
      tmp.unlink(missing_ok=True)
    raise
  writer.close()
  publish(tmp, final)  # a rename, or an upload and the local file removed
  if total is None:
    total = total_sq = np.zeros((0,), np.float64)
  write_npz(out_dir / shard_name(process_index, process_count, 'stats', 'npz'),
            count=np.int64(count), sum=total, sum_sq=total_sq)
  return written


def write_npz(path, **arrays) -> None:
  """np.savez written whole (paths.write_whole), local or in a bucket."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  paths.write_whole(path, buf.getvalue())


def read_npz(path) -> dict:
  """Every array of an .npz, local or in a bucket."""
  with np.load(io.BytesIO(paths.path(path).read_bytes()), allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def merge_stats(out_dir, process_count: int) -> dict | None:
  """Combines every process's partial sums into latents_stats.npz; None if parts are missing."""
  out_dir = paths.path(out_dir)
  parts = [out_dir / shard_name(p, process_count, 'stats', 'npz') for p in range(process_count)]
  if not all(p.exists() for p in parts):
    return None
  count, total, total_sq = 0, 0.0, 0.0
  for part in parts:
    f = read_npz(part)
    if int(f['count']):
      count += int(f['count'])
      total = total + f['sum']
      total_sq = total_sq + f['sum_sq']
  if count < 2:
    raise ValueError(f'{out_dir}: only {count} latent values for the statistics; export more.')
  mean = total / count
  std = np.sqrt(np.maximum(total_sq - count * mean ** 2, 0.0) / (count - 1))
  stats = {'mean': mean.astype(np.float32), 'std': std.astype(np.float32), 'count': np.int64(count)}
  write_npz(out_dir / STATS_FILE, **stats)  # last: what readers wait for
  return stats


def export(tokenizer, config, dataset_spec: str, out_dir, *, split=None, max_examples=None,
           dtype='float32', stats_examples=10000, seed=0, process_index=None, process_count=None,
           batch_size=64, image_size=None) -> dict:
  """Exports this process's slice of the dataset and, when possible, the merged statistics."""
  import jax
  from vtp_jax.eval import data as eval_data
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  image_size = image_size or config.data.image_size
  source = eval_data.open_source(config, dataset_spec, split)
  indices = eval_data.example_indices(len(source), max_examples)
  chosen = set(stats_positions(len(indices), stats_examples, seed).tolist())
  start, stop = shard_range(len(indices), process_index, process_count)
  mine = indices[start:stop]
  position_of = {int(idx): start + i for i, idx in enumerate(mine)}

  def batches():
    for images, labels, kept in eval_data.iter_batches(source, mine, image_size, 'center_crop',
                                                       batch_size):
      yield images, labels, np.array([position_of[int(k)] for k in kept]), kept

  written = export_shard(tokenizer, batches(), out_dir, process_index=process_index,
                         process_count=process_count, dtype=dtype, stats_positions_set=chosen,
                         batch_size=batch_size)
  if process_index == 0:
    z_shape = [image_size // config.model.patch_size] * 2 + [config.model.bottleneck_dim]
    meta = {'dataset': eval_data.with_split(dataset_spec, split), 'examples': int(len(indices)),
            'process_count': process_count, 'image_size': image_size, 'latent_shape': z_shape,
            'dtype': dtype, 'stats_examples': int(len(chosen)), 'seed': seed,
            'preprocess': 'center_crop_arr', 'flip': 'horizontal, of the preprocessed image'}
    paths.write_whole(paths.path(out_dir) / 'metadata.json', json.dumps(meta, indent=2))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('export_latents')
    stats = merge_stats(out_dir, process_count) if process_index == 0 else None
  else:
    stats = merge_stats(out_dir, process_count)
  return {'written': written, 'stats': stats}


def main(argv):
  del argv
  f = flags.FLAGS
  if f.merge_stats_only:
    stats = merge_stats(f.out, f.process_count or 1)
    if stats is None:
      raise app.UsageError(f'{f.out}: some stats-*-of-*.npz parts are missing.')
    print(json.dumps({'count': int(stats['count'])}))
    return
  if not f.checkpoint or not f.dataset:
    raise app.UsageError('--checkpoint and --dataset are required (unless --merge_stats_only).')
  from vtp_jax import checkpoints
  from vtp_jax.inference import Tokenizer
  with checkpoints.report_unreadable():  # a damaged checkpoint: one line, exit status 2
    tokenizer = Tokenizer.load(f.checkpoint, compute_dtype=f.compute_dtype)
  config = tokenizer.config
  if f.data_dir:
    config.data.data_dir = f.data_dir
  result = export(tokenizer, config, f.dataset, f.out, split=f.split, max_examples=f.max_examples,
                  dtype=f.dtype, stats_examples=f.stats_examples, seed=f.seed,
                  process_index=f.process_index, process_count=f.process_count,
                  batch_size=f.batch_size, image_size=f.image_size)
  logging.info('wrote %d records to %s', result['written'], f.out)
  if result['stats'] is None:
    print(json.dumps({'written': result['written'], 'stats': 'pending: other processes; '
                      'run again with --merge_stats_only when all have finished'}))
  else:
    print(json.dumps({'written': result['written'], 'stats_count': int(result['stats']['count'])}))


if __name__ == '__main__':
  flags.DEFINE_string('checkpoint', None, 'checkpoint folder or training workdir (or gs://...)')
  flags.DEFINE_string('dataset', None, "dataset spec, e.g. 'tfds:imagenet2012' or 'shapes'")
  flags.DEFINE_string('split', None, "split for shapes/tfds specs, e.g. 'train'")
  flags.DEFINE_string('out', None, 'output folder, local or gs://BUCKET/...')
  flags.DEFINE_integer('max_examples', 0, 'evenly spaced examples to export; 0 = all')
  flags.DEFINE_enum('dtype', 'float32', list(DTYPES), 'storage dtype of the latents')
  flags.DEFINE_integer('stats_examples', 10000, 'latents for mean/std (LightningDiT: 10k)')
  flags.DEFINE_integer('seed', 0, 'seed of the statistics subset')
  flags.DEFINE_integer('batch_size', 64, 'images per encode call')
  flags.DEFINE_integer('image_size', 0, 'centre-crop side; 0 = the checkpoint config data.image_size')
  flags.DEFINE_string('data_dir', '', 'overrides config.data.data_dir (TFDS / prepared data)')
  flags.DEFINE_string('compute_dtype', 'float32', 'encoder compute dtype: float32 or bfloat16')
  flags.DEFINE_integer('process_index', None, 'this process (default jax.process_index())')
  flags.DEFINE_integer('process_count', None, 'process count (default jax.process_count())')
  flags.DEFINE_bool('merge_stats_only', False, 'only merge stats-*.npz parts into latents_stats')
  flags.mark_flags_as_required(['out'])
  app.run(main)
