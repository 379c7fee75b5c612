"""The generator's batch contract: one branch 'dit' of normalised latents and their labels.

batch = {'dit': {'latent': float32 (B, h, w, C), 'label': int32 (B,)}}

B = data.batch_size, h = w = dit.input_size, C = dit.in_channels. Axis 0 is the batch axis, sharded
over ('data', 'fsdp') like the tokenizer's batch (vtp_jax/batch.py dispatches here on config.task).
"""

import math

import numpy as np

from vtp_jax import sharding

BRANCH = 'dit'


def batch_shapes(config) -> dict:
  """{'dit': {field: (shape, dtype)}} of the global batch."""
  b, d = int(config.data.batch_size), config.dit
  if b < 1:
    raise ValueError(f'data.batch_size={b} must be at least 1.')
  return {BRANCH: {'latent': ((b, d.input_size, d.input_size, d.in_channels), np.float32),
                   'label': ((b,), np.int32)}}


def check_divisible(config, mesh) -> None:
  n = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  if int(config.data.batch_size) % n:
    raise ValueError(f'data.batch_size = {config.data.batch_size} does not divide over the {n} '
                     "devices of the ('data', 'fsdp') mesh axes; change the batch size or mesh.")


def synthetic_batch(config, seed: int = 0) -> dict:
  """Standard-normal latents (what normalised latents look like) and uniform labels."""
  rng = np.random.default_rng(seed)
  (shape, _), (label_shape, _) = batch_shapes(config)[BRANCH].values()
  return {BRANCH: {'latent': rng.standard_normal(shape).astype(np.float32),
                   'label': rng.integers(0, config.dit.num_classes, label_shape).astype(np.int32)}}
