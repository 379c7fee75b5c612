"""Step-indexed schedules: learning rate, weight decay and teacher EMA momentum.

This file owns every quantity that changes with the training step, plus the batch-size rule for the
peak learning rate. The pure functions (`warmup_cosine`, `cosine`) take an int step (Python int or a
traced int32) and return a float32 jnp scalar, so they are jit-safe; the `*_schedule(cfg, ...)`
builders close over config values and return one-argument callables that double as optax schedules.

Reference defaults are DINOv2's (spec section 3, all [R]); VTP's own values are unknown [?].
"""

import math
from typing import Callable

import jax.numpy as jnp
import ml_collections

Schedule = Callable[[jnp.ndarray | int], jnp.ndarray]

LR_SCALINGS = ('sqrt', 'linear', 'none')
LR_DECAYS = ('cosine', 'constant')


def peak_lr(base_lr: float, global_batch: int, scaling: str = 'sqrt',
            reference_batch: int = 1024) -> float:
  """The peak learning rate for `global_batch` given `base_lr` at `reference_batch`.

  DINOv2 scales as base * sqrt(B / 1024) ('sqrt_wrt_1024'); 'linear' is the Goyal et al. rule;
  'none' returns `base_lr` unchanged (OpenCLIP quotes absolute learning rates).
  """
  if scaling not in LR_SCALINGS:
    raise ValueError(f'c.optim.lr_scaling={scaling!r} is not one of {LR_SCALINGS}; pick one of them.')
  if global_batch <= 0 or reference_batch <= 0:
    raise ValueError(f'global batch ({global_batch}) and c.optim.lr_reference_batch '
                     f'({reference_batch}) must be positive integers.')
  ratio = global_batch / reference_batch
  if scaling == 'sqrt':
    return base_lr * math.sqrt(ratio)
  if scaling == 'linear':
    return base_lr * ratio
  return base_lr


def cosine(step, *, start: float, end: float, total_steps: int) -> jnp.ndarray:
  """Half-cosine from `start` (step 0) to `end` (step `total_steps`), held at `end` after that."""
  # float32 counts are exact up to 2**24 steps, far beyond any run length here.
  t = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
  return jnp.asarray(end + 0.5 * (start - end) * (1.0 + jnp.cos(jnp.pi * t)), jnp.float32)


def warmup_cosine(step, *, peak_value: float, warmup_steps: int, total_steps: int,
                  final_value: float, decay: str = 'cosine') -> jnp.ndarray:
  """Linear warm-up 0 -> `peak_value` over `warmup_steps`, then cosine to `final_value` at `total_steps`.

  Closed form: lr(s) = peak * s / W for s < W; afterwards
  lr(s) = final + (peak - final) * (1 + cos(pi * (s - W) / (T - W))) / 2, constant past T.
  With `decay='constant'` the value stays at `peak_value` after warm-up.

  This equals DINOv2's table-based `CosineScheduler` from step W on; during warm-up DINOv2 uses
  `linspace(0, peak, W)`, which reaches the peak at step W - 1 instead of W (at most one warm-up
  increment apart). The closed form has no table to index out of range and needs no memory.
  """
  if decay not in LR_DECAYS:
    raise ValueError(f'c.optim.schedule={decay!r} is not one of {LR_DECAYS}; pick one of them.')
  s = jnp.asarray(step, jnp.float32)
  # max(.., 1) keeps warmup_steps=0 free of a 0/0; the branch is then never selected anyway.
  warm = peak_value * s / max(warmup_steps, 1)
  if decay == 'constant':
    after = jnp.full_like(s, peak_value)
  else:
    after = cosine(s - warmup_steps, start=peak_value, end=final_value,
                   total_steps=total_steps - warmup_steps)
  return jnp.where(s < warmup_steps, warm, after).astype(jnp.float32)


def cfg_value(cfg: ml_collections.ConfigDict, name: str):
  """cfg[name], or a ValueError that names the missing key (ConfigDict raises AttributeError)."""
  if name not in cfg:
    raise ValueError(f'c.optim.{name} is missing; add it to configs/base.py (see optim.py docstring).')
  return cfg[name]


def _check_total(total_steps: int) -> None:
  if total_steps <= 0:
    raise ValueError(f'c.train.steps={total_steps} must be a positive number of optimizer steps.')


def lr_schedule(optim_cfg: ml_collections.ConfigDict, total_steps: int,
                global_batch: int) -> Schedule:
  """The learning-rate schedule from c.optim.{lr, lr_scaling, lr_reference_batch, warmup_steps,
  schedule, final_lr}, with the peak scaled for `global_batch`."""
  _check_total(total_steps)
  base = float(cfg_value(optim_cfg, 'lr'))
  if base <= 0:
    raise ValueError(f'c.optim.lr={base} must be positive (it is the base lr at the reference batch).')
  peak = peak_lr(base, global_batch, cfg_value(optim_cfg, 'lr_scaling'),
                 int(cfg_value(optim_cfg, 'lr_reference_batch')))
  warmup = int(cfg_value(optim_cfg, 'warmup_steps'))
  if not 0 <= warmup <= total_steps:
    raise ValueError(f'c.optim.warmup_steps={warmup} must lie in [0, c.train.steps={total_steps}]; '
                     'lower it for short (debug) runs.')
  final = float(cfg_value(optim_cfg, 'final_lr'))
  if not 0 <= final <= peak:
    raise ValueError(f'c.optim.final_lr={final} must lie in [0, peak lr={peak:g}].')
  decay = cfg_value(optim_cfg, 'schedule')
  if decay not in LR_DECAYS:
    raise ValueError(f'c.optim.schedule={decay!r} is not one of {LR_DECAYS}; pick one of them.')

  def schedule(step):
    return warmup_cosine(step, peak_value=peak, warmup_steps=warmup, total_steps=total_steps,
                         final_value=final, decay=decay)

  return schedule


def weight_decay_schedule(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> Schedule:
  """Cosine from c.optim.weight_decay to c.optim.weight_decay_end over the run (DINOv2 0.04 -> 0.4)."""
  _check_total(total_steps)
  start = float(cfg_value(optim_cfg, 'weight_decay'))
  end = float(cfg_value(optim_cfg, 'weight_decay_end'))
  if start < 0 or end < 0:
    raise ValueError(f'c.optim.weight_decay={start} and c.optim.weight_decay_end={end} must be >= 0.')

  def schedule(step):
    return cosine(step, start=start, end=end, total_steps=total_steps)

  return schedule


def momentum_schedule(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> Schedule:
  """Teacher EMA momentum: cosine from c.optim.momentum to c.optim.momentum_end (DINOv2 0.992 -> 1)."""
  _check_total(total_steps)
  start = float(cfg_value(optim_cfg, 'momentum'))
  end = float(cfg_value(optim_cfg, 'momentum_end'))
  if not (0 <= start <= 1 and 0 <= end <= 1):
    raise ValueError(f'c.optim.momentum={start} and c.optim.momentum_end={end} must lie in [0, 1].')

  def schedule(step):
    return cosine(step, start=start, end=end, total_steps=total_steps)

  return schedule
