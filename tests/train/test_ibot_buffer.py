"""The iBOT masked-token buffer per device group: same tokens, loss, gradient and centre as one
global buffer; masks collated per device always fit their group's buffer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import micro_config
from vtp_jax import batch as batch_lib
from vtp_jax import losses
from vtp_jax import sharding
from vtp_jax.data import masking
from vtp_jax.train import state as state_lib
from vtp_jax.train import step as step_lib


def _config(teacher_norm):
  c = micro_config(compute_dtype='float32')
  c.data.update(batch_size=32, ssl_batch_fraction=0.5, rec_batch_fraction=0.25,
                global_crop_size=32, local_crop_size=16, n_local_crops=2)
  c.loss.update(teacher_norm=teacher_norm, lpips_weight=0.0)
  return c


def _mesh(data, fsdp):
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=1)),
                            devices=jax.devices()[:data * fsdp])


def _ssl_terms(config, mesh, groups, state, batch):
  """SSL loss, its terms, the encoder gradient and the updated iBOT centre (Sinkhorn: the
  targets' mass per prototype) with `groups` buffers."""
  step = step_lib._Step(config, tx=None, ibot_groups=groups)  # pylint: disable=protected-access
  rules = sharding.rules_from_config(config)
  key = jax.random.key(3)

  def terms(state, batch):
    with nn.logical_axis_rules(rules):
      buffer = step.masked_buffer(batch['ssl'])
      teacher = {**state.params, **state.teacher}
      targets = step.teacher_targets(teacher, batch['ssl'], buffer, state.loss_state, 0.05)

      def loss(params):
        return step.ssl_loss(params, batch['ssl'], buffer, targets, {'drop_path': key,
                                                                       'rope': key})

      (total, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
      patch_probs, patch_logits, valid = targets[1], targets[3], targets[4]
      if 'ibot_center' in state.loss_state:
        center = losses.update_center(state.loss_state['ibot_center'], patch_logits, 0.9,
                                      valid=valid)
      else:  # Sinkhorn-Knopp: the targets' mass per prototype, which no row order changes
        center = jnp.sum(jnp.where(valid[:, None], patch_probs, 0.0), axis=0)
      return total, metrics, grads['encoder'], center, buffer.dropped, jnp.sum(valid)

  with jax.set_mesh(mesh):
    return jax.device_get(jax.jit(terms)(state, batch))


@pytest.mark.parametrize('teacher_norm', ['centering', 'sinkhorn'])
def test_per_device_buffers_equal_one_global_buffer(teacher_norm):
  config = _config(teacher_norm)
  mesh = _mesh(4, 2)
  groups = batch_lib.ibot_groups(config, mesh)
  assert groups == 8
  state, _, _ = state_lib.create(config, mesh)
  # A centre that is not zero, so centering's subtraction is exercised.
  state = state.replace(loss_state=jax.tree.map(
      lambda c: c + jnp.linspace(-0.5, 0.5, c.size, dtype=c.dtype).reshape(c.shape),
      state.loss_state))
  batch = batch_lib.synthetic_batch(config, n_devices=8)
  total_1, m_1, g_1, c_1, dropped_1, n_1 = _ssl_terms(config, mesh, 1, state, batch)
  total_8, m_8, g_8, c_8, dropped_8, n_8 = _ssl_terms(config, mesh, groups, state, batch)
  assert dropped_1 == dropped_8 == 0
  assert n_1 == n_8 == batch['ssl']['mask'].sum() > 0
  for key in ('ibot', 'dino', 'koleo'):
    np.testing.assert_allclose(m_8[key], m_1[key], rtol=1e-5, err_msg=key)
  np.testing.assert_allclose(total_8, total_1, rtol=1e-5)
  np.testing.assert_allclose(c_8, c_1, rtol=1e-5, atol=1e-7)
  # Gradients: 1e-5 of each tensor's scale (the sums run in another order, so entries near 0
  # differ by float32 rounding of the larger ones).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-5 * np.abs(b).max()), g_8, g_1)


def test_buffer_holds_each_groups_masked_tokens():
  """Against NumPy: group g's valid indices are exactly the masked positions of its own images,
  weighted 1 / (masked patches of the image); an overfull group reports what it dropped."""
  rng = np.random.default_rng(0)
  groups, per_group, n_patches, size = 4, 3, 5, 6
  mask = rng.random((groups * per_group, n_patches)) < 0.3
  mask[0] = True  # group 0: 5 + its other images' tokens, more than 6
  mesh = _mesh(4, 1)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    buf = jax.device_get(jax.jit(lambda m: step_lib._masked_token_buffer(m, size, groups))(
        jnp.asarray(mask)))  # pylint: disable=protected-access
  expected_dropped = 0
  for g in range(groups):
    own = mask[g * per_group:(g + 1) * per_group].reshape(-1)
    positions = np.flatnonzero(own)
    kept = positions[:size]
    expected_dropped += len(positions) - len(kept)
    np.testing.assert_array_equal(buf.idx[g][buf.valid[g]], kept)
    images = g * per_group + kept // n_patches
    np.testing.assert_allclose(buf.weights[g][buf.valid[g]], 1.0 / mask[images].sum(1))
    assert not buf.weights[g][~buf.valid[g]].any()
  assert expected_dropped > 0 and buf.dropped == expected_dropped


@pytest.mark.parametrize('n_devices,processes', [(8, 1), (8, 2), (4, 4), (16, 2)])
def test_pipeline_masks_fit_every_device_buffer(n_devices, processes):
  config = micro_config()
  config.data.update(batch_size=64, ssl_batch_fraction=0.5, mask_probability=0.45)
  _, b_ssl, _ = batch_lib.sub_batch_sizes(config)
  groups = min(n_devices, b_ssl)
  size = batch_lib.ibot_buffer_size(config, groups)
  n_local = b_ssl // processes
  collate = batch_lib.mask_collate_samples(config, n_devices, n_local)
  rng = np.random.default_rng(1)
  for _ in range(10):
    masks = np.concatenate([masking.ssl_masks(config, n_local, rng, collate)
                            for _ in range(processes)])
    per_group = masks.reshape(groups, -1).sum(1)
    assert per_group.max() <= size
  synthetic = batch_lib.synthetic_batch(config, n_devices=n_devices)['ssl']['mask']
  assert synthetic.reshape(groups, -1).sum(1).max() <= size
