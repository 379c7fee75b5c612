"""VTP-S: encoder and pixel decoder 384/12/6, text tower 768/12/12, d=64 (spec 1.2). 167.18M params."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.encoder.update(width=384, depth=12, heads=6)
  c.model.decoder.update(width=384, depth=12, heads=6)
  # The pod plan (docs/scaling.md, 'Shipped configs'): FSDP over every device, blocks recomputed.
  c.mesh.update(data=1, fsdp=-1)
  c.precision.remat_policy = 'full'
  return c
