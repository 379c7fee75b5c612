"""The fused VTP train step: CLIP + DINO/iBOT/KoLeo + L1/LPIPS under one value_and_grad, the optimizer
update, the logit-scale clamp, the EMA teacher and the centre updates, all in one jitted, sharded
function with the state donated.

L = clip_weight * L_clip + ssl_weight * (dino_weight * L_dino + ibot_weight * L_ibot
    + koleo_weight * L_koleo) + rec_weight * (l1_weight * L1 + lpips_weight * LPIPS)

A branch whose weight is 0 is not traced at all (its inputs are absent from the batch), so the
reconstruction-only baseline and the two-loss ablations compile to smaller programs.
"""

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vtp_jax import batch as batch_lib
from vtp_jax import compiler_options
from vtp_jax import losses
from vtp_jax import pixels
from vtp_jax import sharding
from vtp_jax.models import vtp
from vtp_jax.train import accumulate
from vtp_jax.train import schedules
from vtp_jax.train import state as state_lib

normalize = pixels.normalize_on_device


def _crops_first(x):
  """(Bs, crops, ...) -> (crops, Bs, ...), the order the DINO losses take; Bs stays sharded."""
  return jnp.swapaxes(x, 0, 1)


def _merge_crops(x):
  """(Bs, crops, ...) -> (Bs * crops, ...): one encoder batch, rows still contiguous per device."""
  return x.reshape((-1,) + x.shape[2:])


class MaskedBuffer(NamedTuple):
  """The masked global-crop patches of each device group, shared by teacher and student.

  idx (G, size) into a group's flattened (images * patches) tokens; valid (G, size) bool;
  weights (G, size) = 1 / (masked patches of the token's image), 0 for padding; dropped, the
  masked tokens beyond a group's buffer (0 whenever masks are collated per device)."""
  idx: jax.Array
  valid: jax.Array
  weights: jax.Array
  dropped: jax.Array


def _by_group(x, groups):
  """(rows, ...) -> (groups, rows / groups, ...), axis 0 on the batch shards: group g is the rows
  of device g, so what follows per group stays on its device."""
  x = x.reshape((groups, -1) + x.shape[1:])
  if groups == 1:
    return x
  return nn.with_logical_constraint(x, ('act_batch',) + (None,) * (x.ndim - 1))


def _masked_token_buffer(mask, size, groups):
  """The MaskedBuffer of mask (n_images, n_patches), `size` tokens for each of `groups` groups."""
  n_patches = mask.shape[1]
  flat = _by_group(mask, groups).reshape(groups, -1)
  idx = jax.vmap(lambda row: jnp.nonzero(row, size=size, fill_value=0)[0])(flat)
  count = jnp.sum(flat, axis=1, dtype=jnp.int32)
  valid = jnp.arange(size)[None, :] < count[:, None]
  per_image = _by_group(jnp.sum(mask, axis=1).astype(jnp.float32), groups)
  token_image = jnp.take_along_axis(per_image, idx // n_patches, axis=1)
  weights = jnp.where(valid, 1.0 / jnp.maximum(token_image, 1.0), 0.0)
  return MaskedBuffer(idx, valid, weights, jnp.sum(jnp.maximum(count - size, 0)))


def _gather_buffer(patches, idx, groups):
  """(images, patches, D) tokens -> (G, size, D): each group gathers its own masked tokens."""
  tokens = _by_group(patches, groups).reshape(groups, -1, patches.shape[-1])
  return jnp.take_along_axis(tokens, idx[..., None], axis=1)


def _head_per_group(apply_head, parts, groups):
  """The shared DINO/iBOT head over several token sets in one call, concatenated per device group
  (never across devices), and its logits split back into the sets' (rows, K) layouts.

  parts: arrays (rows_i, D) with rows grouped like the batch, or (G, rows_i / G, D) already."""
  grouped = [p if p.ndim == 3 else _by_group(p, groups) for p in parts]
  widths = [p.shape[1] for p in grouped]
  tokens = jnp.concatenate(grouped, axis=1)
  logits = apply_head(tokens.reshape(-1, tokens.shape[-1])).reshape(groups, sum(widths), -1)
  bounds = [sum(widths[:i]) for i in range(len(widths) + 1)]
  return [logits[:, a:b].reshape(-1, logits.shape[-1]) for a, b in zip(bounds, bounds[1:])]


class _Step:
  """Holds the static pieces (model, optimizer, schedules, config) the step closes over."""

  def __init__(self, config, tx, ibot_groups=1):
    self.config = config
    self.model = vtp.build(config)
    self.tx = tx
    self.branches = batch_lib.active_branches(config)
    self.ibot_groups = ibot_groups
    self.buffer_size = batch_lib.ibot_buffer_size(config, ibot_groups)
    self.lr = schedules.lr_schedule(config.optim, config.train.steps, config.data.batch_size)
    self.wd = schedules.weight_decay_schedule(config.optim, config.train.steps)
    self.momentum = schedules.momentum_schedule(config.optim, config.train.steps)
    self.encoder_cfg = config.model.encoder
    self.accum_steps = accumulate.accum_steps(config)

  def apply(self, params, *args, method, rngs=None, **kwargs):
    return self.model.apply({'params': params}, *args, method=method, rngs=rngs, **kwargs)

  # -- branches ----------------------------------------------------------------------------------

  def clip_features(self, params, batch, rngs):
    """(image, text) embeddings of a CLIP batch, the inputs of the contrastive loss."""
    m = self.model
    image = self.apply(params, normalize(batch['image']), method=m.clip_image_features,
                       drop_rate=self.encoder_cfg.clip_drop_rate, train=True, rngs=rngs)
    return image, self.apply(params, batch['tokens'], method=m.clip_text_features)

  def clip_objective(self, image, text, clip_params):
    """The contrastive loss of embeddings under `clip_params` (the logit scale, and the bias)."""
    if self.config.loss.clip_type == 'sigmoid':
      if 'logit_bias' not in clip_params:
        raise ValueError("loss.clip_type='sigmoid' needs model.logit_bias=True.")
      return losses.clip_sigmoid_loss(image, text, clip_params['logit_scale'],
                                      clip_params['logit_bias'])
    return losses.clip_softmax_loss(image, text, clip_params['logit_scale'])

  def clip_loss(self, params, batch, rngs):
    image, text = self.clip_features(params, batch, rngs)
    return self.clip_objective(image, text, params['clip'])

  def masked_buffer(self, ssl):
    """The MaskedBuffer of the global crops' masks, shared by teacher and student."""
    return _masked_token_buffer(_merge_crops(ssl['mask']), self.buffer_size, self.ibot_groups)

  def head(self, params, parts):
    apply_head = lambda x: self.apply(params, x, method=self.model.dino)  # noqa: E731
    return _head_per_group(apply_head, parts, self.ibot_groups)

  def teacher_logits(self, teacher_params, ssl, buffer):
    """Teacher forward on the unmasked global crops: raw CLS logits (crops, Bs, K) and the masked
    buffer's patch logits (rows, K)."""
    b_ssl, n_global = ssl['global'].shape[:2]
    feats = self.apply(teacher_params, normalize(_merge_crops(ssl['global'])),
                       method=self.model.encode)
    patches = _gather_buffer(feats['patches'], buffer.idx, self.ibot_groups)
    cls_logits, patch_logits = self.head(teacher_params, [feats['cls'], patches])
    return _crops_first(cls_logits.reshape(b_ssl, n_global, -1)), patch_logits

  def normalise_teacher(self, cls_logits, patch_logits, valid, loss_state, temp):
    """Centering or Sinkhorn-Knopp over every sample the logits hold (all leading axes)."""
    c = self.config
    if c.loss.teacher_norm == 'centering':
      return (losses.teacher_centering(cls_logits, loss_state['dino_center'], temp),
              losses.teacher_centering(patch_logits, loss_state['ibot_center'], temp))
    iters = c.loss.sinkhorn_iterations
    return (losses.sinkhorn_knopp(cls_logits, temp, iters),
            losses.sinkhorn_knopp(patch_logits, temp, iters, valid=valid))

  def teacher_targets(self, teacher_params, ssl, buffer, loss_state, temp):
    """(cls_probs, patch_probs, cls_logits, patch_logits, valid) of the teacher, no gradient."""
    cls_logits, patch_logits = self.teacher_logits(teacher_params, ssl, buffer)
    valid = buffer.valid.reshape(-1)
    cls_probs, patch_probs = self.normalise_teacher(cls_logits, patch_logits, valid, loss_state,
                                                    temp)
    return jax.lax.stop_gradient((cls_probs, patch_probs, cls_logits, patch_logits, valid))

  def student_global(self, params, ssl, rngs):
    """The student's encoding of the masked global crops, {'cls', 'patches', ...}."""
    return self.apply(params, normalize(_merge_crops(ssl['global'])),
                      mask=_merge_crops(ssl['mask']), drop_rate=self.encoder_cfg.ssl_drop_rate,
                      train=True, method=self.model.encode, rngs=rngs)

  def ssl_student(self, params, ssl, buffer, targets, rngs):
    """dino_weight * DINO + ibot_weight * iBOT of a batch against its teacher targets, their
    metrics, and the global crops' CLS rows (Bs * crops, D), KoLeo's input."""
    c, m = self.config, self.model
    cls_probs, patch_probs = targets[:2]
    b_ssl, n_global = ssl['global'].shape[:2]
    g = self.student_global(params, ssl, rngs)
    cls_parts = [g['cls']]
    n_local = ssl['local'].shape[1]
    if n_local:
      loc = self.apply(params, normalize(_merge_crops(ssl['local'])),
                       drop_rate=self.encoder_cfg.ssl_drop_rate, train=True, method=m.encode,
                       rngs=rngs)
      cls_parts.append(loc['cls'])
    patches = _gather_buffer(g['patches'], buffer.idx, self.ibot_groups)
    # One head call over every CLS token and the masked-token buffer (the head is shared).
    logits = self.head(params, cls_parts + [patches])
    global_logits = _crops_first(logits[0].reshape(b_ssl, n_global, -1))
    n_protos = logits[0].shape[-1]
    local_logits = _crops_first(
        (logits[1] if n_local else logits[0][:0]).reshape(b_ssl, n_local, n_protos))
    patch_logits = logits[-1]
    dino, dino_metrics = losses.dino_loss(global_logits, local_logits, cls_probs,
                                          c.loss.student_temp)
    ibot = losses.ibot_loss(patch_logits, patch_probs, buffer.weights.reshape(-1),
                            n_global_images=n_global * b_ssl, student_temp=c.loss.student_temp)
    partial = c.loss.dino_weight * dino + c.loss.ibot_weight * ibot
    return partial, {'dino': dino, 'ibot': ibot, **dino_metrics}, g['cls']

  def koleo(self, cls_rows):
    """KoLeo of the global crops' CLS rows (Bs * crops, D), each crop over the batch."""
    return losses.koleo_loss_global_crops(
        _crops_first(cls_rows.reshape(-1, batch_lib.N_GLOBAL_CROPS, cls_rows.shape[-1])))

  def ssl_loss(self, params, ssl, buffer, targets, rngs):
    partial, metrics, cls_rows = self.ssl_student(params, ssl, buffer, targets, rngs)
    koleo = self.koleo(cls_rows)
    return partial + self.config.loss.koleo_weight * koleo, {**metrics, 'koleo': koleo}

  def rec_loss(self, params, batch, frozen, rngs):
    c, m = self.config, self.model
    target = normalize(batch['image'])
    latents = self.apply(params, target, drop_rate=self.encoder_cfg.rec_drop_rate, train=True,
                         method=m.latents, rngs=rngs)
    pred = self.apply(params, latents, method=m.decode)
    return losses.reconstruction_loss(pred, target, frozen.get('lpips'), c.loss.l1_weight,
                                      c.loss.lpips_weight, c.loss.l1_space)

  # -- the step ----------------------------------------------------------------------------------

  def rng_streams(self, key):
    """A function giving each branch's {'drop_path', 'rope'} keys in turn (clip, ssl, rec)."""
    keys = iter(jax.random.split(key, 6))
    return lambda: {'drop_path': next(keys), 'rope': next(keys)}

  def gradients(self, state, batch, frozen, step_rng, temp):
    """(loss, metrics, grads, teacher targets, dropped iBOT tokens) of the whole batch at once."""
    c = self.config
    targets = buffer = None
    if 'ssl' in self.branches:
      buffer = self.masked_buffer(batch['ssl'])
      teacher_params = {**state.params, **state.teacher}
      targets = self.teacher_targets(teacher_params, batch['ssl'], buffer, state.loss_state, temp)

    def loss_fn(params):
      metrics, total = {}, 0.0
      rngs = self.rng_streams(step_rng)
      if 'clip' in self.branches:
        clip, clip_metrics = self.clip_loss(params, batch['clip'], rngs())
        total += c.loss.clip_weight * clip
        metrics.update(clip=clip, **clip_metrics)
      if 'ssl' in self.branches:
        ssl, ssl_metrics = self.ssl_loss(params, batch['ssl'], buffer, targets, rngs())
        total += c.loss.ssl_weight * ssl
        metrics.update(ssl=ssl, **ssl_metrics)
      if 'rec' in self.branches:
        rec, rec_metrics = self.rec_loss(params, batch['rec'], frozen, rngs())
        total += c.loss.rec_weight * rec
        metrics.update(rec=rec, **rec_metrics)
      return total, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return loss, metrics, grads, targets, buffer.dropped if buffer is not None else None

  def __call__(self, state, batch, frozen):
    c = self.config
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    temp = losses.teacher_temperature(state.step, warmup_steps=c.loss.teacher_temp_warmup_steps,
                                      warmup_temp=c.loss.teacher_temp_warmup,
                                      final_temp=c.loss.teacher_temp)
    # train.accum_steps > 1: the same update from micro-batches (docs/scaling.md, 'Gradient
    # accumulation').
    gradients = accumulate.vtp_gradients if self.accum_steps > 1 else _Step.gradients
    loss, metrics, grads, targets, dropped = gradients(self, state, batch, frozen, step_rng, temp)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    clip_params = dict(params['clip'])
    clip_params['logit_scale'] = losses.clamp_logit_scale(clip_params['logit_scale'],
                                                          c.loss.max_logit_scale)
    params = {**params, 'clip': clip_params}

    teacher, loss_state = state.teacher, state.loss_state
    momentum = self.momentum(state.step)
    if 'ssl' in self.branches:
      teacher = jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s,
                             state.teacher, state_lib.teacher_of(params))
      cls_probs, patch_probs, cls_logits, patch_logits, valid = targets
      if c.loss.teacher_norm == 'centering':
        m_c = c.loss.center_momentum
        loss_state = {
            'dino_center': losses.update_center(loss_state['dino_center'], cls_logits, m_c),
            'ibot_center': losses.update_center(loss_state['ibot_center'], patch_logits, m_c,
                                                valid=valid)}
      metrics['teacher_entropy'] = losses.teacher_entropy(cls_probs)
      metrics['teacher_patch_entropy'] = losses.teacher_entropy(patch_probs, valid=valid)
      metrics['ibot_tokens_dropped'] = dropped

    metrics.update(
        loss=loss, grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
        update_norm=optax.tree.norm(updates), lr=self.lr(state.step),
        weight_decay=self.wd(state.step), logit_scale=jnp.exp(params['clip']['logit_scale']),
        teacher_temp=temp, teacher_momentum=momentum)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              teacher=teacher, loss_state=loss_state)
    return new_state, metrics


def _uses_lpips(config) -> bool:
  return 'rec' in batch_lib.active_branches(config) and bool(config.loss.lpips_weight)


def frozen_inputs(config) -> dict:
  """Constant inputs of the step (not trained, not checkpointed): the LPIPS network weights."""
  if _uses_lpips(config):
    return {'lpips': jax.tree.map(jnp.asarray, losses.load_lpips_params())}
  return {}


def skip_nonfinite(old_state, new_state, metrics):
  """`train.nan_policy='skip'`: where the loss or gradient norm is not finite, every field keeps
  its old value except the step counter (so data and schedules move on); `update_skipped` says so.

  A select inside the step rather than on host, because the state is donated: the host no longer
  holds the old state once the step has run. The cost is one state-sized temporary in the step.
  """
  ok = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
  kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, old_state)
  return kept.replace(step=new_state.step), {**metrics, 'update_skipped': 1 - ok.astype(jnp.int32)}


def make_train_step(config, mesh, state_shardings, tx):
  """The jitted stage-1 step `(state, batch, frozen) -> (state, metrics)`, state donated.

  Shardings are explicit on every input and output; metrics come back replicated. The other
  trainings' steps (`train/gan_stage.py`, `generation/step.py`) go through `jit_step` as well.
  """
  batch_lib.check_divisible(config, mesh)
  step = _Step(config, tx, ibot_groups=batch_lib.ibot_groups(config, mesh))
  return jit_step(step, config, mesh, state_shardings, batch_lib.batch_shardings(config, mesh),
                  frozen_inputs_abstract(config))


def jit_step(step, config, mesh, state_shardings, batch_shardings, frozen_abstract):
  """Jits `step(state, batch, frozen)` under the logical-axis rules with explicit shardings, the
  state donated and, under `train.nan_policy='skip'`, non-finite updates dropped in the step."""
  rules = sharding.rules_from_config(config)
  replicated = sharding.replicated(mesh)
  frozen_shardings = jax.tree.map(lambda _: replicated, frozen_abstract)
  skip = config.train.get('nan_policy', 'stop') == 'skip'

  @functools.wraps(step.__call__)
  def step_fn(state, batch, frozen):
    with nn.logical_axis_rules(rules):
      new_state, metrics = step(state, batch, frozen)
    return skip_nonfinite(state, new_state, metrics) if skip else (new_state, metrics)

  # The platform's compiler options (vtp_jax/compiler_options.py), so every caller of the step
  # (the launcher, bench.step, bench.aot) compiles the same program.
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings, frozen_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=0,
                   compiler_options=compiler_options.for_mesh(mesh) or None)

  def run(state, batch, frozen):
    with jax.set_mesh(mesh):
      return jitted(state, batch, frozen)

  run.jitted = jitted
  run.step = step
  return run


def frozen_inputs_abstract(config) -> dict:
  """Shapes of `frozen_inputs` (the weights are read once per process, lru-cached)."""
  if _uses_lpips(config):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                        {'lpips': losses.load_lpips_params()})
  return {}
