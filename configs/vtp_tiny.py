"""VTP-tiny: a few-minute model for 2 CPU cores (the README demo and the test suite).

Encoder 128/4/4, decoder 128/2/4, text 128/2/4 over 32 tokens, d=64, a small DINO head, 64 px images.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.encoder.update(width=128, depth=4, heads=4)
  c.model.decoder.update(width=128, depth=2, heads=4)
  c.model.text.update(width=128, depth=2, heads=4, context_length=32)
  c.model.clip_dim = 128
  c.model.dino_head.update(hidden=256, bottleneck=64, prototypes=1024)
  c.data.image_size = 64
  c.precision.compute_dtype = 'float32'
  return c
