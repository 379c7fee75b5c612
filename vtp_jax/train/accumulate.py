"""Exact gradient accumulation inside the one jitted step (`train.accum_steps = k`).

The global batch is cut into k micro-batches and the update is the un-accumulated step's: same
loss, same gradient, same teacher targets and centre updates (docs/scaling.md, 'Gradient
accumulation'). Micro-batch m holds the m-th k-th of every device's rows, so no row changes device.

Losses that are means over images (DINO, iBOT against fixed targets, L1 + LPIPS, the generator's
flow loss) accumulate plainly: the mean of the micro-batches' gradients. Losses that couple the
whole batch take GradCache's route (OpenCLIP `--accum-freq`):
  1. a pass without gradient over every micro-batch caches what couples them: the CLIP image and
     text embeddings, the student's global-crop CLS features (KoLeo's neighbours) and the teacher's
     logits;
  2. the coupled losses run once over the whole cache: the contrastive loss (and its gradient for
     the logit scale and bias), KoLeo, and centering or Sinkhorn-Knopp of the teacher;
  3. each micro-batch runs forward and backward again, its cached features taking the whole-batch
     loss's gradient for them (a vector-Jacobian product), beside the plain losses.
The repeated forwards (CLIP image and text towers, the student on the global crops when KoLeo is
on) are what caching costs; `train/flops.py` counts them as 'accum_cache'.
The GAN stage (train/gan_stage.py) takes the same route for its discriminator, whose batch norm
couples the images; the decoder's forward is what it repeats.
Random draws (drop path, RoPE jitter) are made per micro-batch, the same in both passes of it, so
with those on the update equals the un-accumulated one in distribution, not bit for bit.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtp_jax import batch as batch_lib
from vtp_jax import sharding

accum_steps = batch_lib.accum_steps


def split(tree, k: int):
  """Each leaf (B, ...) -> (k, B / k, ...). Device d's rows [d n, (d + 1) n) give micro-batch m
  its rows [d n + m n / k, d n + (m + 1) n / k), so every micro-batch stays on its devices."""
  # The mesh the step is traced under; batch.check_micro_batches has checked that the rows split.
  shards = sharding.batch_shards(jax.sharding.get_abstract_mesh())

  def one(x):
    rows = x.shape[0]
    y = x.reshape((shards, k, rows // (shards * k)) + x.shape[1:])
    y = jnp.swapaxes(y, 0, 1).reshape((k, rows // k) + x.shape[1:])
    return nn.with_logical_constraint(y, (None, 'act_batch') + (None,) * (x.ndim - 1))

  return jax.tree.map(one, tree)


def merge(tree):
  """`split`'s inverse: each leaf (k, B / k, ...) -> (B, ...) in the batch's own row order, every
  row back on the device it came from."""
  shards = sharding.batch_shards(jax.sharding.get_abstract_mesh())

  def one(y):
    k, rows = y.shape[0], y.shape[0] * y.shape[1]
    x = jnp.swapaxes(y.reshape((k, shards, rows // (shards * k)) + y.shape[2:]), 0, 1)
    return nn.with_logical_constraint(x.reshape((rows,) + y.shape[2:]),
                                      ('act_batch',) + (None,) * (y.ndim - 2))

  return jax.tree.map(one, tree)


def grads_and_stacked(fn, init, xs):
  """Sums the first output of `fn(x)` over the micro-batches `xs` (leading axis k) in a scan
  carry that starts at `init`, and stacks the second (per micro-batch metrics)."""
  def body(carry, x):
    grads, out = fn(x)
    return jax.tree.map(jnp.add, carry, grads), out

  return jax.lax.scan(body, init, xs)


def zeros_like(tree):
  return jax.tree.map(jnp.zeros_like, tree)


def mean_metrics(stacked: dict) -> dict:
  """Per micro-batch metrics (k, ...) -> their means (every logged term is a mean over images)."""
  return {name: jnp.mean(value.astype(jnp.float32), axis=0) for name, value in stacked.items()}


def _vdot(cotangent, x):
  """<cotangent, x>: its gradient in x is the cached cotangent (the VJP of the cached loss)."""
  return jnp.sum(jax.lax.stop_gradient(cotangent).astype(jnp.float32) * x.astype(jnp.float32))


def vtp_gradients(step, state, batch, frozen, step_rng, temp):
  """`train/step.py` `_Step.gradients` over `step.accum_steps` micro-batches: the same
  (loss, metrics, grads, teacher targets, dropped iBOT tokens), the targets stacked (k, ...)."""
  c, k, branches = step.config, step.accum_steps, step.branches
  params = state.params
  micro = split(batch, k)
  index = jnp.arange(k)
  use_koleo = 'ssl' in branches and bool(c.loss.koleo_weight)
  teacher_params = {**params, **state.teacher}

  def branch_rngs(m):
    draw = step.rng_streams(jax.random.fold_in(step_rng, m))
    return {name: draw() for name in ('clip', 'ssl', 'rec') if name in branches}

  # 1. What couples the micro-batches, without gradient.
  def cache_pass(_, xs):
    mb, m = xs
    rngs, out = branch_rngs(m), {}
    if 'clip' in branches:
      out['image'], out['text'] = step.clip_features(params, mb['clip'], rngs['clip'])
    if 'ssl' in branches:
      buffer = step.masked_buffer(mb['ssl'])
      out['buffer'] = buffer
      out['teacher'] = step.teacher_logits(teacher_params, mb['ssl'], buffer)
      if use_koleo:
        out['cls'] = step.student_global(params, mb['ssl'], rngs['ssl'])['cls']
    return None, jax.lax.stop_gradient(out)

  _, cache = jax.lax.scan(cache_pass, None, (micro, index))

  # 2. The coupled losses over the whole batch, and their gradients for the cached features.
  metrics, cotangents, head_grads, targets, dropped = {}, {}, {}, None, None
  if 'clip' in branches:
    image, text = cache['image'], cache['text']
    head = {name: params['clip'][name] for name in ('logit_scale', 'logit_bias')
            if name in params['clip']}
    objective = lambda i, t, h: step.clip_objective(  # noqa: E731
        i.reshape(-1, i.shape[-1]), t.reshape(-1, t.shape[-1]), h)
    (clip, clip_metrics), (g_image, g_text, head_grads) = jax.value_and_grad(
        objective, argnums=(0, 1, 2), has_aux=True)(image, text, head)
    w = c.loss.clip_weight
    cotangents['image'], cotangents['text'] = w * g_image, w * g_text
    head_grads = jax.tree.map(lambda g: w * g, head_grads)
    metrics.update(clip=clip, **clip_metrics)
  if 'ssl' in branches:
    cls_logits, patch_logits = cache['teacher']
    valid = cache['buffer'].valid.reshape(k, -1)
    cls_probs, patch_probs = step.normalise_teacher(cls_logits, patch_logits, valid,
                                                    state.loss_state, temp)
    targets = jax.lax.stop_gradient((cls_probs, patch_probs, cls_logits, patch_logits, valid))
    dropped = jnp.sum(cache['buffer'].dropped)
    if use_koleo:
      koleo, g_cls = jax.value_and_grad(
          lambda rows: step.koleo(rows.reshape(-1, rows.shape[-1])))(cache['cls'])
      cotangents['cls'] = c.loss.ssl_weight * c.loss.koleo_weight * g_cls
      metrics['koleo'] = koleo

  # 3. Each micro-batch again, with gradient.
  def micro_grads(xs):
    mb, m, cached, cotangent, target = xs
    rngs = branch_rngs(m)

    def loss_fn(p):
      total, out = 0.0, {}
      if 'clip' in branches:
        image, text = step.clip_features(p, mb['clip'], rngs['clip'])
        total += _vdot(cotangent['image'], image) + _vdot(cotangent['text'], text)
      if 'ssl' in branches:
        partial, ssl_metrics, cls_rows = step.ssl_student(p, mb['ssl'], cached['buffer'], target,
                                                          rngs['ssl'])
        total += c.loss.ssl_weight * partial / k
        if use_koleo:
          total += _vdot(cotangent['cls'], cls_rows)
        out.update(ssl_partial=partial, **ssl_metrics)
      if 'rec' in branches:
        rec, rec_metrics = step.rec_loss(p, mb['rec'], frozen, rngs['rec'])
        total += c.loss.rec_weight * rec / k
        out.update(rec=rec, **rec_metrics)
      return total, out

    return jax.grad(loss_fn, has_aux=True)(params)

  per_micro_targets = targets[:2] if targets is not None else None
  grads, stacked = grads_and_stacked(
      micro_grads, zeros_like(params),
      (micro, index, {'buffer': cache.get('buffer')}, cotangents, per_micro_targets))
  if head_grads:
    grads = {**grads, 'clip': {**grads['clip'],
                               **{n: grads['clip'][n] + g for n, g in head_grads.items()}}}

  metrics.update(mean_metrics(stacked))
  loss = 0.0
  if 'clip' in branches:
    loss += c.loss.clip_weight * metrics['clip']
  if 'ssl' in branches:
    ssl = metrics.pop('ssl_partial')
    if use_koleo:
      ssl = ssl + c.loss.koleo_weight * metrics['koleo']
    metrics['ssl'] = ssl
    loss += c.loss.ssl_weight * ssl
  if 'rec' in branches:
    loss += c.loss.rec_weight * metrics['rec']
  return loss, metrics, grads, targets, dropped
