"""The PatchGAN discriminator of the stage-2 decoder fine-tune (spec 2.4 stage 2; [R] LDM/VA-VAE).

VTP's discriminator is unknown [?]. This is taming-transformers' `NLayerDiscriminator` as LDM's
`LPIPSWithDiscriminator` (and so VA-VAE/LightningDiT) builds it: a 4x4 stride-2 conv with LeakyReLU
0.2, `n_layers - 1` more stride-2 convs and one stride-1 conv, each widening by 2 (at most 8x
`channels`) and followed by batch normalisation, then a 4x4 stride-1 conv to one logit per patch.
Convolutions are zero-padded by 1, as in PyTorch.

Batch normalisation: LDM's discriminator is only ever run in training mode, so its BatchNorm always
normalises with the statistics of the batch in hand and its running averages are never read. Here the
norm does exactly that and keeps no running state, so the discriminator's variables are parameters
only and it stays a pure function. Under jit with a sharded batch, the statistics are over the global
batch (PyTorch DDP without SyncBatchNorm would use per-device statistics).
"""

import flax.linen as nn
import jax.numpy as jnp

_INIT = nn.initializers.normal(0.02)  # taming `weights_init`: conv N(0, 0.02)


def _scale_init(key, shape, dtype=jnp.float32):
  """taming `weights_init` for norm layers: scale N(1, 0.02), bias 0."""
  return 1.0 + _INIT(key, shape, dtype)


class BatchStatNorm(nn.Module):
  """Batch normalisation in training mode without running statistics: per-channel over (B, H, W)."""
  eps: float = 1e-5  # torch BatchNorm2d default

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    scale = self.param('scale', _scale_init, (channels,))
    bias = self.param('bias', nn.initializers.zeros, (channels,))
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))  # biased, as torch normalises
    return ((x32 - mean) * (scale / jnp.sqrt(var + self.eps)) + bias).astype(x.dtype)


class PatchDiscriminator(nn.Module):
  """(B, H, W, 3) images in [-1, 1] -> (B, h, w) patch logits (real > 0 under the hinge loss)."""
  channels: int = 64
  n_layers: int = 3
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, images):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'the discriminator takes (B, H, W, 3) images; got shape {images.shape}.')
    dtype = jnp.dtype(self.dtype)

    def conv(features, stride, bias, name):
      return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                     use_bias=bias, kernel_init=_INIT, dtype=dtype, name=name)

    x = images.astype(dtype)
    x = nn.leaky_relu(conv(self.channels, 2, True, 'conv_in')(x), 0.2)
    width = 1
    for i in range(1, self.n_layers + 1):
      width = min(2 ** i, 8)
      stride = 2 if i < self.n_layers else 1
      # Biases are off where a norm follows (taming: use_bias = norm is not BatchNorm).
      x = conv(self.channels * width, stride, False, f'conv_{i}')(x)
      x = nn.leaky_relu(BatchStatNorm(name=f'norm_{i}')(x), 0.2)
    logits = conv(1, 1, True, 'conv_out')(x)
    return logits[..., 0].astype(jnp.float32)
