"""iBOT block-wise masks for the SSL global crops: BEiT's generator and DINOv2's collate rule.

`MaskingGenerator` draws rectangular blocks of patches until a target count is reached (BEiT,
as DINOv2 uses it); `collate_masks` decides which of a sub-batch's global-crop images are masked
and at which ratio (DINOv2's `collate_data_and_cast`), returning the bool (Bs, 2, N) array of the
batch contract (vtp_jax/batch.py). Every draw comes from a numpy Generator, so masks are a pure
function of the seed the pipeline derives for the batch.

Why the static iBOT buffer of a device group (`vtp_jax.batch.ibot_buffer_size`) always holds its
masks: the pipeline collates per device, and a collation of n global-crop images masks int(n * p)
of them, each with at most int(N * ratio_max) patches (the generator never overshoots its target).
Summed over the k collations of a group that is k * int(n * p) * int(N * ratio_max) <=
int(k * n * p) * int(N * ratio_max), the group's buffer size, because a sum of floors never
exceeds the floor of the sum.
"""

import math
from typing import NamedTuple

import numpy as np

from vtp_jax.batch import N_GLOBAL_CROPS


class Block(NamedTuple):
  """One placed rectangle: top-left corner, size, and how many patches it newly masked."""
  top: int
  left: int
  height: int
  width: int
  new: int


class MaskingGenerator:
  """BEiT block-wise masking on a (height, width) patch grid.

  Each block draws an area uniform in [min_block_patches, max_block], with max_block the smaller
  of the patches still wanted and `max_block_patches`, and an aspect ratio log-uniform in
  [min_aspect, 1/min_aspect]; it is kept if it fits strictly inside the grid and adds between 1
  and max_block new patches. A round of `attempts` draws that adds nothing ends the mask, so the
  count can fall short of the target (by less than a minimum block, typically) but never exceeds it.
  """

  def __init__(self, grid: int | tuple[int, int], *, min_block_patches: int = 4,
               max_block_patches: float | None = None, min_aspect: float = 0.3,
               attempts: int = 10):
    self.height, self.width = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if self.height < 1 or self.width < 1:
      raise ValueError(f'mask grid {grid} is empty; check data.global_crop_size vs patch_size.')
    if not 0 < min_aspect <= 1:
      raise ValueError(f'data.mask_min_aspect={min_aspect} must lie in (0, 1]; the aspect range '
                       'is [min, 1/min].')
    if attempts < 1:
      raise ValueError(f'data.mask_attempts={attempts} must be at least 1.')
    self.num_patches = self.height * self.width
    self.min_block_patches = min_block_patches
    self.max_block_patches = (self.num_patches * 0.5 if max_block_patches is None
                              else max_block_patches)
    self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    self.attempts = attempts

  def _place_block(self, mask: np.ndarray, max_block: float, rng: np.random.Generator,
                   blocks: list | None) -> int:
    """One round of up to `attempts` draws; returns the number of newly masked patches."""
    for _ in range(self.attempts):
      # Like Python's random.uniform, allow max_block < min_block_patches (few patches left).
      area = self.min_block_patches + (max_block - self.min_block_patches) * rng.random()
      aspect = math.exp(rng.uniform(*self.log_aspect))
      h = int(round(math.sqrt(area * aspect)))
      w = int(round(math.sqrt(area / aspect)))
      if w < self.width and h < self.height:
        top = int(rng.integers(0, self.height - h + 1))
        left = int(rng.integers(0, self.width - w + 1))
        window = mask[top:top + h, left:left + w]
        new = h * w - int(window.sum())
        if 0 < new <= max_block:
          window[...] = True
          if blocks is not None:
            blocks.append(Block(top, left, h, w, new))
          return new
    return 0

  def __call__(self, num_masked: int, rng: np.random.Generator,
               blocks: list | None = None) -> np.ndarray:
    """A bool (height, width) mask with at most `num_masked` patches set.

    If `blocks` is a list, every placed Block is appended to it (for tests and inspection).
    """
    mask = np.zeros((self.height, self.width), bool)
    count = 0
    while count < num_masked:
      max_block = min(num_masked - count, self.max_block_patches)
      delta = self._place_block(mask, max_block, rng, blocks)
      if delta == 0:
        break
      count += delta
    return mask


def generator_from_config(config) -> MaskingGenerator:
  d = config.data
  side = d.global_crop_size // config.model.patch_size
  return MaskingGenerator(
      side, min_block_patches=d.mask_min_block_patches,
      max_block_patches=d.mask_max_block_fraction * side * side,
      min_aspect=d.mask_min_aspect, attempts=d.mask_attempts)


def collate_masks(n_samples: int, n_crops: int, generator: MaskingGenerator,
                  probability: float, ratio_min: float, ratio_max: float,
                  rng: np.random.Generator) -> np.ndarray:
  """DINOv2's collate rule over the n = n_samples * n_crops global-crop images of a sub-batch.

  Exactly int(n * probability) images are masked; the i-th of them draws its target count as
  int(N * U(r_i, r_{i+1})) over the strata r = linspace(ratio_min, ratio_max, n_masked + 1), so
  the ratios spread over the whole range; the masks are then shuffled over the n images.
  Returns bool (n_samples, n_crops, N).
  """
  n_images = n_samples * n_crops
  n_patches = generator.num_patches
  n_masked = int(n_images * probability)
  strata = np.linspace(ratio_min, ratio_max, n_masked + 1)
  masks = np.zeros((n_images, n_patches), bool)
  for i in range(n_masked):
    target = int(n_patches * rng.uniform(strata[i], strata[i + 1]))
    masks[i] = generator(target, rng).reshape(-1)
  masks = masks[rng.permutation(n_images)]
  return masks.reshape(n_samples, n_crops, n_patches)


def ssl_masks(config, n_samples: int, rng: np.random.Generator,
              collate_samples: int | None = None) -> np.ndarray:
  """Masks for a host-local SSL sub-batch of `n_samples` images (2 global crops each), collated
  in consecutive runs of `collate_samples` samples (default: all at once). The pipeline collates
  per device (`vtp_jax.batch.mask_collate_samples`), as DINOv2 collates per rank."""
  d = config.data
  if not 0 <= d.mask_ratio_min <= d.mask_ratio_max <= 1:
    raise ValueError(f'data.mask_ratio_min={d.mask_ratio_min}, data.mask_ratio_max='
                     f'{d.mask_ratio_max}: need 0 <= min <= max <= 1.')
  if not 0 <= d.mask_probability <= 1:
    raise ValueError(f'data.mask_probability={d.mask_probability} must lie in [0, 1].')
  per = math.gcd(collate_samples or n_samples, n_samples) or 1
  generator = generator_from_config(config)
  return np.concatenate(
      [collate_masks(per, N_GLOBAL_CROPS, generator, d.mask_probability, d.mask_ratio_min,
                     d.mask_ratio_max, rng) for _ in range(max(n_samples // per, 1))]
  )[:n_samples]
