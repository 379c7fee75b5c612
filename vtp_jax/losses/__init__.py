"""Loss functions of vtp-jax: pure functions from model outputs to float32 scalars.

One file per concern: clip.py (CLIP / SigLIP), dino.py (DINO, iBOT, centering, Sinkhorn-Knopp,
teacher temperature), koleo.py, recon.py (L1 + LPIPS), gan.py (stage-2 adversarial terms).
This package imports neither `data/` nor `train/`.
"""

from vtp_jax.losses.clip import clamp_logit_scale
from vtp_jax.losses.clip import clip_sigmoid_loss
from vtp_jax.losses.clip import clip_softmax_loss
from vtp_jax.losses.clip import l2_normalize
from vtp_jax.losses.dino import dino_loss
from vtp_jax.losses.dino import ibot_loss
from vtp_jax.losses.dino import sinkhorn_knopp
from vtp_jax.losses.dino import teacher_centering
from vtp_jax.losses.dino import teacher_entropy
from vtp_jax.losses.dino import teacher_temperature
from vtp_jax.losses.dino import update_center
from vtp_jax.losses.gan import adaptive_weight
from vtp_jax.losses.gan import gan_start_factor
from vtp_jax.losses.gan import hinge_d_loss
from vtp_jax.losses.gan import hinge_g_loss
from vtp_jax.losses.gan import non_saturating_d_loss
from vtp_jax.losses.gan import non_saturating_g_loss
from vtp_jax.losses.koleo import koleo_loss
from vtp_jax.losses.koleo import koleo_loss_global_crops
from vtp_jax.losses.recon import denormalize_imagenet
from vtp_jax.losses.recon import l1_loss
from vtp_jax.losses.recon import load_lpips_params
from vtp_jax.losses.recon import lpips
from vtp_jax.losses.recon import lpips_weights_path
from vtp_jax.losses.recon import reconstruction_loss
from vtp_jax.losses.recon import to_lpips_range

__all__ = [
    'adaptive_weight', 'clamp_logit_scale', 'clip_sigmoid_loss', 'clip_softmax_loss',
    'denormalize_imagenet', 'dino_loss', 'gan_start_factor', 'hinge_d_loss', 'hinge_g_loss',
    'ibot_loss', 'koleo_loss', 'koleo_loss_global_crops', 'l1_loss', 'l2_normalize',
    'load_lpips_params', 'lpips', 'lpips_weights_path', 'non_saturating_d_loss',
    'non_saturating_g_loss', 'reconstruction_loss', 'sinkhorn_knopp', 'teacher_centering',
    'teacher_entropy', 'teacher_temperature', 'to_lpips_range', 'update_center',
]
