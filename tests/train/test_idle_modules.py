"""Modules no enabled loss reads are idle: no update, no weight decay, no optimizer state.

The reference for the active modules is AdamW written out in NumPy (torch's formula, clipping by
the global norm of the active gradients only, as torch's clip_grad_norm_ sees no grad for unused
parameters).
"""

import jax
import ml_collections
import numpy as np

from conftest import adamw_config, micro_config
from vtp_jax import batch as batch_lib
from vtp_jax import sharding
from vtp_jax.train import optim
from vtp_jax.train import state as state_lib
from vtp_jax.train import step as step_lib


def _numpy_adamw(params, grads_seq, lr, b1, b2, eps, wd, max_norm):
  """torch.optim.AdamW after clip_grad_norm_, over the given (active) leaves only."""
  names = sorted(params)
  p = {k: params[k].astype(np.float64) for k in names}
  m = {k: np.zeros_like(p[k]) for k in names}
  v = {k: np.zeros_like(p[k]) for k in names}
  for t, grads in enumerate(grads_seq, start=1):
    norm = np.sqrt(sum(np.sum(grads[k].astype(np.float64) ** 2) for k in names))
    scale = min(1.0, max_norm / norm)
    for k in names:
      g = grads[k] * scale
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      adam = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
      p[k] = p[k] - lr * (adam + wd * p[k])
  return p


def test_idle_module_gets_no_update_and_no_state_and_active_ones_follow_adamw():
  rng = np.random.default_rng(0)
  shapes = {'encoder': (6, 4), 'decoder': (4, 5), 'text': (7, 3)}
  params = {k: {'kernel': rng.normal(size=s).astype(np.float32)} for k, s in shapes.items()}
  grads_seq = [{k: {'kernel': rng.normal(size=s).astype(np.float32)} for k, s in shapes.items()}
               for _ in range(3)]
  c = adamw_config(b2=0.99, weight_decay=0.1, weight_decay_end=0.1, clip_grad_norm=1.0)
  tx = optim.make_optimizer(c, params, True, 1, total_steps=10, global_batch=1024, idle=('text',))
  state = tx.init(params)
  n_state = sum(x.size for x in jax.tree.leaves(state))
  # Adam's two moments for encoder and decoder, plus scalar counters; nothing the size of text.
  active_size = 6 * 4 + 4 * 5
  assert 2 * active_size <= n_state < 2 * active_size + 7 * 3
  p = params
  for g in grads_seq:
    updates, state = tx.update(g, state, p)
    assert not np.any(np.asarray(updates['text']['kernel']))
    p = jax.tree.map(lambda a, u: np.asarray(a + u), p, updates)
  np.testing.assert_array_equal(p['text']['kernel'], params['text']['kernel'])
  expected = _numpy_adamw({k: params[k]['kernel'] for k in ('encoder', 'decoder')},
                          [{k: g[k]['kernel'] for k in ('encoder', 'decoder')} for g in grads_seq],
                          lr=c.lr, b1=c.b1, b2=c.b2, eps=c.eps, wd=c.weight_decay,
                          max_norm=c.clip_grad_norm)
  for k in ('encoder', 'decoder'):
    np.testing.assert_allclose(p[k]['kernel'], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_idle_modules_follow_the_enabled_branches():
  params = {k: {} for k in ('encoder', 'decoder', 'text', 'dino_head', 'clip')}
  assert optim.idle_modules(('rec',), params) == ('clip', 'dino_head', 'text')
  assert optim.idle_modules(('clip', 'rec'), params) == ('dino_head',)
  assert optim.idle_modules(('ssl', 'rec'), params) == ('clip', 'text')
  assert optim.idle_modules(('clip', 'ssl', 'rec'), params) == ()


def test_reconstruction_only_step_leaves_text_clip_and_dino_head_bit_identical():
  config = micro_config()
  config.data.update(batch_size=4, rec_batch_fraction=0.5)
  config.loss.update(clip_weight=0.0, ssl_weight=0.0, lpips_weight=0.0)
  config.optim.update(warmup_steps=1, weight_decay=0.1, weight_decay_end=0.1)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                            devices=jax.devices()[:1])
  state, shardings, tx = state_lib.create(config, mesh)
  before = jax.device_get(state.params)
  step = step_lib.make_train_step(config, mesh, shardings, tx)
  batch, frozen = batch_lib.synthetic_batch(config), step_lib.frozen_inputs(config)
  for _ in range(3):
    state, _ = step(state, batch, frozen)
  after = jax.device_get(state.params)
  for idle in ('text', 'clip', 'dino_head'):
    jax.tree.map(np.testing.assert_array_equal, after[idle], before[idle])
  for trained in ('encoder', 'decoder'):
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), after[trained],
                                         before[trained]))
    assert any(moved), trained
