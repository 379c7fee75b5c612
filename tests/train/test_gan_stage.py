"""The decoder GAN stage: the discriminator's layout and norm, the adaptive-weight gradient against
direct autodiff, and a few steps that move only the decoder and the discriminator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_abstract_state_describes, micro_config

from configs import gan_stage as gan_config
from vtp_jax import tasks
from vtp_jax import batch as batch_lib
from vtp_jax import losses
from vtp_jax import pixels
from vtp_jax import sharding
from vtp_jax.models import discriminator
from vtp_jax.train import gan_stage
from vtp_jax.train import step as step_lib


def _gan_config(lpips_weight=0.0, start_step=0):
  config = gan_config.to_gan_stage(micro_config(), steps=10)
  config.data.batch_size = 4
  config.loss.lpips_weight = lpips_weight
  config.gan.update(start_step=start_step, disc_channels=8, disc_layers=2, lr=1e-3, disc_lr=1e-3)
  return config


def test_patch_discriminator_layout_and_batch_norm():
  disc = discriminator.PatchDiscriminator(channels=8, n_layers=3)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  # Jitted: op-by-op dispatch of the convolutions took most of this test's time.
  params = jax.jit(disc.init)(jax.random.key(1), x)['params']
  # 4x4 convs padded by 1: stride 2 halves (32->16->8->4), stride 1 takes 1 off (4->3->2).
  assert jax.eval_shape(disc.apply, {'params': params}, x).shape == (2, 2, 2)
  widths = [params[n]['kernel'].shape[-1] for n in ('conv_in', 'conv_1', 'conv_2', 'conv_3',
                                                    'conv_out')]
  assert widths == [8, 16, 32, 64, 1]
  assert 'bias' not in params['conv_1'] and 'bias' in params['conv_in']

  y = np.random.default_rng(0).normal(3.0, 2.0, (4, 5, 5, 6)).astype(np.float32)
  norm = discriminator.BatchStatNorm()
  norm_params = norm.init(jax.random.key(0), y)['params']
  mean = y.mean(axis=(0, 1, 2))
  var = y.var(axis=(0, 1, 2))
  expected = (y - mean) / np.sqrt(var + 1e-5) * np.asarray(norm_params['scale']) + np.asarray(
      norm_params['bias'])
  np.testing.assert_allclose(norm.apply({'params': norm_params}, y), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.heavy
def test_decoder_gradient_equals_direct_autodiff_of_the_ldm_objective():
  """The step's VJP-linearity shortcut against jax.grad of each term through the whole decoder."""
  config = _gan_config()
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  state, _, tx = tasks.for_config(config).create_state(config, mesh)
  batch = batch_lib.synthetic_batch(config, seed=1)
  gan = gan_stage.GanStep(config, tx)
  m, disc = gan.model, gan.disc
  params, disc_params = state.params, state.disc['params']
  target = pixels.normalize_on_device(jnp.asarray(batch['rec']['image']))
  latents = m.apply({'params': params}, target, method=m.latents)

  def pred_of(dec):
    return m.apply({'params': {**params, 'decoder': dec}}, latents, method=m.decode)

  def nll(dec):
    return losses.reconstruction_loss(pred_of(dec), target, None, 1.0, 0.0, 'pixel')[0]

  def g(dec):
    x = losses.to_lpips_range(losses.denormalize_imagenet(pred_of(dec)))
    return -jnp.mean(disc.apply({'params': disc_params}, x))

  # Jitted: op-by-op dispatch of these gradients took most of this test's time.
  g_nll, g_g = jax.jit(lambda d: (jax.grad(nll)(d), jax.grad(g)(d)))(params['decoder'])
  ratio = (np.linalg.norm(g_nll['proj_out']['kernel'])
           / (np.linalg.norm(g_g['proj_out']['kernel']) + 1e-4))
  weight = config.gan.disc_weight * min(max(ratio, 0.0), config.gan.max_adaptive_weight)
  expected = jax.tree.map(lambda a, b: a + weight * b, g_nll, g_g)

  captured = {}
  real_update = gan.tx.update

  def spy(grads, opt_state, params=None):
    captured['grads'] = grads
    return real_update(grads, opt_state, params)

  gan.tx = gan.tx._replace(update=spy)

  @jax.jit
  def step_and_grads(state, batch):
    _, metrics = gan(state, batch, {})
    return metrics, captured['grads']  # the spy's tracers, returned from the same trace

  metrics, grads = step_and_grads(state, jax.tree.map(jnp.asarray, batch))
  np.testing.assert_allclose(float(metrics['adaptive_weight']), weight, rtol=1e-4)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-7)


@pytest.mark.heavy
def test_steps_train_decoder_and_discriminator_only():
  start_step = 2  # two steps without and two with the GAN terms
  config = _gan_config(start_step=start_step)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:2])  # batch-parallel over 2 devices
  state, shardings, tx = tasks.for_config(config).create_state(config, mesh)
  assert_abstract_state_describes(state, config, mesh)
  before = jax.tree.map(np.asarray, state.params)
  disc_before = jax.tree.map(np.asarray, state.disc['params'])
  run = tasks.for_config(config).make_train_step(config, mesh, shardings, tx)
  frozen = step_lib.frozen_inputs(config)
  batch = jax.tree.map(jnp.asarray, batch_lib.synthetic_batch(config, seed=3))
  history = []
  for _ in range(4):
    state, metrics = run(state, batch, frozen)
    history.append(jax.tree.map(float, metrics))
  after = jax.tree.map(np.asarray, state.params)
  for part in ('encoder', 'text', 'clip', 'dino_head'):
    for a, b in zip(jax.tree.leaves(before[part]), jax.tree.leaves(after[part])):
      np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(before['decoder']), jax.tree.leaves(after['decoder'])))
  factors = [h['disc_factor'] for h in history]
  assert factors == [float(i >= start_step) for i in range(4)]
  disc_after = jax.tree.map(np.asarray, state.disc['params'])
  moved = any(not np.array_equal(a, b) for a, b in
              zip(jax.tree.leaves(disc_before), jax.tree.leaves(disc_after)))
  # Before the start step the discriminator's loss is multiplied by 0, as LDM's adopt_weight does;
  # Adam still moves nothing then because every gradient is exactly 0.
  assert moved
  assert history[-1]['rec'] < history[0]['rec']
  assert len({round(h['d_loss'], 6) for h in history if h['disc_factor']}) > 1


def test_gan_stage_refuses_other_branches():
  config = _gan_config()
  config.loss.clip_weight = 1.0
  with pytest.raises(ValueError, match='clip_weight=0'):
    gan_stage.check_config(config)


def _step_gradients(config, mesh, state, tx, batch):
  """One GAN step's metrics and the gradients its two optimizers receive (spied, as above), traced
  under the mesh so that accumulation splits the batch by its devices."""
  gan = gan_stage.GanStep(config, tx)
  captured = {}
  for name in ('tx', 'disc_tx'):
    real = getattr(gan, name)

    def spy(grads, opt_state, params=None, _real=real, _name=name):
      captured[_name] = grads
      return _real.update(grads, opt_state, params)

    setattr(gan, name, real._replace(update=spy))

  @jax.jit
  def run(state, batch):
    _, metrics = gan(state, batch, {})
    return metrics, captured['tx'], captured['disc_tx']

  with jax.set_mesh(mesh):
    return jax.device_get(run(state, batch))


@pytest.mark.heavy
def test_accumulated_gan_step_equals_whole_batch_step():
  """accum_steps = 2 against 1 on 2 devices: the discriminator's batch norm sees the whole batch
  either way, so the decoder's and the discriminator's gradients and every metric agree."""
  whole = _gan_config()
  whole.data.batch_size = 8  # 4 rows a device, 2 per micro-batch
  accum = _gan_config()
  accum.data.batch_size = 8
  accum.train.accum_steps = 2
  mesh = sharding.make_mesh(whole.mesh, jax.devices()[:2])
  state, shardings, tx = tasks.for_config(whole).create_state(whole, mesh)
  batch = jax.device_put(batch_lib.synthetic_batch(whole, seed=5),
                         batch_lib.batch_shardings(whole, mesh))
  m1, g1, d1 = _step_gradients(whole, mesh, state, tx, batch)
  m2, g2, d2 = _step_gradients(accum, mesh, state, tx, batch)
  assert float(m1['disc_factor']) == 1.0 and float(m1['adaptive_weight']) > 0
  for name, value in m1.items():
    np.testing.assert_allclose(m2[name], value, rtol=1e-5, atol=1e-7, err_msg=name)

  def close(path, a, b):
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(scale, 1e-12),
                               err_msg=jax.tree_util.keystr(path))

  jax.tree_util.tree_map_with_path(close, g2, g1)
  jax.tree_util.tree_map_with_path(close, d2, d1)
  assert tasks.for_config(accum).step_flops(accum, mesh)['accum_cache'] > 0
  # The jitted train step (explicit shardings, donated state) at k = 2 logs the same terms.
  step = tasks.for_config(accum).make_train_step(accum, mesh, shardings, tx)
  _, metrics = step(state, batch, step_lib.frozen_inputs(accum))
  for name, value in m1.items():
    np.testing.assert_allclose(np.asarray(metrics[name]), value, rtol=1e-5, atol=1e-7,
                               err_msg=f'train step: {name}')
