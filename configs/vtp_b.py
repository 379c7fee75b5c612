"""VTP-B: encoder and pixel decoder 768/12/12, text tower 768/12/12, d=64 (spec 1.2). 295.64M params.

The base config already holds VTP-B's architecture (the reference `VTPConfig` defaults)."""

from configs import base


def get_config():
  return base.get_config()
