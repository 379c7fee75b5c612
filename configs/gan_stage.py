"""Turns a stage-1 config into the decoder GAN stage (spec 2.4 stage 2): encoder and bottleneck
frozen, the pixel decoder trained with L1 + LPIPS + a PatchGAN, every image of the batch reconstructed.

Start it from a stage-1 run: `--config.train.init_from=WORKDIR_OR_CHECKPOINT`.
"""


def to_gan_stage(c, steps: int):
  c.gan.enabled = True
  c.loss.update(clip_weight=0.0, ssl_weight=0.0)
  c.data.rec_batch_fraction = 1.0
  c.train.steps = steps
  return c
