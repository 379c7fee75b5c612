"""Every key of the downstream generator (LightningDiT on tokenizer latents, spec 4.1 "Generation").

`configs/dit_{tiny,b,xl}.py` start from `get_config()` here. It is the tokenizer's `configs/base.py`
(so the driver's sections `train`, `mesh`, `precision`, `data` loader keys exist) with `task =
'generation'` and four sections of its own: `dit` (architecture), `flow` (objective), `sample`
(ODE sampling) and `latents` (the exported latents). Tags as in base.py; [L] = LightningDiT's code
or config (hustvl/LightningDiT), [V] = VTP's generation setup (spec 4.1).
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.task = 'generation'  # the driver trains the generator (vtp_jax/generation/) instead of VTP

  c.dit = ml_collections.ConfigDict()  # defaults: LightningDiT-B/1 [L]
  c.dit.input_size = 16  # latent side h = w (image side / 16; 256 px -> 16) [V]
  c.dit.in_channels = 64  # latent channels d of the tokenizer [V]
  c.dit.patch_size = 1  # latent pixels per token side; /1 models [V]
  c.dit.width = 768  # hidden size D [L B/1]
  c.dit.depth = 12  # blocks [L B/1]
  c.dit.heads = 12  # attention heads [L B/1]
  c.dit.mlp_ratio = 4.0  # SwiGLU hidden = int(2/3 * ratio * D) (rounded up to 8) [L]
  c.dit.num_classes = 1000  # conditioning classes; one extra null row for CFG [L]
  c.dit.class_dropout = 0.1  # label dropout (-> null class) in training, for CFG [L]
  c.dit.wo_shift = False  # adaLN without the shift terms (4 instead of 6 modulations) [L config]
  c.dit.qk_norm = False  # RMSNorm on q and k [L config, V]
  c.dit.norm_eps = 1e-6  # RMSNorm epsilon [L]
  c.dit.rope_base = 10000.0  # RoPE theta; 2-D axial, head_dim/4 frequencies per axis [L]
  c.dit.timestep_freqs = 256  # sinusoidal timestep features before the MLP [L]

  c.flow = ml_collections.ConfigDict()
  c.flow.t_mu = -0.5  # logit-normal timestep mean (V: -0.5 for S/B, -0.75 for L) [V]
  c.flow.t_sigma = 1.25  # logit-normal timestep std (V: 1.25 for S/B, 1.0 for L) [V]
  c.flow.cosine_weight = 1.0  # weight of LightningDiT's (1 - cos) velocity term; 0 = MSE only [L]
  c.flow.ema_decay = 0.9999  # EMA of the weights, updated every step [L][V]

  c.sample = ml_collections.ConfigDict()
  c.sample.solver = 'euler'  # 'euler' or 'heun' fixed-grid ODE solver [L: euler]
  c.sample.steps = 250  # time-grid points (num_sampling_steps), steps - 1 updates [V]
  c.sample.timestep_shift = 0.3  # t -> s t / (1 + (s - 1) t); 0 or 1 = no shift [L] (V: 0.075)
  c.sample.cfg_scale = 1.0  # classifier-free guidance; 1 = conditional only [V]
  c.sample.cfg_interval_start = 0.11  # guidance only where t >= this (t = 1 is data) [L]
  c.sample.cfg_channels = 0  # channels guided: 0 = all; 3 = LightningDiT's forward_with_cfg [L]
  c.sample.batch_size = 64  # latents per sampling call (the last call is padded)
  c.sample.seed = 0  # noise and label draws of sampling

  c.latents = ml_collections.ConfigDict()
  c.latents.source = ''  # arrayrecord:GLOB of `python -m vtp_jax.tools.export_latents` files
  c.latents.stats = ''  # latents_stats.npz ('mean', 'std'); '' = the one beside the first file
  c.latents.flip = True  # draw the plain or the flipped latent with probability 1/2 [L]
  c.latents.multiplier = 1.0  # z_norm = (z - mean) / std * multiplier [L]

  # The driver's shared sections, set for LightningDiT's recipe [L][V].
  c.data.batch_size = 1024  # global batch [V]
  c.data.source = 'latents'  # unused by the generator (it reads latents.source); kept non-empty
  c.optim.update(lr=2e-4, lr_scaling='none', warmup_steps=0, schedule='constant', final_lr=0.0,
                 b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_grad_norm=0.0)  # [V]
  c.train.steps = 100000  # 100k steps ~ 80 ImageNet epochs at batch 1024 [V]
  c.train.image_log_every = 0  # no reconstruction grid: the generator has no decoder of its own
  c.evals.tasks = ''  # generation is evaluated by `python -m vtp_jax.eval --task=generation`
  c.precision.rope_dtype = 'float32'  # LightningDiT's RoPE tables are float32 [L]
  return c
