"""The batch contract between the input pipeline and the train step: global shapes, shardings,
the static iBOT token-buffer size, and a synthetic batch for benchmarks and tests.

batch = {
  'clip': {'image': uint8 (B, S, S, 3), 'tokens': int32 (B, L)},
  'ssl':  {'global': uint8 (Bs, 2, G, G, 3), 'local': uint8 (Bs, N, Lc, Lc, 3),
           'mask': bool (Bs, 2, (G/p)^2)},
  'rec':  {'image': uint8 (Br, S, S, 3)},
}
A branch whose loss weight is 0 is absent. Axis 0 of every field is the batch axis, sharded over
('data', 'fsdp'); images cross to the device as uint8 and are normalised there. Other trainings
state their own contracts (the generator's: vtp_jax/generation/batch.py) and place them with the
shape-generic helpers here (`shardings_of`, `abstract_of`, `check_rows_divide`).

The SSL crops are batch-major (Bs, crops, ...), unlike DESIGN.md's crop-major (crops, Bs, ...):
merging (Bs, crops) into one batch axis for the encoder keeps each device's rows contiguous, where
merging (crops, Bs) would force GSPMD to gather and re-split the whole crop tensor every step.
"""

import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vtp_jax import sharding

N_GLOBAL_CROPS = 2


def sub_batch_sizes(config) -> tuple[int, int, int]:
  """(B, B_ssl, B_rec): the CLIP batch and the SSL / reconstruction sub-batches (spec 2.1)."""
  d = config.data
  b = int(d.batch_size)
  b_ssl = int(round(b * d.ssl_batch_fraction))
  b_rec = int(round(b * d.rec_batch_fraction))
  for name, value in (('data.batch_size', b), ('SSL sub-batch', b_ssl), ('rec sub-batch', b_rec)):
    if value < 1 and not (name != 'data.batch_size' and value == 0):
      raise ValueError(f'{name} is {value}; raise data.batch_size or the sub-batch fraction.')
  return b, b_ssl, b_rec


def accum_steps(config) -> int:
  """`train.accum_steps`: the micro-batches one step splits its batch into (1 = none)."""
  k = config.get('train', {}).get('accum_steps', 1)
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f'train.accum_steps={k!r} must be a positive int (1 = no accumulation).')
  return k


def check_micro_batches(sizes: dict, config, mesh) -> None:
  """Each {name: global rows} splits into `train.accum_steps` micro-batches that themselves split
  over the mesh's batch shards, at least one row a device."""
  k = accum_steps(config)
  if k == 1:
    return
  n_shards = sharding.batch_shards(mesh)
  for name, size in sizes.items():
    if not size:
      continue
    if size % (k * n_shards):
      per_device = size // n_shards
      raise ValueError(
          f'train.accum_steps={k} does not fit the {name} of {size} on {n_shards} batch shards: '
          f'each micro-batch must hold the same whole number of rows per device, but '
          f'{per_device} per device' + (' leaves 0 per micro-batch' if per_device < k else
                                        f' do not split into {k}') +
          f'; choose accum_steps dividing {per_device} or change the batch size.')


def patches_per_global_crop(config) -> int:
  side = config.data.global_crop_size // config.model.patch_size
  return side * side


def ibot_groups(config, mesh) -> int:
  """How many groups the step's iBOT masked-token buffer is split into: one per batch shard of
  the mesh (the product of its ('data', 'fsdp') sizes), so each device gathers its own masked
  patches and no patch token crosses a chip (docs/scaling.md, 'The iBOT buffer per device')."""
  _, b_ssl, _ = sub_batch_sizes(config)
  return math.gcd(sharding.batch_shards(mesh), b_ssl) if b_ssl else 1


def ibot_buffer_size(config, groups: int = 1) -> int:
  """Static size of each group's masked-token buffer: DINOv2's `upperbound`, per group.

  Masks are collated per device (`mask_collate_samples`, as DINOv2 collates per rank), so the
  n_g = 2 B_ssl / groups global crops of a group mask at most int(n_g * mask_probability) images,
  each with at most int(N * mask_ratio_max) patches: this many masked tokens a group at most. A
  sum of floors never exceeds the floor of the sum, so finer collation than the groups is safe.
  Under `train.accum_steps = k` masks are collated per device and micro-batch, and this is one
  micro-batch's buffer (n_g = 2 B_ssl / (groups k)).
  """
  _, b_ssl, _ = sub_batch_sizes(config)
  k = accum_steps(config)
  if groups < 1 or (b_ssl and b_ssl % (groups * k)):
    raise ValueError(f'{groups} iBOT buffer groups and {k} micro-batches do not split the SSL '
                     f'sub-batch of {b_ssl}.')
  n_images = N_GLOBAL_CROPS * b_ssl // (groups * k)
  n_masked_images = int(n_images * config.data.mask_probability)
  return max(n_masked_images * int(patches_per_global_crop(config) * config.data.mask_ratio_max), 1)


def mask_collate_samples(config, n_devices: int, n_local: int) -> int:
  """How many of a host's `n_local` SSL samples each mask collation covers: the SSL rows of one
  device of an `n_devices` run (never more than the host holds), or of one micro-batch of it under
  `train.accum_steps`. Collations nest inside every device group of any mesh over those devices,
  which is what bounds `ibot_buffer_size` per group."""
  _, b_ssl, _ = sub_batch_sizes(config)
  if not b_ssl or not n_local:
    return max(n_local, 1)
  per_device = b_ssl // math.gcd(n_devices, b_ssl)
  k = accum_steps(config)
  if per_device % k == 0:
    per_device //= k
  return math.gcd(per_device, n_local)


def active_branches(config) -> tuple[str, ...]:
  weights = (('clip', config.loss.clip_weight), ('ssl', config.loss.ssl_weight),
             ('rec', config.loss.rec_weight))
  active = tuple(name for name, weight in weights if weight)
  if not active:
    raise ValueError('loss.clip_weight, loss.ssl_weight and loss.rec_weight are all 0: nothing '
                     'to train.')
  return active


def batch_shapes(config) -> dict:
  """{branch: {field: (shape, dtype)}} of the global batch, for the active branches only."""
  d, m = config.data, config.model
  b, b_ssl, b_rec = sub_batch_sizes(config)
  s, g, lc = d.image_size, d.global_crop_size, d.local_crop_size
  for name, side in (('data.image_size', s), ('data.global_crop_size', g),
                     ('data.local_crop_size', lc)):
    if side % m.patch_size:
      raise ValueError(f'{name}={side} is not a multiple of the patch size {m.patch_size}.')
  shapes = {
      'clip': {'image': ((b, s, s, 3), np.uint8),
               'tokens': ((b, m.text.context_length), np.int32)},
      'ssl': {'global': ((b_ssl, N_GLOBAL_CROPS, g, g, 3), np.uint8),
              'local': ((b_ssl, d.n_local_crops, lc, lc, 3), np.uint8),
              'mask': ((b_ssl, N_GLOBAL_CROPS, patches_per_global_crop(config)), np.bool_)},
      'rec': {'image': ((b_rec, s, s, 3), np.uint8)},
  }
  return {k: v for k, v in shapes.items() if k in active_branches(config)}


def shardings_of(shapes: dict, mesh) -> dict:
  """NamedShardings of a {branch: {field: (shape, dtype)}} batch: axis 0 over ('data', 'fsdp'),
  the rest replicated."""
  def spec(shape):
    return NamedSharding(mesh, P(sharding.BATCH_AXES, *([None] * (len(shape) - 1))))

  return {branch: {field: spec(shape) for field, (shape, _) in fields.items()}
          for branch, fields in shapes.items()}


def abstract_of(shapes: dict, mesh) -> dict:
  """ShapeDtypeStructs of a {branch: {field: (shape, dtype)}} batch with their shardings: what
  `jit(...).lower` takes to compile a step before any data exists (compile-only devices too)."""
  shardings = shardings_of(shapes, mesh)
  return {branch: {field: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[branch][field])
                   for field, (shape, dtype) in fields.items()}
          for branch, fields in shapes.items()}


def check_rows_divide(shapes: dict, mesh) -> None:
  """Every field's rows split evenly over the batch-sharding axes."""
  n = sharding.batch_shards(mesh)
  for branch, fields in shapes.items():
    for field, (shape, _) in fields.items():
      if shape[0] % n:
        raise ValueError(f'batch[{branch!r}][{field!r}] has {shape[0]} rows, which do not divide '
                         f"over the {n} devices of the ('data', 'fsdp') mesh axes; change "
                         'data.batch_size or the mesh.')


def batch_shardings(config, mesh) -> dict:
  """NamedShardings of the tokenizer's batch."""
  return shardings_of(batch_shapes(config), mesh)


def abstract_batch(config, mesh) -> dict:
  """ShapeDtypeStructs of the tokenizer's global batch with their shardings."""
  return abstract_of(batch_shapes(config), mesh)


def check_divisible(config, mesh) -> None:
  """Every sub-batch an active branch uses must split evenly over the batch-sharding axes, and
  into `train.accum_steps` micro-batches of them."""
  n = sharding.batch_shards(mesh)
  b, b_ssl, b_rec = sub_batch_sizes(config)
  active = active_branches(config)
  for branch, name, size in (
      ('clip', 'data.batch_size', b),
      ('ssl', 'SSL sub-batch (batch_size*ssl_batch_fraction)', b_ssl),
      ('rec', 'rec sub-batch (batch_size*rec_batch_fraction)', b_rec)):
    if branch in active and size and size % n:
      raise ValueError(f'{name} = {size} does not divide over the {n} devices of the '
                       "('data', 'fsdp') mesh axes; change the batch size or mesh.")
  check_micro_batches({name: size for branch, name, size in (
      ('clip', 'CLIP batch (data.batch_size)', b), ('ssl', 'SSL sub-batch', b_ssl),
      ('rec', 'rec sub-batch', b_rec)) if branch in active}, config, mesh)


def synthetic_batch(config, seed: int = 0, n_devices: int | None = None) -> dict:
  """A random batch of the right shapes; masks collated per device of an `n_devices` run
  (default: every device JAX sees), so they fit each device's iBOT buffer."""
  n_devices = jax.device_count() if n_devices is None else n_devices
  rng = np.random.default_rng(seed)
  out = {}
  for branch, fields in batch_shapes(config).items():
    out[branch] = {}
    for field, (shape, dtype) in fields.items():
      if dtype == np.uint8:
        out[branch][field] = rng.integers(0, 256, shape, dtype=np.uint8)
      elif field == 'tokens':
        tokens = rng.integers(1, 49406, shape).astype(np.int32)
        tokens[:, 0] = 49406
        lengths = rng.integers(2, shape[1] + 1, shape[0])
        for row, length in enumerate(lengths):
          tokens[row, length - 1] = 49407
          tokens[row, length:] = 0
        out[branch][field] = tokens
      else:
        out[branch][field] = _synthetic_masks(config, shape, rng, n_devices)
  return out


def _synthetic_masks(config, shape, rng, n_devices):
  """iBOT masks collated per device like the pipeline's: in each collation of n images,
  int(n * prob) are masked, each at a ratio within the range (scattered patches, not blocks)."""
  b_ssl, n_crops, n_patches = shape
  per = mask_collate_samples(config, n_devices, b_ssl)
  r_max = config.data.mask_ratio_max
  masks = []
  for _ in range(b_ssl // per):
    mask = np.zeros((per * n_crops, n_patches), bool)
    for image in rng.permutation(per * n_crops)[:int(n_crops * per * config.data.mask_probability)]:
      ratio = rng.uniform(config.data.mask_ratio_min, r_max)
      count = min(max(int(n_patches * ratio), 1), int(n_patches * r_max))
      mask[image, rng.permutation(n_patches)[:count]] = True
    masks.append(mask)
  return np.concatenate(masks).reshape(shape)
