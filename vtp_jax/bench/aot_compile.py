"""The compile behind `bench.aot`: the train step built from abstract shapes on a target's devices,
compiled, and read back as a report (memory, FLOPs, collectives, bounds). No flags here, so tests and
other tools can import it next to any CLI.
"""

import dataclasses
import re
import time

GIB = 1024 ** 3


def _state_bytes_per_device(abstract_state, compiled_shardings) -> dict:
  """Bytes of each train-state field on one device, from the shardings the compiled executable
  gives its output state (unpadded: the compiler's tiling may add to what memory_analysis says)."""
  import jax
  import numpy as np
  out = {}

  def nbytes(tree, shardings):
    return sum(int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))

  for field in dataclasses.fields(abstract_state):  # TrainState, or the generator's GenState
    if field.name not in ('step', 'rng', 'loss_state'):
      out[field.name] = nbytes(getattr(abstract_state, field.name),
                               getattr(compiled_shardings, field.name))
  out['total'] = nbytes(abstract_state, compiled_shardings)  # with the counters, rng, centres
  return out


def _describe(config, task, target, mesh) -> dict:
  """What was compiled, for where: the fields every report starts with."""
  import jax

  from vtp_jax import batch as batch_lib
  return {
      'topology': target.topology, 'target': target.name, 'chip': target.chip.name,
      'chip_source': target.chip.source, 'slices': target.slices,
      'devices': mesh.devices.size, 'mesh': dict(mesh.shape),
      'batch': task.batch_sizes(config),
      'accum_steps': batch_lib.accum_steps(config),
      'precision': {'compute_dtype': config.precision.compute_dtype,
                    'remat_policy': config.precision.remat_policy,
                    'scan_layers': bool(config.precision.scan_layers),
                    'attention': config.precision.attention},
      'jax': jax.__version__,
  }


def _analytic_flops(config, task, mesh) -> tuple[float, float]:
  """Per device: the model's FLOPs (what the MFU ceiling divides) and the forwards the
  accumulation cache repeats beside them (train/flops.py 'accum_cache')."""
  counted = task.step_flops(config, mesh)
  n = mesh.devices.size
  return counted['total'] / n, counted.get('accum_cache', 0.0) / n


_HBM_EXHAUSTED = re.compile(r'memory required for HLO temporaries \(([0-9.]+)G\) exceeds')


def _report_without_executable(config, task, target, mesh, inputs, temporaries, error,
                               compile_s):
  """The report of a program the compiler refused for lack of HBM: arguments from the inputs'
  shard shapes, temporaries from the compiler's message, no executable to read anything else from.
  """
  import jax

  from vtp_jax import sharding
  args = sharding.abstract_bytes_per_device(inputs, jax.tree.map(lambda x: x.sharding, inputs))
  analytic, cache = _analytic_flops(config, task, mesh)
  compute = analytic / target.chip.peak_flops
  return {
      **_describe(config, task, target, mesh),
      'memory_per_device_gib': {'arguments': args / GIB, 'outputs': None, 'aliased': None,
                                'temporaries': temporaries / GIB,
                                'peak': (args + temporaries) / GIB},
      'hbm_gib': target.chip.hbm_bytes / GIB,
      'fits': False,
      'compile_error': error[:300],
      'flops_per_device': {'xla': None, 'analytic': analytic, 'accum_cache': cache},
      'collectives': None,
      'compile_s': round(compile_s, 1),
      'bound_s': {'compute': compute},
      'bound_step_s': compute,
      'mfu_ceiling': None,
  }


def _estimate(hlo, chip, byte_scale, partition_slices, scope_of, analytic, xla_optimal) -> dict:
  """bench/serial.py's estimate of the step (per scope where `scope_of` is given), its MFU, and
  XLA's `optimal_seconds` scaled by the estimate's own ratio of per-iteration to per-body time
  (XLA counts a loop body once)."""
  from vtp_jax.bench import serial
  every = serial.estimate(hlo, chip, byte_scale, partition_slices, scope_of)
  scaled = None
  if xla_optimal is not None and xla_optimal > 0:  # libtpu may say < 0: nothing to scale then
    once = serial.estimate(hlo, chip, byte_scale, partition_slices, count_iterations=False)
    if once['step_s'] > 0:
      scaled = float(xla_optimal) * every['step_s'] / once['step_s']
  step = every['step_s']
  return {'step_s': step, 'mfu': analytic / chip.peak_flops / step if step > 0 else None,
          'parts': every['parts'], 'scopes': every['scopes'],
          'top_instructions': every['top_instructions'],
          'xla_optimal_seconds_loop_scaled': scaled}


def compile_report(config, target, devices=None, hbm_fraction=0.9, dump_hlo='',
                   breakdown=False) -> dict:
  """Compiles the config's train step for `target` and returns the report (see the module doc)."""
  import jax

  from vtp_jax import compiler_options
  from vtp_jax import sharding
  from vtp_jax import tasks
  from vtp_jax.bench import hlo_stats
  from vtp_jax.bench import targets as targets_lib

  devices = devices if devices is not None else targets_lib.devices(target)
  tpu_slices = target.slices if target.platform == 'tpu' else 1
  mesh = sharding.make_mesh(config.mesh, devices, slices=tpu_slices)
  task = tasks.for_config(config)
  state, shardings, tx = task.create_state(config, mesh, abstract=True)
  step = task.make_train_step(config, mesh, shardings, tx)
  batch = task.abstract_batch(config, mesh)
  frozen_shapes = task.frozen_inputs_abstract(config)
  frozen = sharding.with_shardings(
      frozen_shapes, jax.tree.map(lambda _: sharding.replicated(mesh), frozen_shapes))
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = step.jitted.lower(state, batch, frozen)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    needed = _HBM_EXHAUSTED.search(str(e))
    if needed is None:
      raise
    # The TPU compiler refuses a program whose buffers exceed HBM: it does not fit, and the
    # message says how much its temporaries need.
    return _report_without_executable(config, task, target, mesh, (state, batch, frozen),
                                      float(needed.group(1)) * GIB, str(e).splitlines()[0],
                                      time.perf_counter() - t0)
  compile_s = time.perf_counter() - t0

  state_bytes = _state_bytes_per_device(state, compiled.output_shardings[0])
  memory = compiled.memory_analysis()
  args, outs = memory.argument_size_in_bytes, memory.output_size_in_bytes
  aliased, temps = memory.alias_size_in_bytes, memory.temp_size_in_bytes
  peak = args + outs - aliased + temps
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  hlo = compiled.as_text()
  if dump_hlo:
    from vtp_jax import paths  # local: only when asked for
    paths.write_whole(dump_hlo, hlo)
  # The network boundary: TPU slices, or the hosts of GPU nodes.
  slice_of = [(getattr(d, 'slice_index', None) or 0) if target.platform == 'tpu'
              else d.process_index for d in mesh.devices.flat]
  multi = len(set(slice_of)) > 1
  collectives = hlo_stats.collective_stats(hlo, slice_of if multi else None)

  n = mesh.devices.size
  chip = target.chip
  analytic, cache = _analytic_flops(config, task, mesh)
  # XLA's cost analysis counts a loop body once; scanned blocks run it depth times. Its counts are
  # scaled by the ratio of the HLO's own FLOPs/bytes with and without loop iterations (1 unrolled).
  loops = hlo_stats.loop_aware_costs(hlo)
  xla_flops = float(cost.get('flops', 0.0))
  xla_bytes = float(cost.get('bytes accessed', 0.0))
  flops = xla_flops * (loops['flops'] / loops['flops_once'] if loops['flops_once'] else 1.0)
  hbm_bytes = xla_bytes * (loops['bytes_accessed'] / loops['bytes_once']
                           if loops['bytes_once'] else 1.0)
  sources = {'flops': 'xla', 'hbm_bytes': 'xla'}
  if not flops:  # compile-only GPU executables report no cost analysis: the model's own FLOPs
    flops, sources['flops'] = analytic, 'analytic (no XLA cost analysis for this target)'
  if not hbm_bytes:  # ... and the HLO's operand/result bytes, an upper estimate
    hbm_bytes = loops['bytes_accessed']
    sources['hbm_bytes'] = 'HLO operand and result bytes (no XLA cost analysis for this target)'

  traffic = sum(collectives[k]['traffic_bytes'] for k in hlo_stats.KINDS)
  dcn_traffic = collectives.get('dcn_traffic_bytes', 0)
  bounds = {
      'compute': flops / chip.peak_flops,
      'hbm': hbm_bytes / chip.hbm_bytes_per_s,
      'ici': (traffic - dcn_traffic) / (chip.ici_bytes_per_s / 2),
  }
  if multi and chip.dcn_bytes_per_s:
    bounds['dcn'] = dcn_traffic / chip.dcn_bytes_per_s
  bound = max(bounds.values())
  extra = {}
  scope_of = None
  if breakdown:
    from vtp_jax.bench import roofline
    extra['breakdown'] = roofline.breakdown(hlo, chip.peak_flops, chip.hbm_bytes_per_s)
    scopes = roofline.scope_table(hlo)
    scope_of = lambda comp, name: scopes.get((comp, name), 'unattributed')  # noqa: E731
    counted = extra['breakdown']['totals']['hbm_bytes']
    # Scope bytes in XLA's units: the table's shares of the HBM bound.
    scale = hbm_bytes / counted if counted else 1.0
    extra['breakdown']['hbm_scale_to_xla'] = scale
    for figures in extra['breakdown']['scopes'].values():
      figures['hbm_bytes_xla_scaled'] = figures['hbm_bytes'] * scale
      figures['hbm_s'] *= scale
      figures['bound'] = 'hbm' if figures['hbm_s'] > figures['compute_s'] else 'compute'
  estimate = _estimate(hlo, chip, hbm_bytes / loops['bytes_accessed'] if loops['bytes_accessed']
                       else 1.0, slice_of if multi else None, scope_of, analytic,
                       cost.get('optimal_seconds'))
  if breakdown:  # where the estimated time goes, longest first
    scopes = extra['breakdown']['scopes']
    for scope, figures in scopes.items():
      figures['estimated_s'] = estimate['scopes'].get(scope, 0.0)
    extra['breakdown']['scopes'] = dict(sorted(scopes.items(),
                                               key=lambda kv: -kv[1]['estimated_s']))
  return {
      **_describe(config, task, target, mesh),
      'memory_per_device_gib': {'arguments': args / GIB, 'outputs': outs / GIB,
                                'aliased': aliased / GIB, 'temporaries': temps / GIB,
                                'peak': peak / GIB},
      'state_gib_per_device': {k: v / GIB for k, v in state_bytes.items()},
      'hbm_gib': chip.hbm_bytes / GIB,
      'fits': peak <= hbm_fraction * chip.hbm_bytes,
      'flops_per_device': {'xla': flops, 'analytic': analytic, 'xla_loop_bodies_once': xla_flops,
                           'accum_cache': cache},
      'hbm_bytes_per_device': hbm_bytes,
      'cost_sources': sources,
      'collectives': {k: collectives[k] for k in hlo_stats.KINDS},
      'collective_bytes_total': sum(collectives[k]['bytes'] for k in hlo_stats.KINDS),
      'unknown_trip_counts': collectives['unknown_trip_counts'],
      'compile_s': round(compile_s, 1),
      'estimated_step_s': estimate['step_s'],
      'mfu_estimate': estimate['mfu'],
      'estimate': estimate,
      'bound_s': bounds,
      'bound_step_s': bound,
      'mfu_ceiling': analytic / chip.peak_flops / bound if bound > 0 else None,
      'xla_optimal_seconds': cost.get('optimal_seconds'),
      'xla_optimal_seconds_loop_scaled': estimate['xla_optimal_seconds_loop_scaled'],
      'compiler_options': compiler_options.for_mesh(mesh),
      # What precision.attention='auto' took shows here: splash as 'tpu_custom_call', cuDNN as
      # '__cudnn$fmha...'; nothing for the xla kernel.
      'kernel_calls': hlo_stats.kernel_calls(hlo),
      **extra,
  }
