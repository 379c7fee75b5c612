"""iBOT masks: BEiT block generator constraints and DINOv2's collate counts (spec 2.3)."""

import math

import numpy as np
import pytest
from conftest import micro_config

from vtp_jax import batch as batch_lib
from vtp_jax.data import masking


def _union(blocks, side):
  mask = np.zeros((side, side), bool)
  for b in blocks:
    mask[b.top:b.top + b.height, b.left:b.left + b.width] = True
  return mask


def test_blocks_respect_size_aspect_and_grid_and_never_overshoot():
  side, min_aspect, min_block = 14, 0.3, 4
  n = side * side
  max_block = 0.5 * n
  gen = masking.MaskingGenerator(side, min_block_patches=min_block, max_block_patches=max_block,
                                 min_aspect=min_aspect, attempts=10)
  rng = np.random.default_rng(0)
  shortfalls, log_aspects = [], []
  for _ in range(1500):
    target = int(n * rng.uniform(0.1, 0.5))
    blocks = []
    mask = gen(target, rng, blocks)
    # The mask is exactly the union of the reported blocks, and never exceeds its target.
    np.testing.assert_array_equal(mask, _union(blocks, side))
    assert mask.sum() == sum(b.new for b in blocks) <= target
    shortfalls.append(target - mask.sum())
    remaining = target
    for b in blocks:
      # Strictly inside the grid (BEiT's `w < width and h < height`), 1..max new patches each,
      # and never more than was still wanted.
      assert 1 <= b.height < side and 1 <= b.width < side
      assert 0 <= b.top <= side - b.height and 0 <= b.left <= side - b.width
      assert 1 <= b.new <= min(max_block, remaining)
      # h = round(sqrt(A r)), w = round(sqrt(A / r)) with A drawn in [min_block, max(min_block,
      # min(max_block, remaining))] (or [remaining, min_block] when fewer than a block remain), so
      # (h - 1/2)(w - 1/2) <= A <= (h + 1/2)(w + 1/2) bounds the block area.
      a_lo = min(min_block, remaining)
      a_hi = max(min_block, min(max_block, remaining))
      assert (b.height - 0.5) * (b.width - 0.5) <= a_hi
      assert (b.height + 0.5) * (b.width + 0.5) >= a_lo
      remaining -= b.new
      log_aspects.append(math.log(b.height / b.width))
  shortfalls = np.asarray(shortfalls)
  # BEiT stops after one failed round of 10 draws, so it may under-fill; with a minimum block of 4
  # the shortfall is below one block in nearly every draw.
  assert (shortfalls < min_block).mean() > 0.99 and shortfalls.mean() < 1.0
  # Both tall and wide blocks occur: the aspect draw spans its log range.
  log_aspects = np.asarray(log_aspects)
  assert log_aspects.min() <= math.log(0.5) and log_aspects.max() >= math.log(2.0)
  assert abs(np.mean(log_aspects)) < 0.1  # log-uniform range symmetric about 0


@pytest.mark.parametrize('n_samples,prob', [(8, 0.5), (5, 0.5), (3, 0.3), (4, 1.0), (2, 0.0)])
def test_collate_masks_counts_and_ratios(n_samples, prob):
  side, r_min, r_max = 8, 0.1, 0.5
  n = side * side
  gen = masking.MaskingGenerator(side, max_block_patches=0.5 * n)
  rng = np.random.default_rng(1)
  n_images = 2 * n_samples
  n_masked = int(n_images * prob)
  fractions = []
  for _ in range(60):
    masks = masking.collate_masks(n_samples, 2, gen, prob, r_min, r_max, rng)
    assert masks.shape == (n_samples, 2, n) and masks.dtype == np.bool_
    counts = masks.reshape(n_images, n).sum(-1)
    # Exactly int(n * p) images are masked (each gets a target >= int(64 * 0.1) = 6 patches).
    assert (counts > 0).sum() == n_masked
    assert counts.max(initial=0) <= int(n * r_max)
    assert counts.sum() <= n_masked * int(n * r_max)
    fractions.extend(counts[counts > 0] / n)
  if n_masked:
    fractions = np.asarray(fractions)
    # Targets are int(N U(stratum)); the generator under-fills by < 4 patches (see above).
    assert fractions.min() >= (int(n * r_min) - 3) / n and fractions.max() <= r_max
    if n_masked >= 4:  # stratified draws reach both ends of the ratio range
      assert fractions.min() < r_min + 0.1 and fractions.max() > r_max - 0.1


def test_masks_are_deterministic_in_the_generator():
  gen = masking.MaskingGenerator(6)
  a = masking.collate_masks(4, 2, gen, 0.5, 0.1, 0.5, np.random.default_rng(7))
  b = masking.collate_masks(4, 2, gen, 0.5, 0.1, 0.5, np.random.default_rng(7))
  c = masking.collate_masks(4, 2, gen, 0.5, 0.1, 0.5, np.random.default_rng(8))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize('batch_size,ssl_fraction,prob,processes', [
    (32, 0.25, 0.5, 1), (32, 0.25, 0.5, 4), (48, 0.25, 0.3, 4), (24, 0.5, 0.7, 3),
    (40, 0.25, 0.45, 5)])
def test_host_masks_fit_the_global_ibot_buffer(batch_size, ssl_fraction, prob, processes):
  config = micro_config()
  config.data.update(batch_size=batch_size, ssl_batch_fraction=ssl_fraction,
                     mask_probability=prob)
  buffer = batch_lib.ibot_buffer_size(config)
  _, b_ssl, _ = batch_lib.sub_batch_sizes(config)
  n_patches = batch_lib.patches_per_global_crop(config)
  # Independent statement of the bound: P hosts each mask int(2 (Bs/P) p) images of at most
  # int(N r_max) patches; the global buffer is int(2 Bs p) * int(N r_max).
  per_host_images = int(2 * (b_ssl // processes) * prob)
  assert processes * per_host_images * int(n_patches * config.data.mask_ratio_max) <= buffer
  rng = np.random.default_rng(0)
  for _ in range(20):
    total = sum(masking.ssl_masks(config, b_ssl // processes, rng).sum()
                for _ in range(processes))
    assert total <= buffer


def test_bad_ranges_are_refused():
  config = micro_config()
  config.data.mask_ratio_min = 0.6
  with pytest.raises(ValueError, match='mask_ratio_min'):
    masking.ssl_masks(config, 2, np.random.default_rng(0))
  with pytest.raises(ValueError, match='mask_min_aspect'):
    masking.MaskingGenerator(4, min_aspect=2.0)
