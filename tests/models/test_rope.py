"""RoPE options against the DINOv3 formulas written out in NumPy (float32 mode: no rounding)."""

import math

import jax
import numpy as np
import pytest

from vtp_jax.models import rope


def test_min_max_periods_follow_the_dinov3_formula():
  spec = rope.RopeSpec(head_dim=32, base=0.0, min_period=0.5, max_period=40.0, dtype='float32')
  exponents = np.linspace(0, 1, 8)
  want = (40.0 / 0.5) ** exponents / (40.0 / 0.5) * 40.0
  np.testing.assert_allclose(rope.periods(spec), want, rtol=1e-6)


@pytest.mark.parametrize('mode,div_h,div_w', [('separate', 2, 3), ('min', 2, 2), ('max', 3, 3)])
def test_coordinate_normalisation_modes(mode, div_h, div_w):
  spec = rope.RopeSpec(head_dim=8, base=100.0, normalize_coords=mode, dtype='float32')
  sin, cos = rope.sincos_table(spec, 2, 3)
  periods = 100.0 ** (np.arange(2) * 2 / 4)
  for token, (y, x) in enumerate([(y, x) for y in range(2) for x in range(3)]):
    cy, cx = 2 * (y + 0.5) / div_h - 1, 2 * (x + 0.5) / div_w - 1
    angles = np.concatenate([2 * math.pi * cy / periods, 2 * math.pi * cx / periods])
    angles = np.tile(angles, 2)
    np.testing.assert_allclose(sin[token], np.sin(angles), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cos[token], np.cos(angles), rtol=1e-5, atol=1e-6)


def test_shift_augmentation_moves_both_axes_by_one_draw():
  plain = rope.RopeSpec(head_dim=8, dtype='float32')
  shifted = rope.RopeSpec(head_dim=8, shift=0.5, dtype='float32')
  base_sin, _ = rope.rope_tables(plain, 2, 2)
  np.testing.assert_array_equal(rope.rope_tables(shifted, 2, 2)[0], base_sin)  # no rng: eval
  sin, cos = rope.rope_tables(shifted, 2, 2, rng=jax.random.key(0))
  # Recover the row/column coordinates from the lowest frequency (period 1): angle = 2 pi c.
  angle_rows = np.arctan2(np.asarray(sin)[:, 0], np.asarray(cos)[:, 0]) / (2 * math.pi)
  angle_cols = np.arctan2(np.asarray(sin)[:, 2], np.asarray(cos)[:, 2]) / (2 * math.pi)
  base_rows = np.array([-0.5, -0.5, 0.5, 0.5])
  base_cols = np.array([-0.5, 0.5, -0.5, 0.5])
  shift_rows = np.mod(angle_rows - base_rows + 0.5, 1.0) - 0.5
  shift_cols = np.mod(angle_cols - base_cols + 0.5, 1.0) - 0.5
  assert np.ptp(shift_rows) < 1e-5 and np.ptp(shift_cols) < 1e-5  # one shift per axis
  assert abs(shift_rows[0]) <= 0.5 and abs(shift_rows[0] - shift_cols[0]) > 1e-4


def test_bad_settings_name_the_key():
  with pytest.raises(ValueError, match='normalize_coords'):
    rope.RopeSpec(head_dim=8, normalize_coords='diag')
  with pytest.raises(ValueError, match='divisible by 4'):
    rope.RopeSpec(head_dim=6)
