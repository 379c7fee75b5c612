"""Compile the real train step for a TPU slice or GPU nodes from any host, and print what XLA says
it costs there: memory per chip, FLOPs, collectives, and lower bounds on the step time.

  python -m vtp_jax.bench.aot --config=configs/vtp_l.py --topology=v5p-256 [--slices=2]
      [--config.mesh.fsdp=16 --config.precision.remat_policy=full ...]
  python -m vtp_jax.bench.aot --config=configs/vtp_l.py --topology=v5p-256 --plan

Nothing runs on the target: the state, batch and frozen inputs are ShapeDtypeStructs carrying their
shardings (the task's `create_state(abstract=True)` and `abstract_batch`), and `jit(step).lower(...)
.compile()` produces the executable the target would run. Its `memory_analysis()` gives the bytes
per device (`peak` = arguments + outputs - aliased + temporaries, what must fit in HBM at once),
`cost_analysis()` the per-device FLOPs and HBM bytes (XLA counts a loop body once, so for scanned
blocks both are scaled by the HLO's own ratio of per-iteration to per-body counts, `hlo_stats.
loop_aware_costs`; compile-only GPU executables have no cost analysis, so there the analytic FLOPs
and the HLO's byte estimate stand in, as `cost_sources` says), and its optimised HLO the
collectives (`hlo_stats.py`). The bounds divide those by the chip's published rates (`targets.py`):
compute = XLA FLOPs / peak, hbm = bytes accessed / HBM bandwidth, ici = ring traffic / one
direction of the interconnect, dcn = the traffic of collectives that span slices / the per-chip
network share. `mfu_ceiling` = analytic (model) FLOPs per device / peak / the largest bound: what
MFU could at best be if the step ran at that bound, every HBM-bound instruction hidden behind a
compute-bound one.

The headline is the serial estimate (`bench/serial.py`): `estimated_step_s` adds each compiled
instruction's own max(FLOPs / effective peak, bytes / bandwidth) in program order, loops per
iteration, the matrix unit's fill for thin matmuls, and the part of each collective the schedule
does not hide behind compute; `mfu_estimate` = analytic FLOPs / peak / that time; `estimate.parts`
says how much is compute-bound, HBM-bound, attention kernels and exposed collectives. The
ceiling stays as its upper bound. XLA's own `optimal_seconds` (attention kernels included: they
declare their cost) is printed beside it as a second opinion, loop-scaled in
`xla_optimal_seconds_loop_scaled`.

`--breakdown` adds the roofline by model scope (`roofline.py`): estimated time, FLOPs, HBM bytes,
collectives, arithmetic intensity and bound per scope (each tower's forward and backward, the
teacher, the DINO/iBOT head, the losses, LPIPS, the update), longest estimated time first, the top
instructions by bytes, and every loop with its trip count, collective matmuls named. The compiler options the step is compiled with
(`vtp_jax/compiler_options.py`) are the launcher's: both build the step through `train/step.py`.

`--plan` compiles every candidate (mesh x remat policy x scanned or unrolled blocks) in separate
processes, ranks them (fitting first, then by the largest bound) and ends with the command line of
the best one. See docs/scaling.md for the tables this produced.
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file', lock_config=False)
flags.DEFINE_string('topology', None, 'v5p-256, v5e-256, v6e-64, v4-128, v5p:4x4x8, h100-8, ...')
flags.DEFINE_integer('slices', 1, 'slices joined over the data-centre network (multislice)')
flags.DEFINE_float('hbm_fraction', 0.9, '`fits`: peak memory within this fraction of HBM')
flags.DEFINE_bool('plan', False, 'search mesh, remat and scan; print the ranked table')
flags.DEFINE_string('plan_meshes', '', "candidates 'data,fsdp,tensor;...'; default: generated")
flags.DEFINE_string('plan_remat', 'none,dots_no_batch,full', 'remat policies to try')
flags.DEFINE_string('plan_scan', 'true,false', 'scan_layers values to try')
flags.DEFINE_string('plan_reports', '', "with --plan: every candidate's full report, as JSON, here")
flags.DEFINE_integer('plan_workers', 0, 'compiles at once; 0: by host memory (12 GiB each)')
flags.DEFINE_string('dump_hlo', '', 'write the optimised HLO text here')
flags.DEFINE_bool('breakdown', False, 'add the roofline by model scope (bench/roofline.py) to the '
                  'JSON and print its table to stderr')
FLAGS = flags.FLAGS

def main(argv):
  del argv
  from vtp_jax.bench import targets as targets_lib
  targets_lib.prepare_environment()  # before jax starts
  if FLAGS.topology is None:
    raise app.UsageError('--topology is required (e.g. v5p-256, v5e-4, h100-8).')
  try:
    target = targets_lib.parse(FLAGS.topology, FLAGS.slices)
    if FLAGS.plan:
      from vtp_jax.bench import aot_plan
      aot_plan.run(_CONFIG.value, target, sys.argv, FLAGS)
      return
    devices = targets_lib.devices(target)
  except targets_lib.TargetError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  from vtp_jax.bench import aot_compile
  report = aot_compile.compile_report(_CONFIG.value, target, devices, FLAGS.hbm_fraction,
                                      FLAGS.dump_hlo, breakdown=FLAGS.breakdown)
  if FLAGS.breakdown and 'breakdown' in report:
    from vtp_jax.bench import roofline
    print(roofline.table(report['breakdown'], report['breakdown']['hbm_scale_to_xla']),
          file=sys.stderr)
  print(json.dumps(report, indent=1))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
