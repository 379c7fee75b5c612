"""The generator's batch contract: one branch 'dit' of normalised latents and their labels.

batch = {'dit': {'latent': float32 (B, h, w, C), 'label': int32 (B,)}}

B = data.batch_size, h = w = dit.input_size, C = dit.in_channels. Axis 0 is the batch axis, sharded
over ('data', 'fsdp') like the tokenizer's batch, with vtp_jax/batch.py's shape-generic helpers.
"""

import numpy as np

from vtp_jax import batch as batch_lib

BRANCH = 'dit'


def batch_shapes(config) -> dict:
  """{'dit': {field: (shape, dtype)}} of the global batch."""
  b, d = int(config.data.batch_size), config.dit
  if b < 1:
    raise ValueError(f'data.batch_size={b} must be at least 1.')
  return {BRANCH: {'latent': ((b, d.input_size, d.input_size, d.in_channels), np.float32),
                   'label': ((b,), np.int32)}}


def check_divisible(config, mesh) -> None:
  batch_lib.check_rows_divide(batch_shapes(config), mesh)
  batch_lib.check_micro_batches({'generator batch (data.batch_size)': int(config.data.batch_size)},
                                config, mesh)


def batch_shardings(config, mesh) -> dict:
  return batch_lib.shardings_of(batch_shapes(config), mesh)


def synthetic_batch(config, seed: int = 0) -> dict:
  """Standard-normal latents (what normalised latents look like) and uniform labels."""
  rng = np.random.default_rng(seed)
  (shape, _), (label_shape, _) = batch_shapes(config)[BRANCH].values()
  return {BRANCH: {'latent': rng.standard_normal(shape).astype(np.float32),
                   'label': rng.integers(0, config.dit.num_classes, label_shape).astype(np.int32)}}
