"""VTP-L: encoder and pixel decoder 1024/24/16, text tower 768/12/12, d=64 ([HF] config.json).
731.57M params."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.encoder.update(width=1024, depth=24, heads=16)
  c.model.decoder.update(width=1024, depth=24, heads=16)
  c.precision.scan_layers = True  # 24+ blocks: scanned, so compile time does not grow with depth
  # The pod plan (docs/scaling.md, 'Shipped configs'): FSDP over every device, blocks recomputed.
  c.mesh.update(data=1, fsdp=-1)
  c.precision.remat_policy = 'full'
  return c
