"""The optimizer's parameter groups, checked through real optimizer steps on a VTP-shaped param tree.

References are independent of optim.py: hard-coded decayed-leaf counts, and DINOv2's
`get_vit_lr_decay_rate` re-typed below and fed torch-style names ('backbone.blocks.3.attn...').
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import adamw_config
from vtp_jax.train import optim

D, H, DH = 8, 2, 4
ENC_DEPTH, DEC_DEPTH, TXT_DEPTH = 3, 2, 2
LAYOUTS = [pytest.param(True, id='scanned'), pytest.param(False, id='unscanned')]


def _block(*, norm_bias=False, qk_norm=False, layerscale=False):
  norm = {'scale': (D,), **({'bias': (D,)} if norm_bias else {})}
  attn = {'qkv': {'kernel': (D, 3, H, DH), 'bias': (3, H, DH)},
          'proj': {'kernel': (H, DH, D), 'bias': (D,)}}
  if qk_norm:
    attn.update(q_norm={'scale': (DH,)}, k_norm={'scale': (DH,)})
  b = {'norm1': dict(norm), 'attn': attn, 'norm2': dict(norm),
       'mlp': {'w1': {'kernel': (D, 12), 'bias': (12,)}, 'w2': {'kernel': (D, 12), 'bias': (12,)},
               'w3': {'kernel': (12, D), 'bias': (D,)}}}
  if layerscale:
    b.update(ls1={'gamma': (D,)}, ls2={'gamma': (D,)})
  return b


def _blocks(depth, scanned, **kw):
  if scanned:  # every leaf gains a leading depth axis
    return {'blocks': jax.tree.map(lambda s: (depth,) + s, _block(**kw),
                                   is_leaf=lambda x: isinstance(x, tuple))}
  return {f'blocks_{i}': _block(**kw) for i in range(depth)}


def make_params(scanned: bool, seed: int = 0, towers=None, flat_head=False):
  """The full VTP tree (all five towers) or, for tests where the layout is not the point, a subset:
  compile time grows with the leaf count and dominates these tests. `flat_head` puts the prototype
  v, g straight into dino_head, as vtp_jax.models.heads.DINOHead does, instead of a 'last_layer'."""
  shapes = {
      'encoder': {'patch_embed': {'kernel': (4, 4, 3, D), 'bias': (D,)}, 'cls_token': (D,),
                  'mask_token': (D,), 'registers': (2, D),
                  **_blocks(ENC_DEPTH, scanned, qk_norm=True, layerscale=True),
                  'norm': {'scale': (D,)}, 'bottleneck': {'kernel': (D, 4)}},
      'decoder': {'proj_in': {'kernel': (4, D), 'bias': (D,)}, **_blocks(DEC_DEPTH, scanned, norm_bias=True),
                  'norm': {'scale': (D,), 'bias': (D,)}, 'proj_out': {'kernel': (D, 48), 'bias': (48,)}},
      'text': {'token_embedding': {'embedding': (10, D)}, 'positional_embedding': (5, D),
               **_blocks(TXT_DEPTH, scanned, norm_bias=True),
               'ln_final': {'scale': (D,), 'bias': (D,)}, 'projection': (D, 6)},
      'dino_head': {'mlp_0': {'kernel': (D, 5), 'bias': (5,)}, 'mlp_1': {'kernel': (5, 5), 'bias': (5,)},
                    'mlp_2': {'kernel': (5, 4), 'bias': (4,)}, 'last_layer': {'v': (4, 7), 'g': (7,)}},
      'clip': {'proj': {'kernel': (D, 6)}, 'logit_scale': (), 'logit_bias': ()},
  }
  if flat_head:
    shapes['dino_head'].update(shapes['dino_head'].pop('last_layer'))
  if towers is not None:
    shapes = {k: shapes[k] for k in towers}
  rng = np.random.default_rng(seed)
  # NumPy leaves: eager jnp ops compile one kernel per new shape, which would dominate test time.
  return jax.tree.map(lambda s: (rng.normal(size=s) + 1.5).astype(np.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def _names(path):
  return tuple(k.key for k in path)


def _path(path):
  return '/'.join(_names(path))


def run(c, params, grads_seq, scanned, total_steps=10):
  """Updates (NumPy) and final state from feeding `grads_seq` to the optimizer at fixed params."""
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  tx = optim.make_optimizer(c, shapes, scanned, ENC_DEPTH, total_steps=total_steps, global_batch=1024)
  if not grads_seq:
    return [], None
  # One compile for init and one for update, reused by every step (faster here than a lax.scan).
  state = jax.jit(tx.init)(params)
  update = jax.jit(tx.update)
  out = []
  for g in grads_seq:
    u, state = update(g, state, params)
    out.append(jax.tree.map(np.asarray, u))
  return out, state


def zeros_like(params):
  return jax.tree.map(np.zeros_like, params)


def ones_like(params):
  return jax.tree.map(np.ones_like, params)


# Hand-counted matrix leaves: 5 kernels per block (qkv, proj, w1, w2, w3) plus the tower kernels,
# text/projection and dino last_layer/v.
#   unscanned: enc 1+3*5+1, dec 1+2*5+1, text 2*5+1, dino 3+1, clip 1
#   scanned:   enc 1+5+1,   dec 1+5+1,   text 5+1,   dino 3+1, clip 1
N_DECAYED = {False: 17 + 12 + 11 + 4 + 1, True: 7 + 7 + 6 + 4 + 1}
NEVER_DECAYED = [('encoder', 'cls_token'), ('encoder', 'mask_token'), ('encoder', 'registers'),
                 ('encoder', 'patch_embed', 'bias'), ('encoder', 'norm', 'scale'),
                 ('text', 'token_embedding', 'embedding'), ('text', 'positional_embedding'),
                 ('dino_head', 'last_layer', 'g'), ('clip', 'logit_scale'), ('clip', 'logit_bias')]


@pytest.mark.parametrize('scanned', LAYOUTS)
def test_weight_decay_shrinks_exactly_the_matrix_weights_on_schedule(scanned):
  params = make_params(scanned)
  lr = 1e-2
  # total_steps=10: wd(0) = 0.04 and step 5 is the cosine midpoint, wd(5) = 0.22.
  c = adamw_config(weight_decay=0.04, weight_decay_end=0.4)
  us, _ = run(c, params, [zeros_like(params)] * 6, scanned)
  decayed = set()
  for (path, p), du0, du5 in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(us[0]),
                                 jax.tree.leaves(us[5])):
    names = _names(path)
    if np.any(du0 != 0):
      decayed.add(names)
      # Zero gradient -> zero Adam direction, so the whole update is the decoupled decay term.
      np.testing.assert_allclose(du0, -lr * 0.04 * p, rtol=1e-6, err_msg='/'.join(names))
      np.testing.assert_allclose(du5, -lr * 0.22 * p, rtol=1e-5, err_msg='/'.join(names))
    else:
      assert np.all(du0 == 0) and np.all(du5 == 0), '/'.join(names)
  assert len(decayed) == N_DECAYED[scanned]
  assert all(n[-1] == 'kernel' or n in {('text', 'projection'), ('dino_head', 'last_layer', 'v')}
             for n in decayed)
  assert ('dino_head', 'last_layer', 'v') in decayed and ('text', 'projection') in decayed
  assert not decayed & set(NEVER_DECAYED)
  assert not any(n[-1] in ('bias', 'scale', 'gamma') for n in decayed)


def dinov2_lr_decay_rate(name, lr_decay_rate, num_layers):
  """DINOv2 `get_vit_lr_decay_rate` (dinov2/utils/param_groups.py), non-chunked branch."""
  layer_id = num_layers + 1
  if name.startswith('backbone'):
    if any(k in name for k in ('.pos_embed', '.patch_embed', '.mask_token', '.cls_token',
                               '.register_tokens')):
      layer_id = 0
    elif '.blocks.' in name and '.residual.' not in name:
      layer_id = int(name[name.find('.blocks.'):].split('.')[2]) + 1
  return lr_decay_rate ** (num_layers + 1 - layer_id)


def torch_name(names, block=None):
  """Our path -> the torch-style name DINOv2 sees (encoder = 'backbone')."""
  if names[0] != 'encoder':
    return '.'.join(names)
  rest = list(names[1:])
  if rest[0] == 'registers':
    rest[0] = 'register_tokens'
  elif rest[0] == 'blocks':
    rest[0] = f'blocks.{block}'
  elif rest[0].startswith('blocks_'):
    rest[0] = 'blocks.' + rest[0].split('_')[1]
  return '.'.join(['backbone'] + rest)


@pytest.mark.parametrize('scanned', LAYOUTS)
def test_lr_multipliers_match_dinov2(scanned):
  params = make_params(scanned, towers=('encoder', 'decoder', 'dino_head'))
  lr, wd, layer_decay, patch_mult = 1e-2, 0.1, 0.7, 0.2
  # b1 = b2 = 0 makes Adam's first step exactly g / (|g| + eps) = 1 for unit gradients (no
  # float32 bias-correction round-off), so update = -lr * mult * (1 + wd * p) on decayed leaves
  # (torch AdamW: the group lr scales the decay too) and -lr * mult elsewhere.
  c = adamw_config(layer_decay=layer_decay, patch_embed_lr_mult=patch_mult, b1=0.0, b2=0.0,
                   weight_decay=wd, weight_decay_end=wd)
  (u,), _ = run(c, params, [ones_like(params)], scanned)
  seen_blocks = set()
  for (path, du), p in zip(jax.tree_util.tree_leaves_with_path(u), jax.tree.leaves(params)):
    names = _names(path)
    decay = wd * p if (names[-1] == 'kernel' or names[-2:] == ('last_layer', 'v')) else 0.0
    mult = -du / lr / (1.0 + decay)
    slices = ([(i, mult[i]) for i in range(ENC_DEPTH)]
              if scanned and names[:2] == ('encoder', 'blocks') else [(None, mult)])
    for i, m in slices:
      name = torch_name(names, i)
      want = dinov2_lr_decay_rate(name, layer_decay, ENC_DEPTH)
      if 'patch_embed' in name:
        want *= patch_mult
      np.testing.assert_allclose(m, want, rtol=1e-6, err_msg=name)
      if name.startswith('backbone.blocks.'):
        seen_blocks.add(name.split('.')[2])
  assert seen_blocks == {'0', '1', '2'}
  # Spot values, written out: block 0 of depth 3 gets decay**3, the patch embed decay**4 * mult.
  b0 = u['encoder']['blocks']['mlp']['w1']['bias'][0] if scanned else (
      u['encoder']['blocks_0']['mlp']['w1']['bias'])
  np.testing.assert_allclose(-b0 / lr, layer_decay ** 3, rtol=1e-6)
  np.testing.assert_allclose(-u['encoder']['patch_embed']['bias'] / lr, layer_decay ** 4 * patch_mult,
                             rtol=1e-6)
  np.testing.assert_allclose(-u['decoder']['proj_in']['bias'] / lr, 1.0, rtol=1e-6)


@pytest.mark.parametrize('scanned', LAYOUTS)
def test_layer_decay_one_disables_it(scanned):
  mults = optim.lr_multipliers(make_params(scanned), scan_layers=scanned, encoder_depth=ENC_DEPTH,
                               layer_decay=1.0, patch_embed_lr_mult=0.5)
  for path, m in jax.tree_util.tree_leaves_with_path(mults):
    want = 0.5 if _names(path)[:2] == ('encoder', 'patch_embed') else 1.0
    np.testing.assert_array_equal(np.asarray(m), want, err_msg=_path(path))


@pytest.mark.parametrize('flat_head', [False, True], ids=['last_layer', 'flat_head'])
def test_last_layer_frozen_then_released(flat_head):
  # The freeze keys on the prototype names only, so the block layout plays no part here.
  params = make_params(True, towers=('dino_head', 'clip'), flat_head=flat_head)
  scanned = True

  def proto(tree):
    return tree['dino_head'] if flat_head else tree['dino_head']['last_layer']

  rng = np.random.default_rng(1)
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
           for _ in range(5)]
  decay = dict(weight_decay=0.04, weight_decay_end=0.4)
  frozen, _ = run(adamw_config(freeze_last_layer_steps=3, **decay), params, grads, scanned)
  free, _ = run(adamw_config(**decay), params, grads, scanned)
  for t in range(5):
    for leaf in ('v', 'g'):
      du = proto(frozen[t])[leaf]
      if t < 3:
        assert np.all(du == 0), (t, leaf)
      else:
        assert np.all(du != 0), (t, leaf)
        # Adam moments kept accumulating while frozen (DINOv2 steps the group with lr 0).
        np.testing.assert_allclose(du, proto(free[t])[leaf], rtol=1e-6)
    # Everything else is untouched by the freeze.
    for other in (frozen[t]['dino_head']['mlp_0']['kernel'], frozen[t]['clip']['logit_scale']):
      assert np.all(other != 0)
    jax.tree.map(np.testing.assert_array_equal, frozen[t]['clip'], free[t]['clip'])
    np.testing.assert_array_equal(frozen[t]['dino_head']['mlp_0']['kernel'],
                                  free[t]['dino_head']['mlp_0']['kernel'])


def _scaled(params, norm, seed=2):
  """Random gradients with global L2 norm `norm` (NumPy, so no per-shape eager compiles)."""
  rng = np.random.default_rng(seed)
  g = jax.tree.map(lambda p: rng.normal(size=p.shape), params)
  return jax.tree.map(lambda x: (x * norm / _norm(g)).astype(np.float32), g)


def _norm(tree) -> float:
  """Global L2 norm in NumPy (eager optax.tree.norm would compile a kernel per leaf shape)."""
  return math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(tree)))


def _apply(tx, params, *grads):
  """Fresh-state updates of `tx` for each gradient tree (one compile, same shapes); NumPy out."""
  fn = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])
  return [jax.tree.map(np.asarray, fn(g, params)) for g in grads]


@pytest.mark.parametrize('scanned', LAYOUTS)
def test_clipping_bounds_global_norm(scanned):
  params = make_params(scanned, towers=('encoder', 'dino_head'))
  clip = optim.gradient_clipping(3.0, params)
  big, small = _scaled(params, 100.0), _scaled(params, 1.0)
  out_big, out_small = _apply(clip, params, big, small)
  np.testing.assert_allclose(_norm(out_big), 3.0, rtol=1e-5)
  # Same direction, only rescaled.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b * 0.03, rtol=1e-5, atol=1e-9),
               out_big, big)
  # Under the bound: passed through unchanged.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out_small, small)


def test_clipping_inside_the_optimizer():
  params = make_params(True, towers=('encoder', 'dino_head'))
  big = _scaled(params, 100.0)
  # Adam's first moment after one step is (1 - b1) * the clipped gradient.
  _, state = run(adamw_config(clip_grad_norm=3.0), params, [big], True)
  np.testing.assert_allclose(_norm(optax.tree_utils.tree_get(state, 'mu')), 0.3, rtol=1e-5)
  # 0 disables clipping.
  (out,) = _apply(optim.gradient_clipping(0.0, params), params, big)
  np.testing.assert_allclose(_norm(out), 100.0, rtol=1e-5)


def test_per_tower_clipping_bounds_each_tower():
  params = make_params(True)
  g = _scaled(params, 100.0)
  g['clip'] = _scaled(params['clip'], 0.5)  # under the bound: must pass through unchanged
  clip = optim.gradient_clipping(3.0, params, scope='per_tower')
  (out,) = _apply(clip, params, g)
  for tower in params:
    want = 0.5 if tower == 'clip' else 3.0
    np.testing.assert_allclose(_norm(out[tower]), want, rtol=1e-5, err_msg=tower)


def test_param_labels_readable():
  labels = optim.optimizer_param_labels(make_params(False))
  assert labels['encoder']['blocks_1']['attn']['qkv']['kernel'] == 'decay'
  assert labels['encoder']['blocks_1']['ls1']['gamma'] == 'no_decay'
  assert labels['dino_head']['last_layer'] == {'v': 'frozen_decay', 'g': 'frozen_no_decay'}
  assert labels['clip']['logit_scale'] == 'no_decay'
  flat = optim.optimizer_param_labels(make_params(True, flat_head=True))['dino_head']
  assert (flat['v'], flat['g'], flat['mlp_2']['kernel']) == ('frozen_decay', 'frozen_no_decay', 'decay')


@pytest.mark.parametrize('scanned', LAYOUTS)
def test_real_model_tree_is_fully_classified(scanned):
  """Guards against naming drift between vtp_jax.models and the rules here (shapes only, no compile)."""
  import configs.vtp_tiny  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from vtp_jax.models import vtp  # pylint: disable=import-outside-toplevel
  c = configs.vtp_tiny.get_config()
  c.precision.scan_layers = scanned
  c.model.encoder.update(n_registers=2, layerscale=1e-5, qk_norm=True)
  c.model.logit_bias = True
  model = vtp.build(c)
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
      jnp.zeros((1, c.model.text.context_length), jnp.int32))))['params']
  labels = jax.tree_util.tree_leaves_with_path(optim.optimizer_param_labels(shapes))
  frozen = sorted(_path(p) for p, l in labels if l.startswith('frozen'))
  assert len(frozen) == 2 and all(f.startswith('dino_head/') for f in frozen), frozen
  for path, label in labels:
    names = _names(path)
    want = names[-1] in ('kernel', 'v') or names == ('text', 'projection')
    assert label.endswith('no_decay') != want, _path(path)
  depth = c.model.encoder.depth
  mults = optim.lr_multipliers(shapes, scan_layers=scanned, encoder_depth=depth, layer_decay=0.9,
                               patch_embed_lr_mult=0.2)
  for m, x in zip(jax.tree.leaves(mults), jax.tree.leaves(shapes)):
    assert np.broadcast_shapes(np.shape(m), x.shape) == x.shape
  np.testing.assert_allclose(np.ravel(mults['encoder']['cls_token']), 0.9 ** (depth + 1), rtol=1e-6)


@pytest.mark.parametrize('tree_scanned, flag', [(True, False), (False, True)])
def test_layout_mismatch_raises(tree_scanned, flag):
  with pytest.raises(ValueError, match=f'scan_layers={flag}'):
    run(adamw_config(), make_params(tree_scanned), [], flag)


def test_unknown_leaf_and_extra_block_raise():
  params = make_params(True)
  params['encoder']['pos_embed'] = np.zeros((4, D), np.float32)  # no weight-decay rule names it
  with pytest.raises(ValueError, match='encoder/pos_embed'):
    run(adamw_config(), params, [], True)
  params = make_params(False)
  params['encoder']['blocks_7'] = params['encoder']['blocks_0']
  with pytest.raises(ValueError, match='blocks_7'):
    run(adamw_config(layer_decay=0.9), params, [], False)


def test_scanned_depth_mismatch_raises():
  params = make_params(True)
  with pytest.raises(ValueError, match='encoder.depth=5'):
    optim.make_optimizer(adamw_config(), params, True, 5, total_steps=10, global_batch=1024)


@pytest.mark.parametrize('overrides, match', [
    (dict(optimizer='sgd'), 'c.optim.optimizer'),
    (dict(layer_decay=0.0), 'c.optim.layer_decay'),
    (dict(layer_decay=1.5), 'c.optim.layer_decay'),
    (dict(b2=1.0), 'c.optim.b2'),
    (dict(freeze_last_layer_steps=-1), 'freeze_last_layer_steps'),
    (dict(clip_grad_norm=-1.0), 'clip_grad_norm'),
    (dict(clip_grad_scope='module'), 'clip_grad_scope'),
    (dict(warmup_steps=50), 'warmup_steps'),
])
def test_bad_config_raises(overrides, match):
  with pytest.raises(ValueError, match=match):
    optim.make_optimizer(adamw_config(**overrides), make_params(True), True, ENC_DEPTH,
                         total_steps=10, global_batch=1024)


def test_dinov2_defaults_build_and_step():
  """The default recipe end to end: warm-up lr at step 1, finite updates on every leaf."""
  params = make_params(True, towers=('encoder', 'dino_head'))
  c = adamw_config(lr=4e-3, lr_scaling='sqrt', warmup_steps=4, schedule='cosine', final_lr=1e-6,
                   weight_decay=0.04, weight_decay_end=0.4, layer_decay=0.9,
                   patch_embed_lr_mult=0.2, clip_grad_norm=3.0, freeze_last_layer_steps=1)
  us, _ = run(c, params, [ones_like(params)] * 2, True, total_steps=20)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(us[0]))  # lr(0) = 0
  lr1 = 4e-3 * math.sqrt(1024 / 1024) / 4  # sqrt scaling at the reference batch; 1/4 of warm-up
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(us[1]))
  # rtol: optax's float32 bias correction 1 - 0.999**2 carries ~1e-5 relative round-off.
  np.testing.assert_allclose(us[1]['encoder']['norm']['scale'], -lr1, rtol=1e-4)
