"""A trained generator loaded for sampling: its config, EMA weights and latent statistics, with
sharded, batched sampling of latents and their decoding to images by a Tokenizer.

    gen = Generator.load('runs/dit_tiny')                  # a training workdir or step folder
    tok = Tokenizer.load('runs/vtp_tiny')
    images, labels = gen.generate(tok, labels, seed=0, cfg_scale=4.0)   # uint8 (N, H, W, 3)

Latents are sampled in the normalised space the generator was trained in and mapped back by
z = z_norm * std / multiplier + mean (LightningDiT's inference), then decoded.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vtp_jax import checkpoints
from vtp_jax import pixels
from vtp_jax import sharding
from vtp_jax.generation import data as gen_data
from vtp_jax.generation import dit
from vtp_jax.generation import sampling
from vtp_jax.generation import state as gen_state


def load_config(path):
  from configs import dit_base  # local: configs is a sibling package
  return checkpoints.load_config(path, defaults=dit_base.get_config)


class Generator:
  """LightningDiT weights (EMA by default) placed on a data-parallel mesh of all devices."""

  def __init__(self, config, params, mean, std, mesh=None):
    # A check of what was loaded, not a choice of training (vtp_jax/tasks makes that one).
    if config.get('task') != 'generation':
      raise ValueError("the checkpoint's config has task != 'generation': it is a tokenizer; "
                       'pass a generator workdir (trained with configs/dit_*.py).')
    self.config = config
    self.mesh = mesh or sharding.make_mesh(config.mesh)
    self.model = dit.build(config)
    _, self.param_shardings, _ = gen_state.param_init(config, self.mesh)
    self.params = jax.device_put(params, self.param_shardings)
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)

  @classmethod
  def load(cls, path, weights: str = 'ema', latent_stats: str = ''):
    """Restores `weights` ('ema' or 'params') of a training workdir or step folder (local or in a
    bucket, `gs://BUCKET/...`); the latent statistics come from `latent_stats`, else from the
    config's latents.stats / latents.source (either may be in a bucket too)."""
    if weights not in ('ema', 'params'):
      raise ValueError(f"weights={weights!r}; use 'ema' (the sampling weights) or 'params'.")
    step_dir = checkpoints.resolve(path)
    if not checkpoints.is_step_dir(step_dir):
      raise FileNotFoundError(f'{path} holds no generator training checkpoint.')
    config = load_config(step_dir)
    config.mesh.update(data=-1, fsdp=1, tensor=1)  # sampling: data parallel over all devices
    if latent_stats:
      config.latents.stats = latent_stats
    try:
      mean, std = gen_data.load_stats(config)
    except ValueError as e:
      raise ValueError(f'{e} (pass --latent_stats=PATH to sample elsewhere than training)'
                       ) from None
    params = jax.tree.map(np.asarray, checkpoints.restore_subtree(step_dir, weights))
    return cls(config, params, mean, std)

  @functools.cached_property
  def _devices(self) -> int:
    return sharding.batch_shards(self.mesh)

  def chunk_size(self) -> int:
    """sample.batch_size rounded up to a multiple of the batch-sharding device count."""
    b = max(int(self.config.sample.batch_size), 1)
    return -(-b // self._devices) * self._devices

  @functools.cached_property
  def _rows(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(sharding.BATCH_AXES))

  @functools.lru_cache(maxsize=8)
  def _sampler(self, settings: tuple):
    kwargs = dict(settings)
    rows = self._rows

    def run(params, noise, labels):
      velocity = lambda x, t, y: self.model.apply({'params': params}, x, t, y)  # noqa: E731
      return sampling.sample(velocity, noise, labels, **kwargs)

    return jax.jit(run, in_shardings=(self.param_shardings, rows, rows), out_shardings=rows)

  def sample_latents(self, labels, seed: int = 0, **overrides) -> np.ndarray:
    """Latents (N, h, w, C) in the tokenizer's space for int labels (N,); overrides: steps, solver,
    timestep_shift, cfg_scale, cfg_interval_start, cfg_channels."""
    labels = np.asarray(labels, np.int32).reshape(-1)
    d = self.config.dit
    if labels.size and (labels.min() < 0 or labels.max() >= d.num_classes):
      raise ValueError(f'labels must lie in [0, {d.num_classes}); got {labels.min()}..'
                       f'{labels.max()}.')
    kwargs = sampling.sample_kwargs(self.config, **overrides)
    fn = self._sampler(tuple(sorted(kwargs.items())))
    chunk, key = self.chunk_size(), jax.random.key(seed)
    shape = (d.input_size, d.input_size, d.in_channels)
    out = []
    for i, start in enumerate(range(0, labels.size, chunk)):
      part = labels[start:start + chunk]
      padded = np.pad(part, (0, chunk - part.size))  # the last call is padded: no recompile
      noise = jax.random.normal(jax.random.fold_in(key, i), (chunk,) + shape, jnp.float32)
      with jax.set_mesh(self.mesh):
        z = fn(self.params, jax.device_put(noise, self._rows), jax.device_put(padded, self._rows))
      out.append(np.asarray(z)[:part.size])
    z = np.concatenate(out) if out else np.zeros((0,) + shape, np.float32)
    return z * (self.std / float(self.config.latents.multiplier)) + self.mean

  def generate(self, tokenizer, labels, seed: int = 0, **overrides):
    """(images uint8 (N, H, W, 3), labels int32 (N,)): sampled latents decoded by `tokenizer`,
    whose latent width must be dit.in_channels."""
    check_tokenizer(tokenizer, self.config)
    labels = np.asarray(labels, np.int32).reshape(-1)
    z = self.sample_latents(labels, seed, **overrides)
    return decode(tokenizer, z, self.mesh, self.chunk_size()), labels


def check_tokenizer(tokenizer, config) -> None:
  width = int(tokenizer.config.model.bottleneck_dim)
  if width != int(config.dit.in_channels):
    raise ValueError(f'the tokenizer makes {width}-channel latents but the generator was trained '
                     f'on dit.in_channels={config.dit.in_channels}; pass the tokenizer whose '
                     'latents it was trained on.')


def decode(tokenizer, latents, mesh, chunk: int) -> np.ndarray:
  """uint8 images of latents (N, h, w, C) by `Tokenizer.decode`, in chunks sharded over the mesh's
  batch axes; the tokenizer's weights are placed (replicated) on the mesh for that."""
  rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
  tokenizer.params = jax.device_put(tokenizer.params, sharding.replicated(mesh))
  out = []
  for start in range(0, latents.shape[0], chunk):
    part = latents[start:start + chunk]
    padded = np.pad(part, [(0, chunk - part.shape[0])] + [(0, 0)] * (part.ndim - 1))
    with jax.set_mesh(mesh):
      images = tokenizer.decode(jax.device_put(jnp.asarray(padded, jnp.float32), rows))
    out.append(pixels.to_uint8(np.asarray(images))[:part.shape[0]])
  if not out:
    side = int(latents.shape[1]) * int(tokenizer.config.model.patch_size)
    return np.zeros((0, side, side, 3), np.uint8)
  return np.concatenate(out)
