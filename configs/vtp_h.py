"""VTP-H: our extrapolation beyond the paper (which has no VTP-H): encoder 1280/32/16 (head dim 80),
pixel decoder 1024/24/16, text tower 1024/24/16, d=64. FSDP over 8+ devices is expected."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.encoder.update(width=1280, depth=32, heads=16)
  c.model.decoder.update(width=1024, depth=24, heads=16)
  c.model.text.update(width=1024, depth=24, heads=16)
  c.model.clip_dim = 1024
  c.mesh.update(data=-1, fsdp=8)
  c.precision.remat_policy = 'dots_no_batch'
  c.precision.scan_layers = True  # 24+ blocks: scanned, so compile time does not grow with depth
  return c
