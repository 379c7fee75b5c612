"""`train.accum_steps`: the accumulated step against the whole-batch step on the faked 8 devices,
and the config check for batches that do not split into micro-batches."""

import jax
import ml_collections
import numpy as np
import pytest

from configs import ae_baseline, vtp_tiny
from conftest import shrink_model
from vtp_jax import batch as batch_lib
from vtp_jax import sharding
from vtp_jax.train import flops as flops_lib
from vtp_jax.train import state as state_lib
from vtp_jax.train import step as step_lib

RTOL = 1e-5


def _mesh(data=1, fsdp=2, tensor=4):
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)),
                            devices=jax.devices()[:data * fsdp * tensor])


def tiny_config(accum_steps=1, base=vtp_tiny.get_config, shrunk=True, **loss):
  """vtp_tiny (float32; its model shrunk to the micro size unless `shrunk` is False) with a
  reconstruction sub-batch of 8, so each sub-batch gives every one of 2 batch shards a row in each
  of 4 micro-batches. Adam's epsilon is 1: the update is then
  close to linear in the gradient, so the parameters measure the gradient's agreement rather than
  Adam's normalisation of float32 noise (a gradient that is 0 in exact arithmetic, like the key
  bias's, is scaled up to a full step of random sign)."""
  c = shrink_model(base()) if shrunk else base()
  c.evals.at_end = False
  c.data.rec_batch_fraction = min(1.0, c.data.rec_batch_fraction * 2)
  c.optim.eps = 1.0
  c.loss.update(loss)
  c.train.accum_steps = accum_steps
  return c


def _run(config, mesh, batches):
  state, shardings, tx = state_lib.create(config, mesh)
  before = jax.device_get(state)
  step = step_lib.make_train_step(config, mesh, shardings, tx)
  frozen = step_lib.frozen_inputs(config)
  history = []
  for batch in batches:
    state, metrics = step(state, batch, frozen)
    history.append(jax.device_get(metrics))
  return before, jax.device_get(state), history


def _assert_same_update(accumulated, whole, before, what):
  """Each tensor agrees to RTOL of its own values and of how far the three steps moved it."""
  def close(path, a, b, b0):
    moved = float(np.max(np.abs(b - b0))) if b.size else 0.0
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * max(moved, 1e-12),
                               err_msg=f'{what}{jax.tree_util.keystr(path)}')

  jax.tree_util.tree_map_with_path(close, accumulated, whole, before)


def _compare(whole_config, accum_config, n_steps=3):
  mesh = _mesh()
  # The accumulated config's batches: iBOT masks collated per device and micro-batch, which the
  # whole-batch step's buffer holds as well (a finer collation never masks more).
  batches = [batch_lib.synthetic_batch(accum_config, seed=i) for i in range(n_steps)]
  before, whole, hist_whole = _run(whole_config, mesh, batches)
  _, accumulated, hist_accum = _run(accum_config, mesh, batches)
  for step, (h_whole, h_accum) in enumerate(zip(hist_whole, hist_accum)):
    for name, value in h_whole.items():
      np.testing.assert_allclose(h_accum[name], value, rtol=RTOL, atol=1e-7,
                                 err_msg=f'step {step}: {name}')
  _assert_same_update(accumulated.params, whole.params, before.params, 'params')
  _assert_same_update(accumulated.teacher, whole.teacher, before.teacher, 'teacher')
  _assert_same_update(accumulated.loss_state, whole.loss_state, before.loss_state, 'centres')
  return hist_whole


@pytest.mark.heavy
def test_accumulated_step_equals_whole_batch_step_with_centering_and_softmax_clip():
  loss = dict(teacher_norm='centering', clip_type='softmax', lpips_weight=0.0)
  hist = _compare(tiny_config(1, **loss), tiny_config(4, **loss))
  assert hist[-1]['koleo'] != 0 and hist[-1]['ibot'] != 0  # every coupled term took part


@pytest.mark.heavy
def test_accumulated_step_equals_whole_batch_step_with_sinkhorn_and_sigmoid_clip():
  # Also scanned blocks under full remat: accumulation composes with them.
  def config(k):
    c = tiny_config(k, teacher_norm='sinkhorn', clip_type='sigmoid', lpips_weight=0.0)
    c.model.logit_bias = True
    c.precision.update(scan_layers=True, remat_policy='full')
    return c

  hist = _compare(config(1), config(4))
  assert 'clip_bias' in hist[-1]


@pytest.mark.heavy
def test_accumulated_step_equals_whole_batch_step_for_the_autoencoder_baseline():
  # Under nan_policy='skip' (its select wraps the accumulated step alike).
  def config(k):
    c = tiny_config(k, base=ae_baseline.get_config, lpips_weight=0.0)
    c.train.nan_policy = 'skip'
    return c

  hist = _compare(config(1), config(4))
  assert hist[-1]['l1'] > 0 and all(h['update_skipped'] == 0 for h in hist)


def test_config_check_names_the_sub_batch_that_does_not_split():
  mesh = _mesh()  # 2 batch shards
  config = tiny_config(4)
  config.data.rec_batch_fraction = 0.125  # 4 rows: 2 a device, not 4 micro-batches of them
  with pytest.raises(ValueError, match=r'accum_steps=4 .*rec sub-batch of 4 .* 2 per device '
                                       r'leaves 0 per micro-batch'):
    batch_lib.check_divisible(config, mesh)
  config = tiny_config(3)
  with pytest.raises(ValueError, match=r'CLIP batch .* of 32 .* 16 per device do not split '
                                       r'into 3'):
    batch_lib.check_divisible(config, mesh)
  config.train.accum_steps = 0
  with pytest.raises(ValueError, match='positive int'):
    batch_lib.check_divisible(config, mesh)


def test_micro_batch_buffers_and_cache_flops():
  whole, accum = tiny_config(1, shrunk=False), tiny_config(4, shrunk=False)
  # Masks collate per device and micro-batch: of 2 devices' 8 SSL samples a device collates 4,
  # and each of its 4 micro-batches 1.
  assert batch_lib.mask_collate_samples(whole, 2, 8) == 4
  assert batch_lib.mask_collate_samples(accum, 2, 8) == 1
  n_patches = batch_lib.patches_per_global_crop(whole)
  per_image = int(n_patches * whole.data.mask_ratio_max)
  # A group of the 2 shards' holds 8 global crops, int(8 * 0.5) masked; in a micro-batch 2, 1.
  assert batch_lib.ibot_buffer_size(whole, 2) == 4 * per_image
  assert batch_lib.ibot_buffer_size(accum, 2) == 1 * per_image
  f_whole, f_accum = flops_lib.step_flops(whole), flops_lib.step_flops(accum)
  assert 'accum_cache' not in f_whole
  image = flops_lib.encoder_forward(whole, whole.data.image_size) + 2 * 128 * 128
  expected_cache = (32 * (image + flops_lib.text_forward(whole)) +
                    16 * flops_lib.encoder_forward(whole, whole.data.global_crop_size))
  np.testing.assert_allclose(f_accum['accum_cache'], expected_cache, rtol=1e-12)
  assert f_accum['total'] == f_whole['total']  # the model's FLOPs: the same step
