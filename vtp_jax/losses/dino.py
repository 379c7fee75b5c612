"""DINOv2 self-distillation: teacher normalisation (centering, Sinkhorn-Knopp) and the DINO/iBOT losses.

This file owns everything between "head logits" and "SSL loss scalar" for the DINO (CLS token) and
iBOT (masked patch token) objectives, plus the teacher-temperature schedule and a collapse metric.
KoLeo lives in koleo.py. Spec section 2.3: the mechanics are DINOv2's [R] (VTP's loss code is not
public), reproduced from facebookresearch/dinov2 `dinov2/train/ssl_meta_arch.py`
(`forward_backward`), `dinov2/loss/dino_clstoken_loss.py` and `dinov2/loss/ibot_patch_loss.py`.

Everything is written over the GLOBAL batch. DINOv2 all-reduces the center and the Sinkhorn-Knopp sums
by hand and lets DDP average the per-rank losses; under `jax.jit` with the batch axis sharded, GSPMD
inserts the same all-reduces for the global sums and means below. Teacher-side outputs are wrapped in
`stop_gradient` (DINOv2 runs them under `torch.no_grad`). All maths is float32 whatever the input dtype.
The student-side cross-entropies over the prototypes go through one fused custom VJP
(soft_cross_entropy.py): row reductions forward, one elementwise pass backward, and the logits saved
as given instead of float32 log-probabilities, because (rows, 65,536) float32 arrays are the step's
largest.
"""

import numbers

import jax
import jax.numpy as jnp

from vtp_jax.losses.soft_cross_entropy import soft_cross_entropy


def _f32(x) -> jax.Array:
  return jnp.asarray(x).astype(jnp.float32)


def _safe_div(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """numerator / denominator, with 0 where the denominator is 0 (padded rows, an empty buffer)."""
  return numerator / jnp.where(denominator == 0, 1.0, denominator)


def _row_mask(name: str, valid, leading_shape: tuple[int, ...]) -> jax.Array:
  """A bool mask over the sample axes: True for real rows, False for padding of a fixed-size buffer."""
  if valid is None:
    return jnp.ones(leading_shape, bool)
  valid = jnp.asarray(valid)
  if valid.shape != leading_shape:
    raise ValueError(
        f'{name} has shape {valid.shape}; it must match the sample axes {leading_shape} of the '
        'logits (one entry per row: nonzero = a real token, 0 = padding).')
  return valid > 0


# ----------------------------------------------------------------------------------------------------
# Teacher normalisation.


def teacher_centering(teacher_logits: jax.Array, center: jax.Array, temp) -> jax.Array:
  """softmax((t - c) / temp) over prototypes: DINOv2 `softmax_center_teacher` (DINO and iBOT).

  Args:
    teacher_logits: (..., K) teacher head outputs.
    center: (1, K) running center (DINOv2 keeps (1, K) for DINO and (1, 1, K) for iBOT; both are a
      row vector broadcast over the samples, so one shape serves both here).
    temp: teacher temperature (a Python float or a traced scalar, see `teacher_temperature`).
  """
  k = teacher_logits.shape[-1]
  if center.shape != (1, k):
    raise ValueError(f'center has shape {center.shape}; expected (1, {k}) to match the last axis of '
                     f'teacher_logits {teacher_logits.shape}. Initialise it with jnp.zeros((1, K)).')
  logits = (_f32(teacher_logits) - _f32(center)) / _f32(temp)
  return jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1))


def update_center(center: jax.Array, teacher_logits: jax.Array, momentum: float = 0.9,
                  valid=None) -> jax.Array:
  """EMA of the batch-mean teacher logits: c <- m c + (1 - m) mean_batch(t), DINOv2 momentum 0.9.

  Use the center from BEFORE this update to normalise this step's teacher (DINOv2 applies the
  update lazily at the next `softmax_center_teacher` call).

  Args:
    center: (1, K) current center.
    teacher_logits: (..., K) raw teacher logits of this step (all leading axes are samples).
    momentum: center momentum m.
    valid: optional mask over the leading axes; rows where it is 0 (buffer padding) are excluded from
      the mean. DINOv2's iBOT center averages per-rank means of the real masked tokens; this is the
      mean over all real tokens of the global batch, the same when every rank holds as many.
  """
  k = teacher_logits.shape[-1]
  if center.shape != (1, k):
    raise ValueError(f'center has shape {center.shape}; expected (1, {k}) to match teacher_logits '
                     f'{teacher_logits.shape}.')
  logits = jax.lax.stop_gradient(_f32(teacher_logits))
  mask = _row_mask('valid', valid, logits.shape[:-1])[..., None]
  # `where`, not a product: padded rows may hold anything, and 0 * inf would poison the mean.
  masked = jnp.where(mask, logits, 0.0)
  sample_shape = masked.shape[:-1]
  # The sum over samples as a ones-vector product: XLA:CPU reduces over major axes far slower than
  # it runs this contraction (155 ms against 1.7 ms for a (2, 128, 65536) array, measured). No
  # reshape, so a sharded batch axis stays sharded and GSPMD all-reduces (K,) partial sums.
  total = jnp.tensordot(jnp.ones(sample_shape, jnp.float32), masked, axes=len(sample_shape),
                        precision=jax.lax.Precision.HIGHEST).reshape(1, k)
  count = jnp.sum(mask.astype(jnp.float32))
  batch_mean = _safe_div(total, count)
  return momentum * _f32(center) + (1.0 - momentum) * batch_mean


def sinkhorn_knopp(teacher_logits: jax.Array, temp, n_iterations: int = 3,
                   valid=None) -> jax.Array:
  """DINOv2 `sinkhorn_knopp_teacher` (and the iBOT masked-token variant when `valid` is given).

  DINOv2, with Q = exp(t / temp)^T of shape (K, B) and B the GLOBAL number of samples:
    Q /= sum(Q); repeat n_iterations: {Q /= row sums; Q /= K; Q /= column sums; Q /= B}; Q *= B.
  Rows are prototypes (each ends with mass 1/K), columns are samples (each ends summing to 1).
  Here the samples stay on the leading axes (no transpose): "row sums" reduce over the sample axes and
  "column sums" over the last axis. Sums over the sample axes are global, so GSPMD turns them into the
  all-reduces DINOv2 writes by hand; the per-sample reductions need no communication.

  The same steps run in the log domain (each division becomes subtracting a logsumexp), which gives
  DINOv2's numbers wherever its float32 exp neither overflows nor underflows, and stays finite where it
  would: t / 0.04 leaves float32 range for |t| > ~3.5, and a sample far below every prototype's best
  would get an all-zero column and a NaN target.

  `valid` (iBOT's fixed-size masked-token buffer): padded rows are excluded from every sum, B counts
  only real rows (DINOv2's all-reduced `n_masked_patches_tensor`), and padded rows come back as 0.

  Args:
    teacher_logits: (..., K) raw teacher logits; all leading axes are samples.
    temp: teacher temperature.
    n_iterations: Sinkhorn iterations (DINOv2: 3).
    valid: optional mask over the leading axes, nonzero for real rows (iBOT weights work as is).

  Returns:
    (..., K) float32 teacher targets; each real row sums to 1.
  """
  if n_iterations < 0:
    raise ValueError(f'n_iterations={n_iterations} must be >= 0 (DINOv2 uses 3).')
  scores = jax.lax.stop_gradient(_f32(teacher_logits)) / _f32(temp)
  sample_axes = tuple(range(scores.ndim - 1))
  mask = _row_mask('valid', valid, scores.shape[:-1])[..., None]
  log_n_prototypes = jnp.log(jnp.float32(scores.shape[-1]))
  # max(B, 1): an empty buffer then yields all-zero targets instead of NaN.
  log_n_samples = jnp.log(jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0))

  def log_normalizer(log_q, axis=None):
    # A fully padded row/column has logsumexp -inf; 0 leaves its -inf entries untouched (no -inf+inf).
    lse = jax.nn.logsumexp(log_q, axis=axis, keepdims=axis is not None)
    return jnp.where(jnp.isfinite(lse), lse, 0.0)

  log_q = jnp.where(mask, scores, -jnp.inf)
  log_q = log_q - log_normalizer(log_q)
  for _ in range(n_iterations):
    log_q = log_q - log_normalizer(log_q, sample_axes) - log_n_prototypes
    log_q = log_q - log_normalizer(log_q, -1) - log_n_samples
  q = jnp.where(mask, jnp.exp(log_q + log_n_samples), 0.0)
  return jax.lax.stop_gradient(q)


# ----------------------------------------------------------------------------------------------------
# Losses.


def _expect_3d(name: str, x: jax.Array) -> None:
  if x.ndim != 3:
    raise ValueError(f'{name} must be (n_crops, batch, prototypes); got shape {x.shape}.')


def _cross_entropy(student_logits: jax.Array, teacher_probs: jax.Array, student_temp) -> jax.Array:
  """-mean_b sum_k t * log_softmax(s / student_temp): one DINOv2 `DINOLoss.forward` term."""
  return jnp.mean(soft_cross_entropy(student_logits, teacher_probs, student_temp))


def dino_loss(student_global_logits: jax.Array, student_local_logits: jax.Array | None,
              teacher_probs: jax.Array,
              student_temp: float = 0.1) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DINO CLS-token loss with DINOv2's pairing and normalisation (ssl_meta_arch.forward_backward).

  With CE(s, t) = -mean_b sum_k t_bk log_softmax(s_b / student_temp)_k,
  n_g global crops and n_l local crops:
    denominator = n_g (n_g - 1) + max(n_l n_g, 1)          (= 2 + 2 n_l for n_g = 2, n_l > 0)
    local  = sum_{l < n_l} sum_{j < n_g} CE(s_local_l, t_j) / denominator
    global = sum_{i != j} CE(s_global_i, t_j) / denominator
    loss   = local + global
  DINOv2 computes the global term as one CE over the 2B stacked student crops against the teacher
  crops stacked in swapped order (a mean over 2B, i.e. half the pair sum), times `loss_scales` = 2,
  divided by the same denominator: exactly `global` above. Teacher crop i is never matched with
  student crop i. The `max(., 1)` is DINOv2's: with no local crops the global term is divided by
  n_g (n_g - 1) + 1 (= 3), not 2; kept as is so n_l = 0 runs match DINOv2.

  Args:
    student_global_logits: (n_g, B, K) student head logits of the global crops (n_g >= 2; DINOv2: 2).
    student_local_logits: (n_l, B, K) local-crop logits; n_l may be 0, or pass None.
    teacher_probs: (n_g, B, K) normalised teacher targets, teacher_probs[j] for global crop j in the
      SAME order as the student (the A<->B swap happens here, not in the caller).
    student_temp: student temperature (DINOv2: 0.1).

  Returns:
    (loss, {'dino_local': local, 'dino_global': global}).
  """
  _expect_3d('student_global_logits', student_global_logits)
  if teacher_probs.shape != student_global_logits.shape:
    raise ValueError(f'teacher_probs {teacher_probs.shape} must match student_global_logits '
                     f'{student_global_logits.shape}: one teacher target per global crop and sample.')
  n_global, batch, n_prototypes = student_global_logits.shape
  if n_global < 2:
    raise ValueError(f'student_global_logits has {n_global} global crop(s); DINO needs at least 2 '
                     '(a crop is never distilled from itself).')
  if student_local_logits is None:
    student_local_logits = jnp.zeros((0, batch, n_prototypes), jnp.float32)
  _expect_3d('student_local_logits', student_local_logits)
  if student_local_logits.shape[1:] != (batch, n_prototypes):
    raise ValueError(f'student_local_logits {student_local_logits.shape} must be (n_local, {batch}, '
                     f'{n_prototypes}) to pair with the global crops {student_global_logits.shape}.')
  n_local = student_local_logits.shape[0]

  denominator = n_global * (n_global - 1) + max(n_local * n_global, 1)
  teacher = jax.lax.stop_gradient(_f32(teacher_probs))
  # sum_j CE(s, t_j) = CE(s, sum_j t_j): one log-softmax pass per student crop, not one per pair.
  teacher_all = jnp.sum(teacher, axis=0)

  global_sum = 0.0
  for i in range(n_global):
    teacher_others = sum(teacher[j] for j in range(n_global) if j != i)
    global_sum += _cross_entropy(student_global_logits[i], teacher_others, student_temp)
  local_sum = 0.0
  for crop in range(n_local):
    local_sum += _cross_entropy(student_local_logits[crop], teacher_all, student_temp)

  local = jnp.asarray(local_sum, jnp.float32) / denominator
  global_ = jnp.asarray(global_sum, jnp.float32) / denominator
  return local + global_, {'dino_local': local, 'dino_global': global_}


def ibot_loss(student_patch_logits: jax.Array, teacher_patch_probs: jax.Array, weights: jax.Array,
              n_global_images: int, student_temp: float = 0.1, global_crops_scale: float = 2.0,
              ibot_loss_scale: float = 0.5) -> jax.Array:
  """iBOT masked-patch loss over a fixed-size buffer, DINOv2 `iBOTPatchLoss.forward_masked`.

    loss = -sum_m w_m sum_k t_mk log_softmax(s_m / student_temp)_k / n_global_images
           * global_crops_scale * ibot_loss_scale
  with w_m = 1 / (number of masked patches in token m's image) (DINOv2 `masks_weight`) and 0 for
  padding, so every masked image counts once whatever its mask size. DINOv2 divides by
  `student_masks_flat.shape[0]` = every global-crop image, masked or not (n_g * B), then multiplies by
  `loss_scales` = 2 ("global crops processed together") and `ibot_loss_scale` = 1 / n_g = 0.5: the
  two factors cancel for n_g = 2 and are exposed only so a different n_g can follow DINOv2's rule.

  Args:
    student_patch_logits: (M, K) student head logits of the masked-token buffer.
    teacher_patch_probs: (M, K) normalised teacher targets for the same tokens.
    weights: (M,) per-token weights; 0 marks padding (those rows may hold anything finite or not).
    n_global_images: number of global-crop images in the GLOBAL batch (n_g * B), a Python int.
    student_temp: student temperature (DINOv2: 0.1).
    global_crops_scale: DINOv2 `loss_scales` (2).
    ibot_loss_scale: DINOv2 `ibot_loss_scale` = 1 / n_global_crops (0.5).
  """
  if student_patch_logits.ndim != 2 or teacher_patch_probs.shape != student_patch_logits.shape:
    raise ValueError(f'student_patch_logits {student_patch_logits.shape} and teacher_patch_probs '
                     f'{teacher_patch_probs.shape} must both be (M, K), the masked-token buffer.')
  if weights.shape != student_patch_logits.shape[:1]:
    raise ValueError(f'weights has shape {weights.shape}; expected ({student_patch_logits.shape[0]},)'
                     ': one weight per buffer row, 0 for padding.')
  if isinstance(n_global_images, bool) or not isinstance(n_global_images, numbers.Integral) or (
      n_global_images <= 0):
    raise ValueError(f'n_global_images={n_global_images!r} must be a positive Python int (the number '
                     'of global-crop images in the global batch, n_global * B).')
  weights = jax.lax.stop_gradient(_f32(weights))
  teacher = jax.lax.stop_gradient(_f32(teacher_patch_probs))
  per_token = soft_cross_entropy(student_patch_logits, teacher, student_temp)
  # Padding rows are excluded by `where` rather than trusted to be finite (0 * nan = nan).
  weighted = jnp.where(weights > 0, weights * per_token, 0.0)
  return jnp.sum(weighted) / n_global_images * global_crops_scale * ibot_loss_scale


# ----------------------------------------------------------------------------------------------------
# Schedule and metric.


def teacher_temperature(step, *, warmup_steps: int, warmup_temp: float = 0.04,
                        final_temp: float = 0.07) -> jax.Array:
  """Teacher temperature at `step`: DINOv2's `np.linspace(warmup, final, warmup_steps)`, then constant.

  Step i < warmup_steps gets warmup + (final - warmup) * i / (warmup_steps - 1), so the last warm-up
  step already equals `final_temp` (linspace includes its end point). DINOv2: 0.04 -> 0.07 over
  30 "epochs" of 1250 iterations. `step` may be a Python int or a traced integer.
  """
  if warmup_steps <= 1:
    return jnp.asarray(final_temp, jnp.float32)
  fraction = jnp.clip(_f32(step) / (warmup_steps - 1), 0.0, 1.0)
  return jnp.asarray(warmup_temp, jnp.float32) + (final_temp - warmup_temp) * fraction


def teacher_entropy(probs: jax.Array, valid=None) -> jax.Array:
  """Mean over samples of -sum_k p log p (nats). Near 0: one prototype wins (collapse by sharpening);
  near log K: uniform targets (collapse by flattening). `valid` excludes padding rows."""
  p = jax.lax.stop_gradient(_f32(probs))
  per_sample = -jnp.sum(jax.scipy.special.xlogy(p, p), axis=-1)
  mask = _row_mask('valid', valid, per_sample.shape)
  return _safe_div(jnp.sum(jnp.where(mask, per_sample, 0.0)), jnp.sum(mask.astype(jnp.float32)))
