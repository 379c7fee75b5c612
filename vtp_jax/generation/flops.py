"""Analytic FLOPs of one generator train step, in the convention of vtp_jax/train/flops.py
(2 m k n per matmul, trained modules 3x forward, attention 4 N^2 D per block, elementwise work and
the optimizer not counted). The EMA update is elementwise, so not counted either."""

from vtp_jax.generation import dit
from vtp_jax.models import layers


def forward(config) -> float:
  """Forward FLOPs of the LightningDiT on one latent."""
  d = config.dit
  spec = dit.block_spec(config)
  n = (d.input_size // d.patch_size) ** 2
  token_in = d.patch_size ** 2 * d.in_channels
  n_mod = 4 if d.wo_shift else 6
  conditioning = 2 * d.timestep_freqs * d.width + 2 * d.width * d.width  # timestep MLP
  per_block = (layers.block_forward_flops(n, d.width, spec.mlp_hidden, 'swiglu') +
               2 * d.width * n_mod * d.width)  # adaLN modulation, once per example
  final = 2 * d.width * 2 * d.width + 2 * n * d.width * token_in
  return 2 * n * token_in * d.width + conditioning + d.depth * per_block + final


def step_flops(config) -> dict:
  """{'dit', 'total'}: FLOPs of one train step over the global batch."""
  total = 3 * int(config.data.batch_size) * forward(config)
  return {'dit': total, 'total': total}
