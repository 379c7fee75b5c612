"""The device check: measured step time and MFU on one accelerator beside what `bench.aot` estimates
and bounds for the same config on the same chip, in one command.

  python -m vtp_jax.bench.device_check [--runs=vtp_s:1024,vtp_l:256] [--topology=h100:1x1]

For each `config:batch` of `--runs`: `bench.step` on this machine's first device (the median step
time; MFU = analytic FLOPs / step time / the chip's published peak, `bench/targets.py`) and
`bench.aot` compiled for one such chip (the serial estimate and the ceiling), each in its own
process, with the same config, batch and mesh (one device: `mesh.data=1, mesh.fsdp=1`). Prints
one JSON object: a row per run with both sides and `measured_over_estimate`, the factor by which
the estimate was optimistic (above 1) or pessimistic. The chip comes from the device's kind (H100,
H200, v5e, v6e); `--topology` names it where that fails (a v5p chip: `v5p-2`).

Needs what the train step needs (jax, flax, optax, ml_collections); not the data stack.
"""

import json
import subprocess
import sys

from absl import app, flags

flags.DEFINE_string('runs', 'vtp_s:1024,vtp_l:256',
                    'config:batch pairs (configs/<config>.py at that global batch), one device')
flags.DEFINE_string('topology', '', "bench.aot's target for one chip; default: from the device")
flags.DEFINE_integer('steps', 5, 'timed steps of bench.step')
FLAGS = flags.FLAGS

def _json_of(run: subprocess.CompletedProcess, what: str) -> dict:
  """The JSON object a bench command printed last on stdout."""
  if run.returncode != 0:
    return {'error': f'{what} exited {run.returncode}: {run.stderr.strip()[-1500:]}'}
  text = run.stdout
  return json.loads(text[text.index('{'):])


def row(config: str, batch: int, target: str, peak: float, steps: int) -> dict:
  overrides = [f'--config.data.batch_size={batch}', '--config.mesh.data=1',
               '--config.mesh.fsdp=1']
  config_file = f'configs/{config}.py'
  measured = _json_of(subprocess.run(
      [sys.executable, '-m', 'vtp_jax.bench.step', f'--config={config_file}', f'--peak={peak}',
       f'--steps={steps}', *overrides], capture_output=True, text=True), 'bench.step')
  compiled = _json_of(subprocess.run(
      [sys.executable, '-m', 'vtp_jax.bench.aot', f'--config={config_file}',
       f'--topology={target}', *overrides], capture_output=True, text=True), 'bench.aot')
  out = {'config': config, 'batch': batch, 'target': target}
  if 'error' in measured or 'error' in compiled:
    return {**out, 'bench_step': measured.get('error'), 'bench_aot': compiled.get('error')}
  step_s = measured['step_time_s_median']
  return {
      **out,
      'device': measured['devices'][0],
      'measured_step_s': step_s,
      'mfu_measured': measured['mfu'],
      'estimated_step_s': compiled['estimated_step_s'],
      'mfu_estimate': compiled['mfu_estimate'],
      'bound_step_s': compiled['bound_step_s'],
      'mfu_ceiling': compiled['mfu_ceiling'],
      'measured_over_estimate': step_s / compiled['estimated_step_s'],
      'estimate_parts_s': compiled['estimate']['parts'],
      'peak_gib': {'measured': measured['memory'].get('device_peak_bytes', 0) / 2**30,
                   'compiled': compiled['memory_per_device_gib']['peak']},
  }


def _device_kind() -> str:
  """The first device's kind, asked in a child process: this one must not start a backend, which
  on a GPU would reserve most of its memory while the benchmarks run."""
  return subprocess.run([sys.executable, '-c', 'import jax; print(jax.devices()[0].device_kind)'],
                        capture_output=True, text=True, check=True).stdout.strip()


def main(argv):
  del argv
  from vtp_jax.bench import targets
  kind = _device_kind()
  target = FLAGS.topology or targets.one_chip_target(kind)
  if target is None:
    print(f'error: no one-chip bench.aot target known for device kind {kind!r}; pass '
          '--topology (e.g. v5p-2, h100:1x1).', file=sys.stderr)
    sys.exit(2)
  peak = targets.parse(target).chip.peak_flops
  rows = []
  for spec in FLAGS.runs.split(','):
    config, _, batch = spec.strip().partition(':')
    rows.append(row(config, int(batch), target, peak, FLAGS.steps))
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # each row as soon as it is known
  print(json.dumps({'device': kind, 'target': target, 'rows': rows}, indent=1))


if __name__ == '__main__':
  app.run(main)
