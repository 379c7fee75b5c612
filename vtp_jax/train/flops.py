"""Analytic FLOPs of one train step, per branch, in MaxText's MFU convention.

A matmul of (m, k) by (k, n) costs 2 m k n. A trained module costs 3x its forward (forward, then
gradients for activations and weights); the EMA teacher and the frozen LPIPS network only run
forward (LPIPS also back-propagates to its input: counted as one more forward). Attention scores
and values cost 4 N^2 D per layer (halved under a causal mask). Elementwise work, norms, softmax
and the optimizer are not counted, as in MaxText. Rematerialisation is not counted either, so this
is model FLOPs (MFU), not hardware FLOPs (XLA's count in the benchmark includes remat).
"""

from vtp_jax import batch as batch_lib
from vtp_jax.models import layers

# VGG16 conv stack as LPIPS runs it: (output channels, input channels, spatial downsampling so far).
_VGG16 = [(64, 3, 1), (64, 64, 1), (128, 64, 2), (128, 128, 2), (256, 128, 4), (256, 256, 4),
          (256, 256, 4), (512, 256, 8), (512, 512, 8), (512, 512, 8), (512, 512, 16),
          (512, 512, 16), (512, 512, 16)]


def _tower(tower, n_tokens, causal=False, attention=True):
  spec = layers.BlockSpec(width=tower.width, heads=tower.heads, mlp=tower.get('mlp', 'gelu'),
                          mlp_ratio=tower.mlp_ratio)
  return tower.depth * layers.block_forward_flops(n_tokens, tower.width, spec.mlp_hidden, spec.mlp,
                                                 causal, attention)


def encoder_forward(config, image_side: int, bottleneck: bool = False,
                    attention: bool = True) -> float:
  m = config.model
  p, d = m.patch_size, m.encoder.width
  n_patches = (image_side // p) ** 2
  n_tokens = n_patches + 1 + m.encoder.n_registers
  flops = 2 * n_patches * (3 * p * p) * d + _tower(m.encoder, n_tokens, attention=attention)
  if bottleneck:
    flops += 2 * n_patches * d * m.bottleneck_dim
  return flops


def decoder_forward(config, image_side: int, attention: bool = True) -> float:
  m = config.model
  n = (image_side // m.patch_size) ** 2
  dd = m.decoder.width
  return (2 * n * m.bottleneck_dim * dd + _tower(m.decoder, n, attention=attention) +
          2 * n * dd * 3 * m.patch_size ** 2)


def text_forward(config) -> float:
  t = config.model.text
  return _tower(t, t.context_length, causal=t.causal) + 2 * t.width * config.model.clip_dim


def dino_head_forward(config, n_tokens: int) -> float:
  h, m = config.model.dino_head, config.model
  in_dim = m.encoder.width if m.bottleneck_ae_only else m.bottleneck_dim
  widths = [in_dim] + [h.hidden] * (h.nlayers - 1) + [h.bottleneck, h.prototypes]
  return n_tokens * sum(2 * a * b for a, b in zip(widths[:-1], widths[1:]))


def vgg16_forward(image_side: int) -> float:
  return sum(2 * (image_side // s) ** 2 * 9 * c_in * c_out for c_out, c_in, s in _VGG16)


def patch_discriminator_forward(config, image_side: int) -> float:
  """PatchGAN (models/discriminator.py): 4x4 convolutions, zero-padded by 1, stride 2 then 1."""
  g = config.gan
  side, c_in, flops = image_side, 3, 0.0
  widths = [(g.disc_channels, 2)]
  for i in range(1, g.disc_layers + 1):
    widths.append((g.disc_channels * min(2 ** i, 8), 2 if i < g.disc_layers else 1))
  widths.append((1, 1))
  for c_out, stride in widths:
    side = (side + 2 - 4) // stride + 1
    flops += 2 * side * side * 16 * c_in * c_out
    c_in = c_out
  return flops


def gan_stage_flops(config) -> dict:
  """{'rec', 'disc', 'total'} of one decoder GAN-stage step (train/gan_stage.py): the frozen encoder
  runs forward only, the decoder trains (3x), LPIPS and the generator's discriminator term
  back-propagate to the image (2x each), the discriminator trains on real and fake images (3x).
  Under `train.accum_steps > 1`, 'accum_cache' (beside 'total', as in `step_flops`) is the
  decoder forward the cache pass repeats."""
  d = config.data
  _, _, b_rec = batch_lib.sub_batch_sizes(config)
  side = d.image_size
  rec = b_rec * (encoder_forward(config, side, bottleneck=True) +
                 3 * decoder_forward(config, side) +
                 (2 * vgg16_forward(side) if config.loss.lpips_weight else 0.0))
  disc_pass = patch_discriminator_forward(config, side)
  disc = b_rec * (2 * disc_pass + 2 * 3 * disc_pass)
  out = {'rec': rec, 'disc': disc, 'total': rec + disc}
  if batch_lib.accum_steps(config) > 1:
    out['accum_cache'] = b_rec * decoder_forward(config, side)
  return out


def step_flops(config, mesh=None) -> dict:
  """{'clip', 'ssl', 'rec', 'total'}: analytic FLOPs of one stage-1 step over the global batch
  (the GAN stage's: `gan_stage_flops`; the generator's: generation/flops.py). With the step's
  mesh, the DINO head counts the iBOT buffer rows that mesh's per-device buffers hold (a few
  fewer than one global buffer).

  Under `train.accum_steps > 1`, 'accum_cache' is the forwards the cache pass repeats
  (train/accumulate.py): the CLIP image and text towers and, with KoLeo on, the student on the
  global crops. It is listed beside 'total', not in it: 'total' stays the model's FLOPs, so MFU
  counts the cache like rematerialisation, as work the hardware does and the model does not need."""
  d, m = config.data, config.model
  b, b_ssl, b_rec = batch_lib.sub_batch_sizes(config)
  branches = batch_lib.active_branches(config)
  k = batch_lib.accum_steps(config)
  out, cache = {}, 0.0
  if 'clip' in branches:
    image = encoder_forward(config, d.image_size) + 2 * m.encoder.width * m.clip_dim
    logits = 2 * 2 * b * b * m.clip_dim  # both directions' similarity matmuls
    out['clip'] = 3 * (b * (image + text_forward(config)) + logits)
    cache += b * (image + text_forward(config))
  if 'ssl' in branches:
    n_global = batch_lib.N_GLOBAL_CROPS * b_ssl
    n_local = d.n_local_crops * b_ssl
    groups = batch_lib.ibot_groups(config, mesh) if mesh is not None else 1
    buffer = k * groups * batch_lib.ibot_buffer_size(config, groups)
    student = (n_global * encoder_forward(config, d.global_crop_size) +
               n_local * encoder_forward(config, d.local_crop_size) +
               dino_head_forward(config, n_global + n_local + buffer))
    teacher = (n_global * encoder_forward(config, d.global_crop_size) +
               dino_head_forward(config, n_global + buffer))
    out['ssl'] = 3 * student + teacher
    if config.loss.koleo_weight:
      cache += n_global * encoder_forward(config, d.global_crop_size)
  if 'rec' in branches:
    autoencoder = (encoder_forward(config, d.image_size, bottleneck=True) +
                   decoder_forward(config, d.image_size))
    lpips = 3 * vgg16_forward(d.image_size) if config.loss.lpips_weight else 0.0
    out['rec'] = b_rec * (3 * autoencoder + lpips)
  out['total'] = sum(out.values())
  if k > 1:
    out['accum_cache'] = cache
  return out
