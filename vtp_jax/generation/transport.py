"""The flow-matching objective of LightningDiT (transport/ with path_type Linear, prediction
velocity, use_cosine_loss, use_lognorm), on normalised latents.

Direction (LightningDiT's ICPlan, as SiT): t = 0 is noise, t = 1 is data,

    x_t = t x1 + (1 - t) x0,   x0 ~ N(0, I) noise,  x1 a data latent,   u_t = x1 - x0,

and the network predicts the velocity u_t. Per example, over the latent's (h, w, C):

    mse = mean_{h,w,C} (v - u)^2
    cos = mean_{h,w} (1 - <v, u>_C / (max(|v|_C, eps) max(|u|_C, eps)))   (cosine over channels,
          torch.cosine_similarity(dim=1) on NCHW)
    loss = mean_batch(mse) + cosine_weight * mean_batch(cos)

Timesteps are logit-normal: t = sigmoid(mu + sigma n), n ~ N(0, 1) (LightningDiT draws (0, 1); VTP
sets (mu, sigma) per tokenizer size, spec 4.1). Labels are replaced by the null class with
probability `class_dropout` (classifier-free guidance training).
"""

import jax
import jax.numpy as jnp

COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's eps


def logit_normal(key, shape, mu: float, sigma: float):
  return jax.nn.sigmoid(mu + sigma * jax.random.normal(key, shape, jnp.float32))


def interpolate(t, x0, x1):
  """(x_t, u_t) of the linear path for per-example t (B,)."""
  tt = t.reshape((-1,) + (1,) * (x1.ndim - 1))
  return tt * x1 + (1.0 - tt) * x0, x1 - x0


def drop_labels(key, labels, null_class: int, rate: float):
  if rate <= 0:
    return labels
  drop = jax.random.uniform(key, labels.shape) < rate
  return jnp.where(drop, null_class, labels)


def _clamped_norm(x):
  """max(|x|, eps) over the last axis, with gradient 0 where |x| < eps (as torch's): the network's
  output is exactly 0 at init (zero output layer), where |x|'s own gradient is undefined."""
  return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1), COSINE_EPS ** 2))


def velocity_losses(pred, target):
  """Per-example (mse, cosine) terms of pred and target (B, h, w, C)."""
  pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
  axes = tuple(range(1, pred.ndim))
  mse = jnp.mean(jnp.square(pred - target), axis=axes)
  dot = jnp.sum(pred * target, axis=-1)
  norms = _clamped_norm(pred) * _clamped_norm(target)
  cos = jnp.mean(1.0 - dot / norms, axis=axes[:-1])
  return mse, cos


def draw(key, x1, labels, *, t_mu: float, t_sigma: float, null_class: int, class_dropout: float):
  """The step's random draws: noise x0, timesteps t (B,) and the labels after dropout."""
  k_noise, k_t, k_drop = jax.random.split(key, 3)
  x0 = jax.random.normal(k_noise, x1.shape, jnp.float32)
  t = logit_normal(k_t, (x1.shape[0],), t_mu, t_sigma)
  return x0, t, drop_labels(k_drop, labels, null_class, class_dropout)


def loss_at(apply_fn, params, x1, x0, t, y, cosine_weight: float):
  """(loss, metrics) for given draws; `apply_fn(params, x_t, t, y)` is the velocity network."""
  xt, ut = interpolate(t, x0, x1.astype(jnp.float32))
  mse, cos = velocity_losses(apply_fn(params, xt, t, y), ut)
  loss = jnp.mean(mse) + cosine_weight * jnp.mean(cos)
  return loss, {'mse': jnp.mean(mse), 'cos_loss': jnp.mean(cos), 't_mean': jnp.mean(t)}

