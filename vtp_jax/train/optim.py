"""The optimizer: AdamW with DINOv2's parameter groups, assembled from optax pieces.

This file owns which parameters get weight decay, the per-parameter learning-rate multipliers
(layer-wise decay on the encoder, patch-embed multiplier), the frozen-prototype warm start and
gradient clipping. Schedules (lr, weight decay, EMA momentum) live in `schedules.py`.

Update for leaf p with gradient g (after clipping), at optimizer step t:
  u = -lr(t) * mult(p) * (adam(g) + wd(t) * mask(p) * p) * frozen(p, t)
which is torch AdamW's p <- p(1 - lr*wd) - lr*adam with a per-group lr = lr * mult, as DINOv2 does.

Config keys read (c.optim.*; reference defaults are DINOv2's [R], VTP's values are unknown [?]):
  optimizer, lr, lr_scaling, lr_reference_batch, warmup_steps, schedule, final_lr, b1, b2, eps,
  weight_decay, weight_decay_end, layer_decay, patch_embed_lr_mult, clip_grad_norm, clip_grad_scope,
  freeze_last_layer_steps (momentum, momentum_end are read by schedules.momentum_schedule).

Modules that no enabled loss branch reads (the text tower when loss.clip_weight = 0, say) are idle:
they get no update and no optimizer state, as torch's AdamW skips parameters whose grad is None
(weight decay included), and the step spends no time on them.

Parameter trees are plain nested dicts in either layer layout: scanned ('blocks' leaves carry a
leading depth axis) or unscanned ('blocks_0', 'blocks_1', ...), as c.precision.scan_layers says.
"""

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vtp_jax.train import schedules

# Leaf-name rules for weight decay. Decay only matrix weights (DINOv2 and OpenCLIP both exempt
# biases, norms and gains; OpenCLIP also exempts embeddings and logit_scale). Unknown names raise
# rather than silently default, so a new parameter cannot slip into the wrong group unnoticed.
DECAY_LEAVES = ('kernel',)
# 'text/projection' is OpenCLIP's `text_projection` (W, E) matrix: decayed there (ndim 2), and the
# twin of the decayed clip/proj/kernel.
DECAY_PATHS = (('text', 'projection'),)
NO_DECAY_LEAVES = ('bias', 'scale', 'cls_token', 'mask_token', 'registers', 'embedding',
                   'positional_embedding', 'logit_scale', 'logit_bias', 'gamma')
# The weight-normed DINO/iBOT prototype layer: direction 'v' (bottleneck, K), decayed like any matrix,
# and gain 'g' (K,), never decayed (DINOv2 fixes it at 1). It sits either in a 'last_layer' dict (the
# DINOv2 module layout) or directly in the head (vtp_jax.models.heads.DINOHead); accept both.
PROTOTYPE_PARENTS = ('last_layer', 'dino_head', 'ibot_head')

# Encoder entries DINOv2 puts at layer 0 (`get_vit_lr_decay_rate`: pos_embed, patch_embed,
# mask_token, cls_token, register_tokens); everything else outside the blocks sits at depth + 1.
LAYER0_ENCODER_KEYS = ('patch_embed', 'cls_token', 'mask_token', 'registers')
_BLOCK_RE = re.compile(r'blocks_(\d+)')
CLIP_SCOPES = ('global', 'per_tower')


def _names(path) -> tuple[str, ...]:
  """('encoder', 'blocks', 'attn', ...) from a jax key path (DictKey / GetAttrKey / SequenceKey)."""
  out = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return tuple(out)


def _ends_with(names: tuple[str, ...], suffix: tuple[str, ...]) -> bool:
  return names[-len(suffix):] == suffix


def is_prototype(names: tuple[str, ...]) -> bool:
  """Whether the leaf is part of a DINO/iBOT prototype layer (v or g)."""
  return len(names) >= 2 and names[-1] in ('v', 'g') and names[-2] in PROTOTYPE_PARENTS


def decays(names: tuple[str, ...]) -> bool:
  """Whether the leaf at `names` gets weight decay; ValueError for a name no rule covers."""
  if is_prototype(names):
    return names[-1] == 'v'
  if names[-1] in DECAY_LEAVES or any(_ends_with(names, s) for s in DECAY_PATHS):
    return True
  if names[-1] in NO_DECAY_LEAVES:
    return False
  raise ValueError(
      f'parameter {"/".join(names)!r} has no weight-decay rule; add its leaf name to DECAY_LEAVES '
      '(matrix weights) or NO_DECAY_LEAVES (biases, norms, tokens, gains) in vtp_jax/train/optim.py.')


def _frozen(names: tuple[str, ...]) -> bool:
  return 'last_layer' in names or is_prototype(names)


def optimizer_param_labels(params) -> Any:
  """Tree of 'decay' / 'no_decay' / 'frozen_decay' / 'frozen_no_decay' strings, one per leaf.

  'frozen_*' marks the DINO prototype layer (v, g), held still for c.optim.freeze_last_layer_steps.
  Useful for per-group metrics (e.g. update norms) and for reading the grouping in tests.
  """
  def label(path, _):
    names = _names(path)
    base = 'decay' if decays(names) else 'no_decay'
    return f'frozen_{base}' if _frozen(names) else base
  return jax.tree_util.tree_map_with_path(label, params)


def weight_decay_mask(params) -> Any:
  """Bool tree: True where decoupled weight decay applies (matrix weights only)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: decays(_names(p)), params)


def last_layer_mask(params) -> Any:
  """Bool tree: True for the DINO prototype layer(s) (v and g; anything under 'last_layer')."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _frozen(_names(p)), params)


def _check_layout(params, scan_layers: bool) -> None:
  """Fails when the encoder's block naming disagrees with c.precision.scan_layers."""
  encoder = params.get('encoder', {}) if isinstance(params, dict) else {}
  has_scanned = 'blocks' in encoder
  has_unscanned = any(_BLOCK_RE.fullmatch(str(k)) for k in encoder)
  if scan_layers and has_unscanned:
    raise ValueError('c.precision.scan_layers=True but the encoder params hold blocks_0, blocks_1, ...; '
                     'pass the scan_layers value the model was built with.')
  if not scan_layers and has_scanned:
    raise ValueError("c.precision.scan_layers=False but the encoder params hold a scanned 'blocks'; "
                     'pass the scan_layers value the model was built with.')


def lr_multipliers(params, *, scan_layers: bool, encoder_depth: int, layer_decay: float,
                   patch_embed_lr_mult: float) -> Any:
  """Per-leaf learning-rate multipliers: a float, or for scanned encoder blocks an array (depth, 1, ...).

  Encoder layer ids follow DINOv2's `get_vit_lr_decay_rate`: 0 for patch_embed / cls / mask /
  registers, i + 1 for block i, depth + 1 for the rest (final norm, bottleneck); the multiplier is
  layer_decay ** (depth + 1 - id), times `patch_embed_lr_mult` under patch_embed. Other towers get 1.
  """
  _check_layout(params, scan_layers)
  depth = encoder_depth

  def mult(path, leaf):
    names = _names(path)
    if names[0] != 'encoder' or len(names) < 2:
      return 1.0
    top = names[1]
    extra = patch_embed_lr_mult if top == 'patch_embed' else 1.0
    if top in LAYER0_ENCODER_KEYS:
      return float(layer_decay ** (depth + 1)) * extra
    if top == 'blocks':
      shape = tuple(leaf.shape)
      if not shape or shape[0] != depth:
        raise ValueError(f'scanned leaf {"/".join(names)} has shape {shape}, expected a leading axis '
                         f'of c.model.encoder.depth={depth}; check encoder_depth and scan_layers.')
      per_block = layer_decay ** (depth - np.arange(depth, dtype=np.float64))  # id = i + 1
      # Trailing singleton axes let the (depth,) vector broadcast against any leaf rank.
      return per_block.astype(np.float32).reshape((depth,) + (1,) * (len(shape) - 1))
    m = _BLOCK_RE.fullmatch(top)
    if m:
      i = int(m.group(1))
      if i >= depth:
        raise ValueError(f'encoder has {top} but c.model.encoder.depth={depth}; pass the real depth.')
      return float(layer_decay ** (depth - i))
    return 1.0  # id = depth + 1: final norm, bottleneck

  return jax.tree_util.tree_map_with_path(mult, params)


def _scale_by_tree(multipliers) -> optax.GradientTransformation:
  """Multiplies each update leaf by its (broadcastable) multiplier; stateless."""
  def f(updates, params=None):
    del params
    def one(u, m):
      if isinstance(m, float) and m == 1.0:
        return u  # skip a no-op multiply on the (majority of) leaves without a multiplier
      return (u * m).astype(u.dtype)
    return jax.tree.map(one, updates, multipliers)
  return optax.stateless(f)


def gradient_clipping(max_norm: float, params, scope: str = 'global') -> optax.GradientTransformation:
  """Clip by global norm; 'per_tower' clips each top-level subtree on its own, as DINOv2 clips each
  student module (backbone, dino_head, ibot_head) separately. max_norm = 0 disables clipping."""
  if scope not in CLIP_SCOPES:
    raise ValueError(f'c.optim.clip_grad_scope={scope!r} is not one of {CLIP_SCOPES}; pick one of them.')
  if max_norm < 0:
    raise ValueError(f'c.optim.clip_grad_norm={max_norm} must be >= 0 (0 disables clipping).')
  if max_norm == 0:
    return optax.identity()
  if scope == 'global':
    return optax.clip_by_global_norm(max_norm)
  labels = jax.tree_util.tree_map_with_path(lambda p, _: _names(p)[0], params)
  towers = sorted(set(jax.tree.leaves(labels)))
  return optax.multi_transform({t: optax.clip_by_global_norm(max_norm) for t in towers}, labels)


def _freeze_for(steps: int, params) -> optax.GradientTransformation:
  """Zeroes last-layer updates for the first `steps` updates (DINOv2 sets their lr to 0 then).

  Adam moments still see these gradients, as in DINOv2 where the frozen group is stepped with lr 0.
  """
  if steps == 0:
    return optax.identity()
  def gate(count):
    return jnp.where(count >= steps, 1.0, 0.0).astype(jnp.float32)
  return optax.masked(optax.scale_by_schedule(gate), last_layer_mask(params))


# The top-level modules each loss branch reads (vtp_jax/train/step.py).
BRANCH_MODULES = {'clip': ('encoder', 'text', 'clip'), 'ssl': ('encoder', 'dino_head'),
                  'rec': ('encoder', 'decoder')}


def idle_modules(branches, params_shape) -> tuple[str, ...]:
  """Top-level modules of `params_shape` that none of the active `branches` reads."""
  used = {m for b in branches for m in BRANCH_MODULES[b]}
  return tuple(sorted(k for k in params_shape if k not in used))


def _only_modules(active: tuple[str, ...], inner) -> optax.GradientTransformation:
  """`inner` on the `active` top-level modules; every other module gets a zero update and keeps no
  optimizer state (XLA folds the `p + 0` away, so idle parameters cost nothing per step)."""
  def pick(tree):
    return None if tree is None else {k: tree[k] for k in active}

  def init(params):
    return inner.init(pick(params))

  def update(updates, state, params=None):
    new, state = inner.update(pick(updates), state, pick(params))
    return {k: new[k] if k in new else jax.tree.map(jnp.zeros_like, u)
            for k, u in updates.items()}, state

  return optax.GradientTransformation(init, update)


def _in_range(name: str, value: float, lo: float, hi: float, *, lo_open=False, hi_open=False,
              hint: str = '') -> float:
  bad_lo = value <= lo if lo_open else value < lo
  bad_hi = value >= hi if hi_open else value > hi
  if bad_lo or bad_hi:
    lb, rb = '(' if lo_open else '[', ')' if hi_open else ']'
    raise ValueError(f'c.optim.{name}={value} must lie in {lb}{lo}, {hi}{rb}. {hint}'.strip())
  return float(value)


def make_optimizer(optim_cfg: ml_collections.ConfigDict, params_shape, scan_layers: bool,
                   encoder_depth: int, *, total_steps: int, global_batch: int,
                   idle: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """AdamW with scheduled lr and decoupled weight decay, DINOv2 parameter groups and clipping.

  Args:
    optim_cfg: c.optim (keys listed in the module docstring).
    params_shape: the parameter tree (arrays or jax.ShapeDtypeStruct); only names and shapes are read.
    scan_layers: c.precision.scan_layers, the layout of `params_shape`.
    encoder_depth: c.model.encoder.depth, for layer-wise lr decay.
    total_steps: c.train.steps, the end of the cosine schedules.
    global_batch: images per optimizer step, for the lr scaling rule.
    idle: top-level modules left untouched (`idle_modules`): no update, no optimizer state.
  """
  def get(key):
    return schedules.cfg_value(optim_cfg, key)

  name = get('optimizer')
  if name != 'adamw':
    raise ValueError(f"c.optim.optimizer={name!r} is not supported; use 'adamw'.")
  if encoder_depth <= 0:
    raise ValueError(f'c.model.encoder.depth={encoder_depth} must be positive.')
  b1 = _in_range('b1', get('b1'), 0.0, 1.0, hi_open=True)
  b2 = _in_range('b2', get('b2'), 0.0, 1.0, hi_open=True)
  eps = _in_range('eps', get('eps'), 0.0, 1.0, lo_open=True)
  layer_decay = _in_range('layer_decay', get('layer_decay'), 0.0, 1.0, lo_open=True,
                          hint='1.0 disables layer-wise lr decay.')
  patch_mult = _in_range('patch_embed_lr_mult', get('patch_embed_lr_mult'), 0.0, float('inf'),
                         hint='1.0 disables it.')
  freeze = int(get('freeze_last_layer_steps'))
  if freeze < 0:
    raise ValueError(f'c.optim.freeze_last_layer_steps={freeze} must be >= 0 (0 disables freezing).')

  active = tuple(k for k in params_shape if k not in idle)
  if not active:
    raise ValueError(f'every module is idle ({sorted(idle)}): nothing to optimise.')
  if idle:
    params_shape = {k: params_shape[k] for k in active}
  lr = schedules.lr_schedule(optim_cfg, total_steps, global_batch)
  wd = schedules.weight_decay_schedule(optim_cfg, total_steps)
  if float(get('weight_decay')) == 0.0 and float(get('weight_decay_end')) == 0.0:
    wd = 0.0  # optax skips the decay term entirely for a constant zero
  multipliers = lr_multipliers(params_shape, scan_layers=scan_layers, encoder_depth=encoder_depth,
                               layer_decay=layer_decay, patch_embed_lr_mult=patch_mult)

  tx = optax.chain(
      gradient_clipping(float(get('clip_grad_norm')), params_shape, get('clip_grad_scope')),
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      # Before the lr scaling so that the lr (and its multipliers) scale the decay, as torch AdamW.
      optax.add_decayed_weights(wd, mask=weight_decay_mask(params_shape)),
      _scale_by_tree(multipliers),
      optax.scale_by_learning_rate(lr),
      _freeze_for(freeze, params_shape),
  )
  return _only_modules(active, tx) if idle else tx
