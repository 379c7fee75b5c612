"""Adversarial losses for the stage-2 decoder fine-tune: hinge / non-saturating, adaptive weight, start.

This file owns the GAN terms on discriminator logits and the LDM `LPIPSWithDiscriminator` weighting
that VA-VAE/LightningDiT use ([R], spec section 2.4 stage 2; VTP's own GAN recipe is [?]). It takes
logits and gradient norms, never models: the caller computes the discriminator outputs and the
gradients of the NLL and generator losses w.r.t. the decoder's last layer.
"""

import jax
import jax.numpy as jnp


def _f32(x) -> jax.Array:
  return jnp.asarray(x).astype(jnp.float32)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """Discriminator hinge loss, LDM `hinge_d_loss`: 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(G)))."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - _f32(logits_real)))
                + jnp.mean(jax.nn.relu(1.0 + _f32(logits_fake))))


def non_saturating_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """Discriminator logistic loss, LDM `vanilla_d_loss`.

  0.5 (mean softplus(-D(x)) + mean softplus(D(G))), the non-saturating GAN's discriminator side.
  """
  return 0.5 * (jnp.mean(jax.nn.softplus(-_f32(logits_real)))
                + jnp.mean(jax.nn.softplus(_f32(logits_fake))))


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
  """Generator loss paired with the hinge discriminator in LDM: -mean D(G(z))."""
  return -jnp.mean(_f32(logits_fake))


def non_saturating_g_loss(logits_fake: jax.Array) -> jax.Array:
  """Non-saturating generator loss: mean softplus(-D(G(z))) = -mean log sigmoid(D(G(z)))."""
  return jnp.mean(jax.nn.softplus(-_f32(logits_fake)))


def adaptive_weight(nll_grad_norm: jax.Array, g_grad_norm: jax.Array,
                    max_weight: float = 1e4) -> jax.Array:
  """LDM `calculate_adaptive_weight` before its x disc_weight: ||grad nll|| / (||grad g|| + 1e-4).

  Clipped to [0, max_weight] and detached, so the generator term's gradient at the decoder's last
  layer is rescaled to the size of the reconstruction term's and the weight itself is not trained.
  The caller multiplies by `disc_weight` (VA-VAE/LDM: 0.5) and `gan_start_factor`.
  """
  weight = _f32(nll_grad_norm) / (_f32(g_grad_norm) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))


def gan_start_factor(step, start_step: int) -> jax.Array:
  """LDM `adopt_weight`: 0 before `start_step` (discriminator warm-up off), 1 from it on. jit-safe."""
  return jnp.where(jnp.asarray(step) >= start_step, 1.0, 0.0).astype(jnp.float32)
