"""The paper's reconstruction-only autoencoder baseline (no CLIP, no SSL): every image of the batch
is reconstructed (L1 + LPIPS). `--config=configs/ae_baseline.py:vtp_s` picks the size (default tiny).
"""

import importlib


def get_config(size: str = 'vtp_tiny'):
  c = importlib.import_module(f'configs.{size or "vtp_tiny"}').get_config()
  c.loss.update(clip_weight=0.0, ssl_weight=0.0)
  c.data.rec_batch_fraction = 1.0
  return c
