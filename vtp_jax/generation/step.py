"""The generator's train step: flow-matching loss (transport.py), AdamW, EMA of the weights, in one
jitted, sharded function with the state donated. `make_train_step(config, mesh, shardings, tx)` goes
through train/step.py's `jit_step` (explicit shardings, compiler options, nan_policy)."""

import jax
import optax

from vtp_jax.generation import batch as gen_batch
from vtp_jax.generation import dit
from vtp_jax.generation import transport
from vtp_jax.train import accumulate
from vtp_jax.train import schedules
from vtp_jax.train import step as step_lib


class GenStep:
  """(state, batch, frozen) -> (state, metrics); `frozen` is {} (no frozen networks)."""

  def __init__(self, config, tx):
    self.config = config
    self.model = dit.build(config)
    self.tx = tx
    self.lr = schedules.lr_schedule(config.optim, int(config.train.steps),
                                    int(config.data.batch_size))

  def velocity(self, params, x, t, y):
    return self.model.apply({'params': params}, x, t, y)

  def __call__(self, state, batch, frozen):
    del frozen
    c, d = self.config, self.config.dit
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    data = batch[gen_batch.BRANCH]

    # The whole batch's draws (noise, t, label dropout) first, so that micro-batches of
    # train.accum_steps see the draws of the un-accumulated step; the flow loss is a mean over
    # latents, so it accumulates plainly.
    x0, t, y = transport.draw(key, data['latent'], data['label'], t_mu=float(c.flow.t_mu),
                              t_sigma=float(c.flow.t_sigma), null_class=int(d.num_classes),
                              class_dropout=float(d.class_dropout))
    k = accumulate.accum_steps(c)

    def grads_of(xs, params=state.params):
      x1, x0, t, y = xs
      (loss, metrics), grads = jax.value_and_grad(transport.loss_at, argnums=1, has_aux=True)(
          self.velocity, params, x1, x0, t, y, float(c.flow.cosine_weight))
      return jax.tree.map(lambda g: g / k, grads), {'loss': loss, **metrics}

    xs = (data['latent'], x0, t, y)
    if k == 1:
      grads, metrics = grads_of(xs)
    else:
      grads, stacked = accumulate.grads_and_stacked(
          grads_of, accumulate.zeros_like(state.params), accumulate.split(xs, k))
      metrics = accumulate.mean_metrics(stacked)
    loss = metrics.pop('loss')
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = float(c.flow.ema_decay)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
    metrics.update(loss=loss, grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                   update_norm=optax.tree.norm(updates), lr=self.lr(state.step))
    return state.replace(step=state.step + 1, params=params, ema=ema, opt_state=opt_state), metrics


def make_train_step(config, mesh, state_shardings, tx):
  """The jitted generator step `(state, batch, frozen) -> (state, metrics)`, state donated."""
  gen_batch.check_divisible(config, mesh)
  return step_lib.jit_step(GenStep(config, tx), config, mesh, state_shardings,
                           gen_batch.batch_shardings(config, mesh), frozen_abstract={})
