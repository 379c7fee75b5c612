"""Stage 2: the pixel decoder fine-tuned against a PatchGAN, encoder and bottleneck frozen (spec 2.4).

The paper says only that the tokenizer is frozen and the decoder is trained with a GAN objective; the
recipe here is LDM's `LPIPSWithDiscriminator` as VA-VAE/LightningDiT use it [R]:

  decoder:        L_G = l1 * L1 + lpips * LPIPS + f(step) * w * disc_weight * g_loss(D(x_hat))
  discriminator:  L_D = f(step) * d_loss(D(x), D(sg(x_hat)))

with f the start factor (0 before `gan.start_step`) and w the adaptive weight
||grad_last L_nll|| / ||grad_last g_loss|| at the decoder's last layer. The decoder's gradient is
linear in the cotangent its output receives, so both last-layer gradients and the full update come
from one decoder forward and two applications of its VJP, never from a second forward pass.
Under `train.accum_steps > 1` the discriminator still sees the whole batch (its batch norm
couples the images) and the decoder runs per micro-batch, its forward repeated once
(`accumulated_gradients`).

State: the same TrainState as stage 1. `params` holds the whole model (stage-1 weights arrive through
`train.init_from`); `opt_state` covers `params['decoder']` only; `teacher` and `loss_state` are empty
(no SSL here); `disc` is {'params', 'opt_state'} of the discriminator.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from vtp_jax import batch as batch_lib
from vtp_jax import losses
from vtp_jax import pixels
from vtp_jax import sharding
from vtp_jax.models import discriminator as disc_lib
from vtp_jax.models import vtp
from vtp_jax.train import accumulate
from vtp_jax.train import state as state_lib
from vtp_jax.train import step as step_lib

_LOSSES = {'hinge': (losses.hinge_d_loss, losses.hinge_g_loss),
           'non_saturating': (losses.non_saturating_d_loss, losses.non_saturating_g_loss)}


def check_config(config) -> None:
  """The GAN stage trains the decoder on the reconstruction batch alone."""
  g = config.gan
  if batch_lib.active_branches(config) != ('rec',):
    raise ValueError('The decoder GAN stage trains the decoder only: set loss.clip_weight=0 and '
                     'loss.ssl_weight=0 (configs/vtp_*_gan.py do).')
  if g.loss not in _LOSSES:
    raise ValueError(f'gan.loss={g.loss!r} is not one of {tuple(_LOSSES)}.')
  if g.lr <= 0 or g.disc_lr <= 0:
    raise ValueError(f'gan.lr={g.lr} and gan.disc_lr={g.disc_lr} must be positive.')


def build_discriminator(config) -> disc_lib.PatchDiscriminator:
  g = config.gan
  return disc_lib.PatchDiscriminator(channels=g.disc_channels, n_layers=g.disc_layers,
                                     dtype=config.precision.compute_dtype)


def _lr(peak: float, warmup: int):
  return optax.linear_schedule(0.0, peak, max(warmup, 1)) if warmup else optax.constant_schedule(peak)


def decoder_optimizer(config) -> optax.GradientTransformation:
  """Adam(W) on the decoder: LDM trains both GAN players with Adam, betas (0.5, 0.9) [R]."""
  g = config.gan
  parts = [optax.clip_by_global_norm(g.clip_grad_norm)] if g.clip_grad_norm else []
  parts.append(optax.adamw(_lr(g.lr, g.warmup_steps), b1=g.b1, b2=g.b2,
                           weight_decay=g.weight_decay))
  return optax.chain(*parts)


def disc_optimizer(config) -> optax.GradientTransformation:
  g = config.gan
  return optax.adam(_lr(g.disc_lr, g.warmup_steps), b1=g.b1, b2=g.b2)


def create(config, mesh, rng_seed: int | None = None, *, abstract: bool = False):
  """(state, state_shardings, decoder optimizer) for stage 2, initialised into its shards
  (`abstract=True`: ShapeDtypeStructs with their shardings, as `state.create`)."""
  check_config(config)
  seed = config.seed if rng_seed is None else rng_seed
  rules = sharding.rules_from_config(config)
  init_params, param_shardings, _ = state_lib.param_init(config, mesh)
  tx, disc_tx = decoder_optimizer(config), disc_optimizer(config)
  disc = build_discriminator(config)
  side = config.data.image_size

  def init_state(key):
    param_key, state_key, disc_key = jax.random.split(key, 3)
    params = nn.unbox(init_params(param_key))
    disc_params = disc.init(disc_key, jnp.zeros((1, side, side, 3), jnp.float32))['params']
    return state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params['decoder']),
        teacher={}, loss_state={}, rng=jax.random.key_data(state_key),
        disc={'params': disc_params, 'opt_state': disc_tx.init(disc_params)})

  replicated = NamedSharding(mesh, P())
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_state = jax.eval_shape(init_state, state_lib.abstract_key())
    shardings = state_lib.TrainState(
        step=replicated, params=param_shardings,
        opt_state=state_lib.opt_state_shardings(abstract_state.opt_state,
                                                param_shardings['decoder'], mesh),
        teacher={}, loss_state={}, rng=replicated,
        # The discriminator is a few MB of convolutions: replicated, batch-parallel under GSPMD.
        disc=jax.tree.map(lambda _: replicated, abstract_state.disc))
  if abstract:
    return sharding.with_shardings(abstract_state, shardings), shardings, tx
  key = jax.random.key(seed)  # outside the mesh context, as in state.create
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(init_state, out_shardings=shardings)(key)
  return state, shardings, tx


def _to_lpips_range(x):
  """Model space -> [-1, 1]: the range LPIPS and the discriminator see."""
  return losses.to_lpips_range(losses.denormalize_imagenet(x))


class GanStep:
  """The stage-2 step `(state, batch, frozen) -> (state, metrics)`; batch holds 'rec' only."""

  def __init__(self, config, tx):
    check_config(config)
    self.config = config
    self.model = vtp.build(config)
    self.disc = build_discriminator(config)
    self.tx = tx
    self.disc_tx = disc_optimizer(config)
    self.d_loss_fn, self.g_loss_fn = _LOSSES[config.gan.loss]

  def latents(self, params, target):
    """The frozen tokenizer's latents of images in model space (no gradient reaches the encoder or
    bottleneck, and no drop path)."""
    m = self.model
    return jax.lax.stop_gradient(m.apply({'params': params}, target, method=m.latents))

  def decoder_fn(self, params, latents):
    m = self.model
    return lambda decoder: m.apply({'params': {**params, 'decoder': decoder}}, latents,
                                   method=m.decode)

  def discriminator_terms(self, disc_params, factor, target, pred):
    """Over one batch of real and reconstructed images: the generator GAN term's gradient for the
    reconstructions, the discriminator's gradient, and their metrics. The discriminator's batch
    norm takes its statistics over what it is given, so the accumulated step gives it the whole
    batch."""
    def g_fn(x):
      return self.g_loss_fn(self.disc.apply({'params': disc_params}, _to_lpips_range(x)))

    g_loss, d_g = jax.value_and_grad(g_fn)(pred)
    real = _to_lpips_range(target)
    fake = jax.lax.stop_gradient(_to_lpips_range(pred))

    def d_fn(dp):
      logits_real = self.disc.apply({'params': dp}, real)
      logits_fake = self.disc.apply({'params': dp}, fake)
      return factor * self.d_loss_fn(logits_real, logits_fake), (logits_real, logits_fake)

    (d_loss, (logits_real, logits_fake)), d_grads = jax.value_and_grad(d_fn, has_aux=True)(
        disc_params)
    metrics = dict(g_loss=g_loss, d_loss=d_loss, logits_real=jnp.mean(logits_real),
                   logits_fake=jnp.mean(logits_fake))
    return d_g, d_grads, metrics

  def nll(self, pred, target, frozen):
    """(L1 + LPIPS of the batch, its metrics), and its gradient for the reconstructions."""
    c = self.config

    def nll_fn(x):
      return losses.reconstruction_loss(x, target, frozen.get('lpips'), c.loss.l1_weight,
                                        c.loss.lpips_weight, c.loss.l1_space)

    (nll, rec_metrics), d_nll = jax.value_and_grad(nll_fn, has_aux=True)(pred)
    return dict(rec=nll, **rec_metrics), d_nll

  def gradients(self, params, disc_params, factor, target, frozen):
    """Of images in model space: the decoder's gradients of the NLL and of the generator's GAN
    term, the discriminator's gradient, and the metrics (each a mean over images), from one
    decoder forward."""
    pred, decoder_vjp = jax.vjp(self.decoder_fn(params, self.latents(params, target)),
                                params['decoder'])
    d_g, d_grads, metrics = self.discriminator_terms(disc_params, factor, target, pred)
    rec_metrics, d_nll = self.nll(pred, target, frozen)
    (grad_nll,), (grad_g,) = decoder_vjp(d_nll), decoder_vjp(d_g)
    return (grad_nll, grad_g, d_grads), {**rec_metrics, **metrics}

  def accumulated_gradients(self, params, disc_params, factor, images, frozen, k):
    """`gradients` over k micro-batches (GradCache for the discriminator, docs/scaling.md,
    'Gradient accumulation'): a pass without gradient caches every micro-batch's latents and
    reconstruction; the discriminator runs once over the whole batch (its batch statistics couple
    the images), giving the GAN term's gradient for each reconstruction; each micro-batch's decoder
    then runs again, its VJP taking that cached cotangent and the NLL's. The micro-batches are
    normalised from the raw images in each pass: a cached float copy of the batch would cost more
    memory (1.5 GiB a GPU for `vtp_h_gan` on h200-8) than normalising costs time."""
    def cache_pass(_, x):
      latents = self.latents(params, pixels.normalize_on_device(x))
      return None, jax.lax.stop_gradient((latents, self.decoder_fn(params, latents)(
          params['decoder'])))

    micro_images = accumulate.split(images, k)
    _, (latents, preds) = jax.lax.scan(cache_pass, None, micro_images)
    target = pixels.normalize_on_device(images)
    d_g, d_grads, gan_metrics = self.discriminator_terms(disc_params, factor, target,
                                                         accumulate.merge(preds))

    def micro_grads(xs):
      x, z, cotangent = xs
      target = pixels.normalize_on_device(x)
      pred, decoder_vjp = jax.vjp(self.decoder_fn(params, z), params['decoder'])
      rec_metrics, d_nll = self.nll(pred, target, frozen)
      (grad_nll,), (grad_g,) = decoder_vjp(d_nll), decoder_vjp(cotangent)
      return (jax.tree.map(lambda t: t / k, grad_nll), grad_g), rec_metrics

    zeros = accumulate.zeros_like((params['decoder'], params['decoder']))
    (grad_nll, grad_g), stacked = accumulate.grads_and_stacked(
        micro_grads, zeros, (micro_images, latents, accumulate.split(d_g, k)))
    return (grad_nll, grad_g, d_grads), {**accumulate.mean_metrics(stacked), **gan_metrics}

  def __call__(self, state, batch, frozen):
    c, g = self.config, self.config.gan
    params, disc_params = state.params, state.disc['params']
    factor = losses.gan_start_factor(state.step, g.start_step)
    images = batch['rec']['image']
    k = accumulate.accum_steps(c)
    if k == 1:
      (grad_nll, grad_g, d_grads), metrics = self.gradients(
          params, disc_params, factor, pixels.normalize_on_device(images), frozen)
    else:
      (grad_nll, grad_g, d_grads), metrics = self.accumulated_gradients(
          params, disc_params, factor, images, frozen, k)
    # The adaptive weight from the whole batch's last-layer gradients, at every k.
    last = lambda t: t['proj_out']['kernel']  # noqa: E731  (the decoder's last layer, as LDM)
    weight = g.disc_weight * losses.adaptive_weight(
        jnp.linalg.norm(last(grad_nll)), jnp.linalg.norm(last(grad_g)), g.max_adaptive_weight)
    grads = jax.tree.map(lambda a, b: a + factor * weight * b, grad_nll, grad_g)
    updates, opt_state = self.tx.update(grads, state.opt_state, params['decoder'])
    decoder = optax.apply_updates(params['decoder'], updates)
    d_updates, d_opt_state = self.disc_tx.update(d_grads, state.disc['opt_state'], disc_params)
    new_disc = {'params': optax.apply_updates(disc_params, d_updates), 'opt_state': d_opt_state}

    metrics.update(
        loss=metrics['rec'] + factor * weight * metrics['g_loss'], adaptive_weight=weight,
        disc_factor=factor, grad_norm=optax.tree.norm(grads),
        disc_grad_norm=optax.tree.norm(d_grads), param_norm=optax.tree.norm(decoder),
        update_norm=optax.tree.norm(updates), lr=_lr(g.lr, g.warmup_steps)(state.step))
    new_state = state.replace(step=state.step + 1, params={**params, 'decoder': decoder},
                              opt_state=opt_state, disc=new_disc)
    return new_state, metrics


def make_train_step(config, mesh, state_shardings, tx):
  """The jitted stage-2 step `(state, batch, frozen) -> (state, metrics)`, state donated."""
  batch_lib.check_divisible(config, mesh)
  return step_lib.jit_step(GanStep(config, tx), config, mesh, state_shardings,
                           batch_lib.batch_shardings(config, mesh),
                           step_lib.frozen_inputs_abstract(config))
