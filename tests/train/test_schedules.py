"""Schedules against closed-form NumPy values and DINOv2's table-based CosineScheduler."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vtp_jax.train import schedules


def _cfg(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(dict(
      optimizer='adamw', lr=4e-3, lr_scaling='sqrt', lr_reference_batch=1024, warmup_steps=100,
      schedule='cosine', final_lr=1e-6, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.04,
      weight_decay_end=0.4, layer_decay=0.9, patch_embed_lr_mult=0.2, clip_grad_norm=3.0,
      clip_grad_scope='global', freeze_last_layer_steps=10, momentum=0.992, momentum_end=1.0))
  c.update(overrides)
  return c


def _dinov2_cosine_table(base, final, total, warmup, start_warmup=0.0):
  """DINOv2 `CosineScheduler.__init__`, re-typed in NumPy (freeze_iters = 0)."""
  warm = np.linspace(start_warmup, base, warmup)
  iters = np.arange(total - warmup)
  cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
  return np.concatenate((warm, cos))


def test_lr_key_points_match_closed_form():
  total, warmup, batch = 1000, 100, 2048
  peak = 4e-3 * math.sqrt(batch / 1024)
  lr = schedules.lr_schedule(_cfg(), total, batch)
  expected = {
      0: 0.0,
      50: peak / 2,                  # half-way through the linear warm-up
      100: peak,                     # end of warm-up
      550: (peak + 1e-6) / 2,        # cosine midpoint
      1000: 1e-6,                    # end of the run
      5000: 1e-6,                    # held past the end
  }
  for step, want in expected.items():
    np.testing.assert_allclose(float(lr(step)), want, rtol=1e-5, atol=1e-12, err_msg=f'step {step}')
  # A generic cosine point, against the textbook formula.
  s = 300
  want = 1e-6 + 0.5 * (peak - 1e-6) * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
  np.testing.assert_allclose(float(lr(s)), want, rtol=1e-5)


def test_lr_within_one_step_of_dinov2_table():
  total, warmup = 400, 40
  table = _dinov2_cosine_table(2e-3, 1e-6, total, warmup)
  ours = np.asarray(jax.vmap(lambda s: schedules.warmup_cosine(
      s, peak_value=2e-3, warmup_steps=warmup, total_steps=total, final_value=1e-6))(
          jnp.arange(total)))
  # Identical from the end of warm-up on; DINOv2's linspace warm-up reaches the peak one step earlier.
  np.testing.assert_allclose(ours[warmup:], table[warmup:], rtol=1e-5, atol=1e-10)
  assert np.max(np.abs(ours[:warmup] - table[:warmup])) <= 2e-3 / (warmup - 1) * 1.001
  assert np.all(np.diff(ours[:warmup + 1]) > 0) and np.all(np.diff(ours[warmup:]) <= 0)


def test_lr_constant_after_warmup_and_zero_warmup():
  lr = schedules.lr_schedule(_cfg(schedule='constant', lr_scaling='none'), 1000, 256)
  np.testing.assert_allclose([float(lr(s)) for s in (50, 100, 700, 1000)],
                             [2e-3, 4e-3, 4e-3, 4e-3], rtol=1e-6)
  lr0 = schedules.lr_schedule(_cfg(warmup_steps=0, lr_scaling='none'), 1000, 256)
  np.testing.assert_allclose(float(lr0(0)), 4e-3, rtol=1e-6)
  np.testing.assert_allclose(float(lr0(500)), (4e-3 + 1e-6) / 2, rtol=1e-5)


def test_weight_decay_and_momentum_cosines():
  wd = schedules.weight_decay_schedule(_cfg(), 1000)
  np.testing.assert_allclose([float(wd(s)) for s in (0, 500, 1000, 2000)],
                             [0.04, 0.22, 0.4, 0.4], rtol=1e-6)
  np.testing.assert_allclose(float(wd(250)), 0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi / 4)),
                             rtol=1e-6)
  mom = schedules.momentum_schedule(_cfg(), 1000)
  np.testing.assert_allclose([float(mom(s)) for s in (0, 500, 1000)], [0.992, 0.996, 1.0], rtol=1e-7)


def test_peak_lr_scaling_rules():
  assert schedules.peak_lr(4e-3, 4096) == pytest.approx(8e-3)              # sqrt(4) = 2
  assert schedules.peak_lr(4e-3, 256, 'linear') == pytest.approx(1e-3)
  assert schedules.peak_lr(5e-4, 32768, 'none') == 5e-4
  assert schedules.peak_lr(1e-3, 512, 'sqrt', reference_batch=2048) == pytest.approx(5e-4)


def test_jit_safe_and_usable_as_optax_schedule():
  lr = schedules.lr_schedule(_cfg(), 1000, 1024)
  jitted = jax.jit(lr)
  for s in (0, 37, 100, 999):
    np.testing.assert_allclose(float(jitted(jnp.int32(s))), float(lr(s)), rtol=1e-6)
  tx = optax.scale_by_learning_rate(lr)
  state = tx.init({'w': jnp.ones(3)})
  for _ in range(51):
    upd, state = tx.update({'w': jnp.ones(3)}, state)
  np.testing.assert_allclose(np.asarray(upd['w']), -float(lr(50)), rtol=1e-6)


@pytest.mark.parametrize('overrides, total, match', [
    (dict(warmup_steps=2000), 1000, 'warmup_steps'),
    (dict(lr_scaling='cubic'), 1000, 'lr_scaling'),
    (dict(schedule='linear'), 1000, 'schedule'),
    (dict(lr=0.0), 1000, r'c\.optim\.lr='),
    (dict(final_lr=1.0), 1000, 'final_lr'),
    ({}, 0, 'c.train.steps'),
])
def test_bad_lr_config_raises(overrides, total, match):
  with pytest.raises(ValueError, match=match):
    schedules.lr_schedule(_cfg(**overrides), total, 1024)


def test_missing_and_bad_keys_raise():
  c = _cfg()
  del c['final_lr']
  with pytest.raises(ValueError, match='c.optim.final_lr is missing'):
    schedules.lr_schedule(c, 1000, 1024)
  with pytest.raises(ValueError, match='momentum'):
    schedules.momentum_schedule(_cfg(momentum_end=1.5), 1000)
  with pytest.raises(ValueError, match='weight_decay'):
    schedules.weight_decay_schedule(_cfg(weight_decay=-0.1), 1000)
