"""LightningDiT-B/1 on 16x16x64 latents (VTP's scaling studies, spec 4.1): D 768, 12 blocks,
12 heads, 130.4M parameters."""

from configs import dit_base


def get_config():
  return dit_base.get_config()
