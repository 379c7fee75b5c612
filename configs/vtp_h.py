"""VTP-H: our extrapolation beyond the paper (which has no VTP-H): encoder 1280/32/20 (head dim 64),
pixel decoder 1024/24/16, text tower 1024/24/16, d=64. FSDP over 8+ devices is expected.
1289.98M params (released parts).

The encoder has 20 heads of 64 rather than 16 of 80: 64 is the head dim of every other VTP tower,
and TPU splash attention takes it where 80 is refused (kernels/splash_attention.py needs a multiple
of 64; Mosaic would pad 80 to 128 lanes), so `precision.attention='auto'` gets the fused kernel on
TPU as well as GPU (cuDNN takes either). Heads only split the qkv and output projections
differently (width x 3 x heads x head_dim is 1280 x 3 x 1280 either way, and the encoder has no
per-head-dim parameters: qk_norm is off), so the parameter count is that of 16 heads."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.encoder.update(width=1280, depth=32, heads=20)
  c.model.decoder.update(width=1024, depth=24, heads=16)
  c.model.text.update(width=1024, depth=24, heads=16)
  c.model.clip_dim = 1024
  # The pod plan (docs/scaling.md, 'Shipped configs'): FSDP over every device, blocks recomputed.
  c.mesh.update(data=1, fsdp=-1)
  c.precision.remat_policy = 'full'
  c.precision.scan_layers = True  # 24+ blocks: scanned, so compile time does not grow with depth
  return c
