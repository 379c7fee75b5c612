"""LightningDiT-XL/1 on 16x16x64 latents (VTP's headline generator, 675M): D 1152, 28 blocks,
16 heads.

The block stack is scanned (compile time flat in depth), as the tokenizer's large configs do.
"""

from configs import dit_base


def get_config():
  c = dit_base.get_config()
  c.dit.update(width=1152, depth=28, heads=16)
  c.flow.update(t_mu=-0.75, t_sigma=1.0)  # VTP's values for its L tokenizer [V]
  c.precision.scan_layers = True
  return c
