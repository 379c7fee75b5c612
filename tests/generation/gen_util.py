"""What the generation tests share: a micro generator config and a folder of exported latents."""

import pathlib

import numpy as np

from configs import dit_tiny
from vtp_jax.tools import export_latents

SIDE, CHANNELS, CLASSES = 2, 8, 3


def micro_config(**dit):
  """dit_tiny shrunk to compile in seconds: D 32, 2 blocks, 2x2x8 latents, 3 classes, batch 8."""
  c = dit_tiny.get_config()
  c.dit.update(width=32, depth=2, heads=2, num_classes=CLASSES, in_channels=CHANNELS,
               input_size=SIDE)
  c.dit.update(dit)
  c.data.update(batch_size=8, read_threads=1, read_buffer_size=8)
  c.optim.update(lr=1e-3, warmup_steps=0)
  c.flow.ema_decay = 0.9
  c.train.update(steps=6, checkpoint_every=3, log_every=1, keep_checkpoints=5)
  c.sample.update(steps=5, batch_size=4)
  return c


def write_latents(folder, n: int = 24, shards: int = 2, seed: int = 0) -> dict:
  """export_latents' files for n random latents: shards, latents_stats.npz with known (mean,
  std); returns {'latent', 'latent_flip', 'label', 'mean', 'std'} for checks."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  from array_record.python.array_record_module import ArrayRecordWriter
  rng = np.random.default_rng(seed)
  mean = rng.standard_normal(CHANNELS).astype(np.float32)
  std = rng.uniform(0.5, 2.0, CHANNELS).astype(np.float32)
  z = (mean + std * rng.standard_normal((n, SIDE, SIDE, CHANNELS))).astype(np.float32)
  z_flip = z[:, :, ::-1]
  labels = rng.integers(0, CLASSES, n)
  for p in range(shards):
    start, stop = export_latents.shard_range(n, p, shards)
    writer = ArrayRecordWriter(str(folder / export_latents.shard_name(p, shards)), 'group_size:1')
    for i in range(start, stop):
      writer.write(export_latents.encode_record(i, labels[i], z[i], z_flip[i], 'float32'))
    writer.close()
  np.savez(folder / export_latents.STATS_FILE, mean=mean, std=std, count=np.int64(n))
  return {'latent': z, 'latent_flip': np.ascontiguousarray(z_flip), 'label': labels,
          'mean': mean, 'std': std}
