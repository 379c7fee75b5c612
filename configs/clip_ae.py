"""Ablation: CLIP + reconstruction, no self-supervision (paper Fig. 4). `:SIZE` picks the size."""

import importlib


def get_config(size: str = 'vtp_tiny'):
  c = importlib.import_module(f'configs.{size or "vtp_tiny"}').get_config()
  c.loss.ssl_weight = 0.0
  return c
