"""`python -m vtp_jax.bench.step` runs on 2 fake CPU devices and its JSON is self-consistent.

No speed is asserted (speed is what the benchmark reports, not what a test can check); this checks
that MFU is the analytic FLOPs over the median step over the peak it reports, that the peak is
the faster of the two all-device matmul timings it lists, and that the paired MFU is the median of
each step's MFU against the matmul rate timed after it.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import FAST_COMPILE, MICRO_CONFIG

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.heavy
def test_step_benchmark_prints_consistent_json_on_two_devices(tmp_path):
  config_file = tmp_path / 'bench_micro.py'
  config_file.write_text(MICRO_CONFIG)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO),
             XLA_FLAGS=FAST_COMPILE + ' --xla_force_host_platform_device_count=2')
  run = subprocess.run(
      [sys.executable, '-m', 'vtp_jax.bench.step', f'--config={config_file}', '--steps=2',
       '--matmul_size=256', '--config.mesh.data=2'],
      env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
  assert run.returncode == 0, run.stderr[-4000:]
  report = json.loads(run.stdout)
  assert report['devices'][1] == 2 and report['mesh'] == {'data': 2, 'fsdp': 1, 'tensor': 1}
  assert report['config']['branches'] == ['clip', 'rec']
  assert len(report['step_times_s']) == 2
  peaks = report['peak_measurements_flops_per_s']
  assert len(peaks) == 2 and '2 devices at once' in report['peak_source']
  assert report['peak_flops_per_s'] == max(peaks)
  flops = report['flops_analytic']
  assert flops['total'] == flops['clip'] + flops['rec']
  mfu = flops['total'] / report['step_time_s_median'] / report['peak_flops_per_s']
  assert abs(report['mfu'] - mfu) <= 1e-9 * mfu
  rates = report['matmul_rate_after_each_step_flops_per_s']
  assert len(rates) == 2
  times = report['step_times_s']
  per_step = [flops['total'] / t / r for t, r in zip(times, rates)]
  # The median of two is their mean. step_times_s are rounded to 0.1 ms in the JSON, so each
  # recomputed MFU may be off by up to 0.05 ms / t of itself (relative), to first order.
  slack = sum(m * 0.5e-4 / t for m, t in zip(per_step, times)) / 2
  assert abs(report['mfu_paired'] - sum(per_step) / 2) <= 1.01 * slack + 1e-12
