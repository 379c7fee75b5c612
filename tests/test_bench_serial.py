"""bench/serial.py, the serial step-time estimate, on a hand-written program whose every figure is
worked out here by hand: a compute-bound matmul fusion with an async all-gather partly hidden behind
it, an HBM-bound elementwise fusion, a thin matmul that the MXU fill rule makes compute-bound, a
scanned loop, an attention kernel with a declared cost, and a synchronous all-reduce; and the
device check's choice of a one-chip target."""

import dataclasses
import os
import subprocess
import sys

import pytest

from vtp_jax.bench import serial


@dataclasses.dataclass(frozen=True)
class _Chip:
  peak_flops: float = 100e12
  hbm_bytes_per_s: float = 1e12
  ici_bytes_per_s: float = 200e9  # 100 GB/s each way
  dcn_bytes_per_s: float | None = None
  matmul_unit: int | None = 128


_HLO = """HloModule m, is_scheduled=true, num_partitions=2

%fused_dot (a.1: bf16[1024,1024], b.1: bf16[1024,1024]) -> bf16[1024,1024] {
  %a.1 = bf16[1024,1024]{1,0} parameter(0)
  %b.1 = bf16[1024,1024]{1,0} parameter(1)
  ROOT %d = bf16[1024,1024]{1,0} dot(%a.1, %b.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_add (x.1: f32[4096,1024], x.2: f32[4096,1024]) -> f32[4096,1024] {
  %x.1 = f32[4096,1024]{1,0} parameter(0)
  %x.2 = f32[4096,1024]{1,0} parameter(1)
  ROOT %s = f32[4096,1024]{1,0} add(%x.1, %x.2)
}

%fused_scale (y.1: f32[256,1024], y.2: f32[256,1024]) -> f32[256,1024] {
  %y.1 = f32[256,1024]{1,0} parameter(0)
  %y.2 = f32[256,1024]{1,0} parameter(1)
  ROOT %m = f32[256,1024]{1,0} multiply(%y.1, %y.2)
}

%body (p: (s32[], f32[256,1024])) -> (s32[], f32[256,1024]) {
  %p = (s32[], f32[256,1024]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %y = f32[256,1024]{1,0} get-tuple-element(%p), index=1
  %f = f32[256,1024]{1,0} fusion(%y, %y), kind=kLoop, calls=%fused_scale
  ROOT %t = (s32[], f32[256,1024]) tuple(%i, %f)
}

%cond (c: (s32[], f32[256,1024])) -> pred[] {
  %c = (s32[], f32[256,1024]) parameter(0)
  ROOT %yes = pred[] constant(true)
}

%sum (l: f32[], r: f32[]) -> f32[] {
  %l = f32[] parameter(0)
  %r = f32[] parameter(1)
  ROOT %lr = f32[] add(%l, %r)
}

ENTRY %main (a: bf16[1024,1024], b: bf16[1024,1024], x: f32[4096,1024], g: f32[4,1048576], q: bf16[4096,64], r: bf16[64,1024], init: (s32[], f32[256,1024]), qkv: bf16[3,3,6,257,64], small: f32[1024]) -> bf16[1024,1024] {
  %a = bf16[1024,1024]{1,0} parameter(0)
  %b = bf16[1024,1024]{1,0} parameter(1)
  %x = f32[4096,1024]{1,0} parameter(2)
  %g = f32[4,1048576]{1,0} parameter(3)
  %q = bf16[4096,64]{1,0} parameter(4)
  %r = bf16[64,1024]{1,0} parameter(5)
  %init = (s32[], f32[256,1024]) parameter(6)
  %qkv = bf16[3,3,6,257,64]{4,3,2,1,0} parameter(7)
  %small = f32[1024]{0} parameter(8)
  %ags = (f32[4,1048576]{1,0}, f32[8,1048576]{1,0}) all-gather-start(%g), channel_id=1, replica_groups={{0,1}}, dimensions={0}
  %mm = bf16[1024,1024]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused_dot
  %agd = f32[8,1048576]{1,0} all-gather-done(%ags)
  %add = f32[4096,1024]{1,0} fusion(%x, %x), kind=kLoop, calls=%fused_add
  %thin = bf16[4096,1024]{1,0} dot(%q, %r), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %w = (s32[], f32[256,1024]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %attn = bf16[3,6,257,64]{3,2,1,0} custom-call(%qkv), custom_call_target="tpu_custom_call", backend_config={"custom_call_config":{"body":"x","cost_estimate":{"flops":"304353792","transcendentals":"1188882","bytes_accessed":"2368512"}}}
  %ar = f32[1024]{0} all-reduce(%small), channel_id=2, replica_groups={{0,1}}, to_apply=%sum
  ROOT %out = bf16[1024,1024]{1,0} copy(%mm)
}
"""

PEAK, BW, ICI = 100e12, 1e12, 100e9
MM = 2 * 1024 ** 3 / PEAK  # compute-bound: 2 x 1024^3 FLOPs; its 6 MiB take 6.3 us
GATHER = 8 * 1048576 * 4 / 2 / ICI  # half the gathered 32 MiB crosses the link
# The start's own buffers, as XLA counts bytes (operand 16 MiB, the (operand, output) tuple 48).
GATHER_HBM = (16 + 16 + 32) * 2 ** 20 / BW
ADD = 3 * 4096 * 1024 * 4 / BW  # HBM-bound: two operands and a result, 16 MiB each
# K = 64 fills half the 128-wide array: 10.7 us, over its 9.0 us of bytes (at full peak 5.4 us,
# and the instruction would have been HBM-bound).
THIN = 2 * 4096 * 1024 * 64 / (PEAK * 0.5)
LOOP = 4 * 3 * 256 * 1024 * 4 / BW  # 4 iterations of an HBM-bound fusion
# The declared FLOPs at head dim 64 (half a pass) and 257 tokens (three passes of 128).
KERNEL = 304353792 / (PEAK * 0.5 * 257 / 384)
ALL_REDUCE = 2 * 1024 * 4 / 2 / ICI
COPY = 2 * 1024 * 1024 * 2 / BW


def test_the_estimate_adds_each_instructions_bound_in_program_order():
  got = serial.estimate(_HLO, _Chip())
  # The all-gather's transfer runs while its start reads and writes its buffers and beside the
  # matmul fusion scheduled between its start and its done; the rest waits at the done.
  exposed = GATHER - GATHER_HBM - MM
  want = GATHER_HBM + MM + exposed + ADD + THIN + LOOP + KERNEL + ALL_REDUCE + COPY
  assert got['step_s'] == pytest.approx(want, rel=1e-9)
  assert got['parts'] == pytest.approx({
      'compute-bound instructions': MM + THIN,
      'HBM-bound instructions': ADD + LOOP + COPY,
      'attention kernels': KERNEL,
      'collectives (HBM side)': GATHER_HBM,
      'collectives (not hidden)': exposed,
      'collectives (synchronous)': ALL_REDUCE}, rel=1e-9)
  assert got['top_instructions'][0]['name'] == 'agd'


def test_loops_count_per_iteration_and_bytes_scale():
  once = serial.estimate(_HLO, _Chip(), count_iterations=False)
  every = serial.estimate(_HLO, _Chip())
  assert every['step_s'] - once['step_s'] == pytest.approx(LOOP * 3 / 4, rel=1e-9)
  doubled = serial.estimate(_HLO, _Chip(), byte_scale=2.0)
  # HBM-bound instructions take twice as long; the matmuls stay compute-bound (the thin one's
  # 18.1 us of doubled bytes now exceed its 10.7 us), the kernel too.
  thin_bytes = (4096 * 64 + 64 * 1024 + 4096 * 1024) * 2 / BW
  assert doubled['parts']['HBM-bound instructions'] == pytest.approx(
      2 * (ADD + LOOP + COPY) + 2 * thin_bytes, rel=1e-9)


def test_without_a_fill_rule_a_thin_matmul_runs_at_peak():
  got = serial.estimate(_HLO, _Chip(matmul_unit=None))
  thin_at_peak = 2 * 4096 * 1024 * 64 / PEAK
  thin_bytes = (4096 * 64 + 64 * 1024 + 4096 * 1024) * 2 / BW
  assert thin_at_peak < thin_bytes  # so it is HBM-bound without the rule
  assert got['parts']['compute-bound instructions'] == pytest.approx(MM, rel=1e-9)
  assert got['parts']['attention kernels'] == pytest.approx(304353792 / PEAK, rel=1e-9)
  assert serial.fill(257, 128) == pytest.approx(257 / 384)
  assert serial.fill(768, 128) == 1.0 and serial.fill(64, 256) == 0.25


def test_the_device_check_knows_one_chip_targets_and_refuses_a_cpu():
  from vtp_jax.bench import targets
  assert targets.one_chip_target('NVIDIA H100 80GB HBM3') == 'h100:1x1'
  assert targets.one_chip_target('NVIDIA H200') == 'h200:1x1'
  assert targets.one_chip_target('TPU v6 lite') == 'v6e-1'
  assert targets.parse('v6e-1').chips == targets.parse('h100:1x1').chips == 1
  assert targets.one_chip_target('TPU v5p') is None  # a v5p chip is named: --topology
  run = subprocess.run([sys.executable, '-m', 'vtp_jax.bench.device_check'], capture_output=True,
                       text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert run.returncode == 2
  assert run.stderr.strip().splitlines()[-1].startswith(
      "error: no one-chip bench.aot target known for device kind 'cpu'")


def test_a_matmul_written_as_a_convolution_fills_by_its_whole_depth():
  # TPU writes matmuls as convolutions; a spatial dim whose window covers its input is contracted
  # too: here 4 x 32 = 128 multiply-adds per output, a full pass, though the kernel's input
  # features are 32.
  line = ('%c = bf16[8,1,128]{2,1,0} convolution(%x, %w), window={size=4}, '
          'dim_labels=b0f_0io->b0f')
  shapes = {'x': [8, 4, 32], 'w': [4, 32, 128], 'c': [8, 1, 128]}
  assert serial.matmul_fill(line, 'convolution', shapes, 128, 'c') == 1.0
  flat = '%d = bf16[8,128]{1,0} convolution(%y, %v), dim_labels=bf_io->bf'
  shapes = {'y': [8, 32], 'v': [32, 128], 'd': [8, 128]}
  assert serial.matmul_fill(flat, 'convolution', shapes, 128, 'd') == 0.25
