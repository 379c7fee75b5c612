"""DINO / iBOT losses, centering, Sinkhorn-Knopp and the teacher-temperature schedule against NumPy.

The references below re-type DINOv2 (dinov2/loss/dino_clstoken_loss.py, ibot_patch_loss.py and
train/ssl_meta_arch.py) in float64 NumPy, loops and all, without calling the code under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vtp_jax.losses import dino

# Jitted entry points: one compile per function instead of one per primitive op (eager mode) keeps the
# suite fast; the shape checks still run, at trace time.
centering = jax.jit(dino.teacher_centering)
update_center = jax.jit(dino.update_center)
sinkhorn = jax.jit(dino.sinkhorn_knopp, static_argnames='n_iterations')
dino_loss = jax.jit(dino.dino_loss)
ibot_loss = jax.jit(dino.ibot_loss, static_argnames='n_global_images')
entropy = jax.jit(dino.teacher_entropy)
temperature = jax.jit(dino.teacher_temperature, static_argnames='warmup_steps')


def _np_softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _np_log_softmax(x, axis=-1):
  m = x.max(axis=axis, keepdims=True)
  return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def _np_sinkhorn(teacher_output, temp, n_iterations=3):
  """DINOv2 `sinkhorn_knopp_teacher`, single process (world_size = 1), literally."""
  q = np.exp(teacher_output.astype(np.float64) / temp).T  # (K, B)
  b, k = q.shape[1], q.shape[0]
  q /= np.sum(q)
  for _ in range(n_iterations):
    q /= np.sum(q, axis=1, keepdims=True)
    q /= k
    q /= np.sum(q, axis=0, keepdims=True)
    q /= b
  q *= b
  return q.T


def _np_dino_forward(student_list, teacher_list, student_temp):
  """DINOv2 `DINOLoss.forward`: minus the sum over (s, t) pairs of mean_b sum_k t log_softmax(s/T)."""
  total = 0.0
  for s in student_list:
    lsm = _np_log_softmax(s.astype(np.float64) / student_temp)
    for t in teacher_list:
      total -= np.mean(np.sum(t * lsm, axis=-1))
  return total


def _np_dino_v2_meta_arch(student_global, student_local, teacher, student_temp=0.1):
  """ssl_meta_arch.forward_backward's DINO part for n_global = 2, reproduced tensor for tensor."""
  n_global, b, _ = student_global.shape
  n_local = student_local.shape[0]
  n_local_terms = max(n_local * n_global, 1)
  n_global_terms = (n_global - 1) * n_global
  # DINOv2 swaps the teacher chunks so that student crop A meets teacher crop B.
  teacher_list = np.stack([teacher[1], teacher[0]])
  local = 0.0
  if n_local > 0:
    local = _np_dino_forward(list(student_local), list(teacher_list), student_temp) / (
        n_global_terms + n_local_terms)
  stacked_student = student_global.reshape(n_global * b, -1)
  global_ = _np_dino_forward([stacked_student], [teacher_list.reshape(n_global * b, -1)],
                             student_temp) * 2 / (n_global_terms + n_local_terms)
  return local, global_


def _random_dino(rng, n_local, b=6, k=20):
  student_global = rng.normal(size=(2, b, k)).astype(np.float32)
  student_local = rng.normal(size=(n_local, b, k)).astype(np.float32)
  teacher = _np_softmax(rng.normal(size=(2, b, k)) / 0.3).astype(np.float32)
  return student_global, student_local, teacher


# ----------------------------------------------------------------------------------------------------
# Centering.


def test_teacher_centering_and_center_update_match_numpy():
  rng = np.random.default_rng(0)
  t = rng.normal(size=(2, 5, 16)).astype(np.float32)
  c = rng.normal(size=(1, 16)).astype(np.float32)
  probs = centering(t, c, 0.04)
  np.testing.assert_allclose(np.asarray(probs), _np_softmax((t - c) / 0.04), rtol=1e-5, atol=1e-7)

  new_c = update_center(c, t, momentum=0.9)
  want = 0.9 * c + 0.1 * t.reshape(-1, 16).mean(axis=0, keepdims=True)
  np.testing.assert_allclose(np.asarray(new_c), want, rtol=1e-5, atol=1e-7)
  assert new_c.shape == (1, 16)


def test_center_update_ignores_padding_rows():
  rng = np.random.default_rng(1)
  t = rng.normal(size=(10, 8)).astype(np.float32)
  valid = np.array([1, 1, 0, 1, 0, 0, 1, 1, 0, 1], bool)
  t[~valid] = np.inf  # padding may hold anything
  c = np.zeros((1, 8), np.float32)
  new_c = update_center(c, t, momentum=0.5, valid=valid)
  np.testing.assert_allclose(np.asarray(new_c), 0.5 * t[valid].mean(0, keepdims=True), rtol=1e-6)


def test_center_shape_is_checked():
  with pytest.raises(ValueError, match=r'center has shape \(16,\)'):
    centering(np.zeros((4, 16)), np.zeros((16,)), 0.04)
  with pytest.raises(ValueError, match=r'expected \(1, 16\)'):
    update_center(np.zeros((1, 8)), np.zeros((4, 16)))


# ----------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp.


@pytest.mark.parametrize('scale,temp,n_iterations', [(1.0, 0.07, 3), (0.3, 0.04, 1), (5.0, 0.04, 3)])
def test_sinkhorn_matches_dinov2(scale, temp, n_iterations):
  # scale 5 at temp 0.04 puts t / temp near 400: float32 exp overflows without the max shift,
  # float64 (the reference) does not.
  rng = np.random.default_rng(2)
  t = (scale * rng.normal(size=(24, 10))).astype(np.float32)
  got = np.asarray(sinkhorn(t, temp, n_iterations))
  want = _np_sinkhorn(t, temp, n_iterations)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)  # each sample is an assignment


def test_sinkhorn_leading_axes_are_samples():
  t = np.random.default_rng(3).normal(size=(2, 6, 10)).astype(np.float32)
  got = np.asarray(sinkhorn(t, 0.05))
  np.testing.assert_allclose(got.reshape(12, 10), _np_sinkhorn(t.reshape(12, 10), 0.05), rtol=2e-4,
                             atol=1e-6)


def test_sinkhorn_valid_mask_excludes_padding():
  rng = np.random.default_rng(4)
  t = rng.normal(size=(16, 10)).astype(np.float32)
  weights = np.where(rng.random(16) < 0.6, 1.0 / 7, 0.0).astype(np.float32)
  t[weights == 0] = np.nan  # padded buffer rows may be garbage
  got = np.asarray(sinkhorn(t, 0.05, valid=weights))
  real = weights > 0
  np.testing.assert_allclose(got[real], _np_sinkhorn(t[real], 0.05), rtol=2e-4, atol=1e-6)
  assert np.all(got[~real] == 0.0)
  empty = np.asarray(sinkhorn(t, 0.05, valid=np.zeros(16)))
  assert np.all(empty == 0.0)


def test_sinkhorn_sharded_over_8_devices_equals_unsharded_numpy():
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(5)
  t = (2.0 * rng.normal(size=(64, 12))).astype(np.float32)
  valid = rng.random(64) < 0.7
  sharded_t = jax.device_put(t, NamedSharding(mesh, P('data', None)))
  sharded_valid = jax.device_put(valid, NamedSharding(mesh, P('data')))
  assert len(sharded_t.sharding.device_set) == 8

  got = sinkhorn(sharded_t, 0.05)
  np.testing.assert_allclose(np.asarray(got), _np_sinkhorn(t, 0.05), rtol=2e-4, atol=1e-6)

  got_masked = np.asarray(sinkhorn(sharded_t, 0.05, valid=sharded_valid))
  np.testing.assert_allclose(got_masked[valid], _np_sinkhorn(t[valid], 0.05), rtol=2e-4, atol=1e-6)
  assert np.all(got_masked[~valid] == 0.0)

  # A per-shard Sinkhorn (what forgetting the all-reduces would compute) differs: the test can fail.
  per_shard = np.concatenate([_np_sinkhorn(chunk, 0.05) for chunk in np.split(t, 8)])
  assert np.abs(per_shard - np.asarray(got)).max() > 1e-3


# ----------------------------------------------------------------------------------------------------
# DINO and iBOT losses.


@pytest.mark.parametrize('n_local', [0, 1, 4])
def test_dino_loss_matches_dinov2_meta_arch(n_local):
  rng = np.random.default_rng(10 + n_local)
  student_global, student_local, teacher = _random_dino(rng, n_local)
  loss, metrics = dino_loss(student_global, student_local, teacher, student_temp=0.1)
  local, global_ = _np_dino_v2_meta_arch(student_global, student_local, teacher, 0.1)
  np.testing.assert_allclose(float(metrics['dino_local']), local, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(metrics['dino_global']), global_, rtol=1e-5)
  np.testing.assert_allclose(float(loss), local + global_, rtol=1e-5)


def test_dino_loss_pairing_written_as_pairs():
  """The same value from the pair-sum formula of the docstring, and n_local = 0 via None."""
  rng = np.random.default_rng(20)
  student_global, student_local, teacher = _random_dino(rng, 3, b=4, k=9)

  def ce(s, t):
    return -np.mean(np.sum(t * _np_log_softmax(s.astype(np.float64) / 0.07), -1))

  denominator = 2 * 1 + 3 * 2
  pair_sum = sum(ce(student_global[i], teacher[j]) for i in range(2) for j in range(2) if i != j)
  pair_sum += sum(ce(student_local[l], teacher[j]) for l in range(3) for j in range(2))
  loss, _ = dino_loss(student_global, student_local, teacher, student_temp=0.07)
  np.testing.assert_allclose(float(loss), pair_sum / denominator, rtol=1e-5)

  no_local, metrics = dino_loss(student_global, None, teacher, student_temp=0.07)
  global_only = sum(ce(student_global[i], teacher[1 - i]) for i in range(2))
  np.testing.assert_allclose(float(no_local), global_only / 3, rtol=1e-5)  # DINOv2's max(.,1) quirk
  assert float(metrics['dino_local']) == 0.0


def test_dino_loss_gradient_flows_to_student_only():
  student_global, student_local, teacher = _random_dino(np.random.default_rng(21), 2)
  grads = jax.jit(jax.grad(lambda s, l, t: dino.dino_loss(s, l, t)[0], argnums=(0, 1, 2)))(
      student_global, student_local, teacher)
  assert np.abs(np.asarray(grads[0])).max() > 0 and np.abs(np.asarray(grads[1])).max() > 0
  assert np.all(np.asarray(grads[2]) == 0.0)


def test_dino_loss_bad_shapes_raise():
  g = np.zeros((2, 4, 8), np.float32)
  with pytest.raises(ValueError, match='teacher_probs'):
    dino_loss(g, None, np.zeros((2, 4, 7), np.float32))
  with pytest.raises(ValueError, match='at least 2'):
    dino_loss(g[:1], None, g[:1])
  with pytest.raises(ValueError, match='student_local_logits'):
    dino_loss(g, np.zeros((3, 5, 8), np.float32), g)


def _masked_batch(rng, n_images=6, n_patches=9, k=11, buffer=40):
  """DINOv2's collate, by hand: masks per image, mask_indices_list, masks_weight, a padded buffer."""
  masks = rng.random((n_images, n_patches)) < 0.3
  masks[0] = False  # an unmasked image still counts in the denominator
  masks[1, :5] = True
  student_all = rng.normal(size=(n_images, n_patches, k)).astype(np.float32)
  teacher_all = _np_softmax(rng.normal(size=(n_images, n_patches, k)) / 0.2).astype(np.float32)
  masks_weight = (1 / np.maximum(masks.sum(-1), 1.0))[:, None].repeat(n_patches, 1)[masks]
  n_masked = int(masks.sum())
  assert n_masked < buffer
  student = np.full((buffer, k), np.nan, np.float32)
  teacher = np.full((buffer, k), np.nan, np.float32)
  weights = np.zeros(buffer, np.float32)
  student[:n_masked] = student_all[masks]
  teacher[:n_masked] = teacher_all[masks]
  weights[:n_masked] = masks_weight
  return masks, student_all, teacher_all, student, teacher, weights


def test_ibot_loss_matches_dinov2_forward_masked_with_padding():
  rng = np.random.default_rng(30)
  masks, student_all, teacher_all, student, teacher, weights = _masked_batch(rng)
  n_images = masks.shape[0]
  got = ibot_loss(student, teacher, weights, n_global_images=n_images, student_temp=0.1)

  # Per-image loop: every masked patch of an image, weighted 1/(#masked in that image).
  total = 0.0
  for img in range(n_images):
    for p in np.flatnonzero(masks[img]):
      lsm = _np_log_softmax(student_all[img, p].astype(np.float64) / 0.1)
      total += np.sum(teacher_all[img, p] * lsm) / masks[img].sum()
  want = -total / n_images * 2 * 0.5  # forward_masked, then loss_scales (2) and ibot_loss_scale (1/2)
  assert np.isfinite(float(got))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)

  half = ibot_loss(student, teacher, weights, n_images, ibot_loss_scale=0.25)
  np.testing.assert_allclose(float(half), want / 2, rtol=1e-5)


def test_ibot_loss_argument_checks():
  with pytest.raises(ValueError, match='weights has shape'):
    ibot_loss(np.zeros((5, 3)), np.zeros((5, 3)), np.zeros(4), 2)
  with pytest.raises(ValueError, match='n_global_images'):
    ibot_loss(np.zeros((5, 3)), np.zeros((5, 3)), np.zeros(5), 0)
  with pytest.raises(ValueError, match='masked-token buffer'):
    ibot_loss(np.zeros((5, 3)), np.zeros((5, 4)), np.zeros(5), 2)


# ----------------------------------------------------------------------------------------------------
# Schedule and metric.


def test_teacher_temperature_is_dinov2_linspace_then_constant():
  warmup = 30
  table = np.concatenate([np.linspace(0.04, 0.07, warmup), np.full(20, 0.07)])
  got = np.array([float(temperature(jnp.int32(s), warmup_steps=warmup)) for s in range(len(table))])
  np.testing.assert_allclose(got, table, rtol=1e-6)
  np.testing.assert_allclose(float(temperature(10**6, warmup_steps=warmup)), 0.07)
  np.testing.assert_allclose(float(temperature(0, warmup_steps=0)), 0.07)
  np.testing.assert_allclose(
      float(temperature(5, warmup_steps=11, warmup_temp=0.02, final_temp=0.06)), 0.04)


def test_teacher_entropy():
  rng = np.random.default_rng(40)
  p = _np_softmax(rng.normal(size=(7, 13)))
  want = np.mean(-np.sum(p * np.log(p), axis=-1))
  np.testing.assert_allclose(float(entropy(p.astype(np.float32))), want, rtol=1e-5)
  np.testing.assert_allclose(float(entropy(np.full((3, 8), 1 / 8, np.float32))),
                             np.log(8), rtol=1e-6)
  assert float(entropy(np.eye(4, dtype=np.float32))) == 0.0
  valid = np.array([1, 1, 0, 0, 1, 0, 1])
  np.testing.assert_allclose(float(entropy(p.astype(np.float32), valid=valid)),
                             np.mean(-np.sum(p * np.log(p), -1)[valid > 0]), rtol=1e-5)
