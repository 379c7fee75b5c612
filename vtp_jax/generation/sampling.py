"""ODE sampling of the generator: LightningDiT's time grid with its timestep shift, Euler and Heun
fixed-grid solvers, and classifier-free guidance with a guidance interval.

Time runs from t = 0 (noise, x ~ N(0, I)) to t = 1 (data), the direction of transport.py. The grid
is LightningDiT's (transport/integrators.py, `ode`): `steps` points linspace(0, 1, steps), each
mapped by the shift

    t -> s t / (1 + (s - 1) t)        (s = timestep_shift; applied when s > 0; s = 1 is no shift)

so `steps` grid points give steps - 1 solver updates (torchdiffeq's fixed-grid convention). s < 1
packs the points towards t = 0, the noisy end. Euler: x += h v(x, t). Heun (torchdiffeq's 'heun2'):
k1 = v(x, t), k2 = v(x + h k1, t + h), x += h (k1 + k2) / 2.

Guidance (LightningDiT's forward_with_cfg): v = v_null + scale (v_cond - v_null) where t >=
cfg_interval_start, v_cond elsewhere; scale 1 (or less) is the conditional prediction alone, with
no unconditional pass. LightningDiT's code guides only the first 3 channels (a DiT leftover for
pixel-space models); `cfg_channels=3` reproduces that, 0 (default) guides every channel.
"""

import jax
import jax.numpy as jnp
import numpy as np

SOLVERS = ('euler', 'heun')


def shift_timesteps(t, shift: float):
  """LightningDiT's timestep shift: s t / (1 + (s - 1) t) when s > 0, else t unchanged."""
  if shift <= 0:
    return t
  return shift * t / (1 + (shift - 1) * t)


def time_grid(steps: int, shift: float) -> np.ndarray:
  if steps < 2:
    raise ValueError(f'sample.steps={steps}: the grid needs at least 2 points (1 update).')
  return shift_timesteps(np.linspace(0.0, 1.0, steps, dtype=np.float64), shift).astype(np.float32)


def guided(velocity, null_class: int, cfg_scale: float, cfg_interval_start: float = 0.0,
           cfg_channels: int = 0):
  """v(x, t (B,), y (B,)) with classifier-free guidance, from the network's `velocity(x, t, y)`."""
  if cfg_scale <= 1.0:
    return velocity

  def fn(x, t, y):
    both = velocity(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                    jnp.concatenate([y, jnp.full_like(y, null_class)]))
    cond, uncond = jnp.split(both, 2)
    mixed = uncond + cfg_scale * (cond - uncond)
    if cfg_channels:
      mixed = jnp.concatenate([mixed[..., :cfg_channels], cond[..., cfg_channels:]], axis=-1)
    inside = (t >= cfg_interval_start).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(inside, mixed, cond)

  return fn


def solve(velocity, x0, grid, solver: str = 'euler'):
  """Integrates dx/dt = velocity(x, t (B,)) over `grid` (1-D, increasing) from x0; returns x at
  grid[-1]. One lax.scan over the grid's intervals, so it compiles once whatever the step count."""
  if solver not in SOLVERS:
    raise ValueError(f'sample.solver={solver!r}; use one of {SOLVERS}.')
  grid = jnp.asarray(grid, jnp.float32)
  batch = x0.shape[0]

  def step(x, interval):
    t0, t1 = interval[0], interval[1]
    h = t1 - t0
    k1 = velocity(x, jnp.full((batch,), t0))
    if solver == 'euler':
      return x + h * k1, None
    k2 = velocity(x + h * k1, jnp.full((batch,), t1))
    return x + 0.5 * h * (k1 + k2), None

  intervals = jnp.stack([grid[:-1], grid[1:]], axis=1)
  x, _ = jax.lax.scan(step, x0.astype(jnp.float32), intervals)
  return x


def sample(velocity, noise, labels, *, null_class: int, steps: int, solver: str = 'euler',
           timestep_shift: float = 0.0, cfg_scale: float = 1.0, cfg_interval_start: float = 0.0,
           cfg_channels: int = 0):
  """Normalised latents from `noise` (B, h, w, C) for `labels` (B,): the guided ODE solved on the
  shifted grid. `velocity(x, t, y)` is the network (e.g. the EMA weights bound in)."""
  fn = guided(velocity, null_class, cfg_scale, cfg_interval_start, cfg_channels)
  return solve(lambda x, t: fn(x, t, labels), noise, time_grid(steps, timestep_shift), solver)


def sample_kwargs(config, **overrides) -> dict:
  """`sample`'s settings from config.sample (and the null class from config.dit), overridable."""
  s = config.sample
  kwargs = dict(null_class=int(config.dit.num_classes), steps=int(s.steps), solver=s.solver,
                timestep_shift=float(s.timestep_shift), cfg_scale=float(s.cfg_scale),
                cfg_interval_start=float(s.cfg_interval_start), cfg_channels=int(s.cfg_channels))
  kwargs.update({k: v for k, v in overrides.items() if v is not None})
  if kwargs['solver'] not in SOLVERS:
    raise ValueError(f"solver={kwargs['solver']!r}; use one of {SOLVERS}.")
  if kwargs['cfg_scale'] > 1.0 and config.dit.class_dropout <= 0:
    raise ValueError(f"cfg_scale={kwargs['cfg_scale']} needs a null class, but the model was "
                     'trained with dit.class_dropout=0; use cfg_scale=1.')
  return kwargs
