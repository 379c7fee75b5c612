"""Benchmark one train step on synthetic batches and print JSON.

  python -m vtp_jax.bench.step --config=configs/vtp_s.py [--peak=measure|FLOPS] [--steps=10]
      [--config.data.batch_size=8 ...]

Reports the analytic FLOPs per step (per branch, `vtp_jax.train.flops`), XLA's count for the
compiled step, the median step time after warm-up, achieved FLOP/s, MFU against the peak, and peak
memory. `--peak=measure` times a large matmul of the step's compute dtype in the same process, so
MFU on a CPU means "fraction of what this machine's matmul reaches" (timed before and after the steps,
the faster run counting, because a shared machine's rate drifts). `mfu_paired` is the median over
steps of each step's MFU against the matmul timed right after it, which cancels that drift. Imports
stay inside main() so the module runs wherever jax, flax and optax exist (no data stack needed).
"""

import json
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file', lock_config=False)
flags.DEFINE_string('peak', 'measure', "'measure' (time a large matmul here) or peak FLOP/s")
flags.DEFINE_integer('steps', 5, 'timed steps after the warm-up step')
flags.DEFINE_integer('matmul_size', 4096, 'side of the square matmul timed by --peak=measure')
FLAGS = flags.FLAGS


def matmul_timer(size: int, dtype):
  """`rate(runs) -> FLOP/s`: every device multiplying its own (size x size) matrices at the same
  time, best of `runs` timings. The total is n times one device's rate on separate chips, and the
  true total where devices share cores (fake CPU devices, where n times a one-device figure would
  count the cores twice). Compiled and warmed up once, so each call only times."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  n = len(jax.devices())
  mesh = jax.make_mesh((n,), ('devices',), axis_types=(AxisType.Explicit,))
  per_device = NamedSharding(mesh, P('devices'))
  make = jax.jit(lambda key: jax.random.normal(key, (n, size, size), dtype),
                 out_shardings=per_device)
  a, b = make(jax.random.key(0)), make(jax.random.key(1))
  f = jax.jit(lambda x, y: jnp.einsum('nij,njk->nik', x, y), out_shardings=per_device)
  f(a, b).block_until_ready()

  def rate(runs: int) -> float:
    times = []
    for _ in range(runs):
      t = time.perf_counter()
      f(a, b).block_until_ready()
      times.append(time.perf_counter() - t)
    return 2 * n * size ** 3 / min(times)

  return rate


def _peak_memory(compiled) -> dict:
  import jax
  out = {}
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    out['device_peak_bytes'] = int(stats['peak_bytes_in_use'])
  try:
    analysis = compiled.memory_analysis()
    out['compiled_temp_bytes'] = int(analysis.temp_size_in_bytes)
    out['compiled_argument_bytes'] = int(analysis.argument_size_in_bytes)
  except (AttributeError, NotImplementedError):  # some backends implement no memory analysis
    pass
  return out


def main(argv):
  del argv
  from vtp_jax import host_malloc  # first, before JAX starts: it may restart the process
  malloc_line = host_malloc.apply(host_malloc.mode_of(_CONFIG.value))
  import jax
  import jax.numpy as jnp
  import numpy as np

  from vtp_jax import tasks
  from vtp_jax.bench import common
  from vtp_jax.bench import hlo_stats
  from vtp_jax.models import layers

  config = _CONFIG.value
  task = tasks.for_config(config)
  mesh, state, step, batch, frozen = common.build_step(config)
  t0 = time.perf_counter()
  compiled, run = common.compile_step(mesh, step, state, batch, frozen)
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get('flops', float('nan'))) if cost else float('nan')

  dtype = layers.dtype_of(config.precision.compute_dtype)
  measuring = FLAGS.peak == 'measure'
  timer = matmul_timer(FLAGS.matmul_size, dtype) if measuring else None
  peaks = []  # the matmul is timed before and after the steps; the faster figure is the peak
  # ... and once right after every step, for an MFU per step against the rate of that moment:
  # a shared machine's speed drifts over minutes, which this pairing cancels and `mfu` does not.
  rates_after_steps = []
  if measuring:
    peaks.append(timer(5))
  state, metrics = run(state)  # warm-up (also checks it runs)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(FLAGS.steps):
    t = time.perf_counter()
    state, metrics = run(state)
    jax.block_until_ready((state.step, metrics))
    times.append(time.perf_counter() - t)
    if measuring:
      rates_after_steps.append(timer(5))  # as many timings as the peak gets
  step_s = statistics.median(times)
  if measuring:
    peaks.append(timer(5))
  analytic = task.step_flops(config, mesh)
  if measuring:
    # A shared machine's matmul rate drifts; the larger of the two keeps MFU conservative.
    peak = max(peaks)
    peak_source = (f'measured {FLAGS.matmul_size}^2 matmuls on {len(jax.devices())} devices at '
                   'once, the faster of before/after the steps (peak_measurements_flops_per_s)')
  else:
    peak, peak_source = float(FLAGS.peak), 'given'
  achieved = analytic['total'] / step_s
  report = {
      'config': {**task.summary(config),
                 'task': task.name,
                 'branches': list(task.branches(config)),
                 'compute_dtype': config.precision.compute_dtype,
                 'remat': config.precision.remat_policy,
                 'scan_layers': config.precision.scan_layers,
                 'attention': config.precision.attention,
                 'dense': config.precision.dense},
      'devices': [str(d.device_kind) for d in jax.devices()][:1] + [len(jax.devices())],
      'mesh': dict(mesh.shape),
      'flops_analytic': analytic,
      'flops_xla': xla_flops,
      'compile_s': round(compile_s, 2),
      'step_time_s_median': step_s,
      'step_times_s': [round(t, 4) for t in times],
      'achieved_flops_per_s': achieved,
      'peak_flops_per_s': peak,
      'peak_source': peak_source,
      'peak_measurements_flops_per_s': peaks,
      'mfu': achieved / peak,
      'matmul_rate_after_each_step_flops_per_s': rates_after_steps,
      'mfu_paired': (statistics.median(analytic['total'] / t / r
                                       for t, r in zip(times, rates_after_steps))
                     if rates_after_steps else None),
      'memory': _peak_memory(compiled),
      # Which fused kernels the program holds: what precision.attention='auto' took.
      'kernel_calls': hlo_stats.kernel_calls(compiled.as_text()),
      'final_loss': float(np.asarray(metrics['loss'])),
      'host_malloc': malloc_line,
      'jax': jax.__version__,
  }
  print(json.dumps(report, indent=1))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
  sys.exit(0)
