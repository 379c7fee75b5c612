"""VTP-B: encoder and pixel decoder 768/12/12, text tower 768/12/12, d=64 (spec 1.2). 295.64M params.

The base config already holds VTP-B's architecture (the reference `VTPConfig` defaults)."""

from configs import base


def get_config():
  c = base.get_config()
  # The pod plan (docs/scaling.md, 'Shipped configs'): FSDP over every device, blocks recomputed.
  c.mesh.update(data=1, fsdp=-1)
  c.precision.remat_policy = 'full'
  return c
