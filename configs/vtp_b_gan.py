"""The decoder GAN stage at vtp_b size; start from stage 1 with --config.train.init_from=DIR."""

from configs import gan_stage, vtp_b


def get_config():
  return gan_stage.to_gan_stage(vtp_b.get_config(), steps=50000)
