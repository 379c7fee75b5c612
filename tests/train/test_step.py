"""The fused train step: sharded equals single-device, exact EMA, losses fall, λ=0 removes work."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import assert_abstract_state_describes, micro_config
from vtp_jax import batch as batch_lib
from vtp_jax import sharding
from vtp_jax.train import state as state_lib
from vtp_jax.train import step as step_lib


def step_config(**loss):
  c = micro_config()
  c.data.update(batch_size=8, ssl_batch_fraction=0.5, rec_batch_fraction=0.5,
                global_crop_size=32, local_crop_size=16, n_local_crops=2)
  c.optim.update(warmup_steps=2, freeze_last_layer_steps=1)
  c.train.steps = 100
  c.loss.teacher_temp_warmup_steps = 10
  c.loss.update(loss)
  return c


def _mesh(data, fsdp, tensor):
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)),
                            devices=jax.devices()[:data * fsdp * tensor])


def _run(config, mesh, n_steps, batch, check_abstract=False):
  state, shardings, tx = state_lib.create(config, mesh)
  if check_abstract:
    assert_abstract_state_describes(state, config, mesh)
  step = step_lib.make_train_step(config, mesh, shardings, tx)
  frozen = step_lib.frozen_inputs(config)
  history = []
  for i in range(n_steps):
    if i == n_steps - 1:
      before = jax.device_get(state)  # the state the last step starts from (it is donated)
    state, metrics = step(state, batch, frozen)
    history.append(jax.device_get(metrics))
  return before, jax.device_get(state), history


@pytest.mark.heavy
def test_sharded_step_equals_single_device_step_and_teacher_is_exact_ema():
  config = step_config(lpips_weight=0.0)  # LPIPS is covered below; VGG16 triples compile time
  batch = batch_lib.synthetic_batch(config)
  before_1, after_1, hist_1 = _run(config, _mesh(1, 1, 1), 2, batch)
  _, after_8, hist_8 = _run(config, _mesh(2, 2, 2), 2, batch, check_abstract=True)
  for key in ('loss', 'clip', 'dino', 'ibot', 'koleo', 'l1'):
    np.testing.assert_allclose(hist_8[-1][key], hist_1[-1][key], rtol=2e-5, err_msg=key)
  # Adam moves every element by about lr whatever its gradient's size, so an element whose gradient
  # is float32 noise (summed in another order on 8 devices) may move either way: the absolute
  # tolerance is 2% of the tensor's largest step-2 update (at least 2e-6).
  def close(a, b, b_before):
    step_size = np.abs(b - b_before).max()
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=max(2e-6, 2e-2 * step_size))

  jax.tree.map(close, after_8.params, after_1.params, before_1.params)
  # Teacher after step 2 = m * teacher_before + (1 - m) * student_after, with m at step 1.
  m = np.float32(hist_1[-1]['teacher_momentum'])
  one_minus_m = np.float32(1) - m

  def ema(t, s):
    # m*t + (1-m)*s in float32, each product and the sum rounded: conftest compiles with LLVM at
    # -O0, which does not contract the multiply-add into an FMA. (At -O1 and above XLA:CPU does:
    # then the sum rounds once, and the expectation is float64(m)*t + float32((1-m)*s), rounded.)
    return m * t + one_minus_m * s

  expected = jax.tree.map(ema, before_1.teacher, state_lib.teacher_of(after_1.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=0), after_1.teacher,
               expected)


def smooth_images(batch, seed=0):
  """Replaces every uint8 image by a smooth one (a 4x4 random field, bilinearly upsampled), so a
  small bottleneck can learn to reconstruct it; uniform noise is incompressible by design."""
  rng = np.random.default_rng(seed)

  def smooth(x):
    if x.dtype != np.uint8:
      return x
    *lead, h, w, c = x.shape
    coarse = rng.uniform(0, 255, (*lead, 4, 4, c)).astype(np.float32)
    fine = jax.image.resize(coarse, (*lead, h, w, c), 'bilinear')
    return np.asarray(fine).round().clip(0, 255).astype(np.uint8)

  return jax.tree.map(smooth, batch)


def _descent_config(**loss):
  """1 reconstructed image, constant lr 3e-3 after a 10-step warm-up, no decay."""
  config = step_config(**loss)
  config.data.rec_batch_fraction = 0.125
  config.optim.update(lr=3e-3, lr_scaling='none', warmup_steps=10, schedule='constant',
                      weight_decay=0.0, weight_decay_end=0.0, layer_decay=1.0,
                      patch_embed_lr_mult=1.0)
  return config


@pytest.mark.heavy
def test_eight_steps_drive_lpips_down():
  """LPIPS apart from the losses below: its VGG16 on the micro config's 32 px images is 85% of a
  step's time on CPU (2 x 2 maps are a slow case for XLA:CPU convolutions; docs/benchmarks.md,
  'LPIPS at 32 px'). Reconstruction alone, L1 + LPIPS. Measured: LPIPS 0.896 -> 0.675 at step 8
  (0.551 at step 10), L1 0.382 -> 0.372."""
  config = _descent_config(clip_weight=0.0, ssl_weight=0.0)
  batch = smooth_images(batch_lib.synthetic_batch(config))
  _, _, hist = _run(config, _mesh(1, 1, 1), 8, batch)
  assert hist[-1]['lpips'] < 0.9 * hist[0]['lpips'], (hist[0]['lpips'], hist[-1]['lpips'])
  assert hist[-1]['l1'] < hist[0]['l1'], (hist[0]['l1'], hist[-1]['l1'])


@pytest.mark.heavy
def test_sixty_steps_drive_every_other_enabled_loss_down():
  # The first 60 of the config's 100 steps, LPIPS off (the test above). Measured here: L1 0.403
  # -> 0.012, CLIP 3.96 -> 0.00 by step 60 (with 4 reconstructed images and the default cosine
  # decay to step 100, L1 only reached 0.19 there).
  config = _descent_config(koleo_weight=0.0, lpips_weight=0.0)
  batch = smooth_images(batch_lib.synthetic_batch(config))
  _, _, hist = _run(config, _mesh(1, 1, 1), 60, batch)
  first, last = hist[0], hist[-1]
  b = config.data.batch_size
  # Stated targets: CLIP below half of ln B on this fixed batch; L1 below half its start.
  assert last['clip'] < 0.5 * np.log(b), (first['clip'], last['clip'])
  assert last['l1'] < 0.5 * first['l1'], (first['l1'], last['l1'])
  # On 4 images the centred teacher drifts to uniform (entropy -> ln K), so the DINO cross-entropy
  # itself rises with the teacher's entropy; what the student controls is the gap to it, the mean
  # KL(teacher || student) over crop pairs. Measured: 0.73 -> 0.0049 by step 60.
  kl_first = first['dino'] - first['teacher_entropy']
  kl_last = last['dino'] - last['teacher_entropy']
  assert kl_last < 0.1 * kl_first, (kl_first, kl_last)
  # iBOT likewise: its floor is the teacher's entropy on the masked tokens, counted as the loss counts
  # them (each masked global-crop image weighs 1 / all global-crop images; the mean patch entropy
  # stands in for each image's). Measured: the gap 2.32 -> 0.72 at step 5 -> 0.0006 at step 60.
  # Step 5 is what shows iBOT's own gradient at work: with the student's patch logits cut from it
  # (mutation), the gap widens to 3.22 at step 5 and closes only later, through the head DINO trains.
  # A fixed fraction of the iBOT loss itself is no test: its start depends on the random prototypes.
  masks = np.asarray(batch['ssl']['mask'])
  masked_share = masks.reshape(-1, masks.shape[-1]).any(-1).mean()
  ibot_gap = lambda h: h['ibot'] - masked_share * h['teacher_patch_entropy']
  assert ibot_gap(hist[5]) < 0.5 * ibot_gap(first), (ibot_gap(first), ibot_gap(hist[5]))
  assert ibot_gap(last) < 0.1 * ibot_gap(first), (ibot_gap(first), ibot_gap(last))


@functools.lru_cache(maxsize=None)
def _flops_of(overrides):
  return _flops(step_config(**dict(overrides)))


def _flops(config):
  mesh = _mesh(1, 1, 1)
  state, shardings, tx = state_lib.create(config, mesh, abstract=True)  # lower() needs no arrays
  step = step_lib.make_train_step(config, mesh, shardings, tx)
  # Shapes only, from the modules that define them: no batch is drawn, no weights are read.
  abstract_batch = {branch: {field: jax.ShapeDtypeStruct(shape, dtype)
                             for field, (shape, dtype) in fields.items()}
                    for branch, fields in batch_lib.batch_shapes(config).items()}
  frozen = step_lib.frozen_inputs_abstract(config)
  with jax.set_mesh(mesh):
    # The lowered (pre-optimisation) HLO's count: a branch that is not traced is absent from it,
    # and this skips XLA's compile.
    cost = step.jitted.lower(state, abstract_batch, frozen).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost['flops']


@pytest.mark.parametrize('zeroed', ['clip_weight', 'ssl_weight', 'rec_weight'])
def test_zero_weight_removes_the_branch_from_the_compiled_step(zeroed):
  full = _flops_of((('lpips_weight', 0.0),))
  reduced = _flops_of((('lpips_weight', 0.0), (zeroed, 0.0)))
  assert reduced < 0.95 * full, (zeroed, reduced, full)
