"""bench.aot: the real train step compiled for TPU slices from this CPU host (libtpu, installed by
requirements-dev.txt), checked against figures computed here from shapes alone; target names; the
HLO collective reader on a hand-written program."""

import importlib.util
import math

import jax
import numpy as np
import pytest

from vtp_jax.bench import aot_compile as aot
from vtp_jax.bench import hlo_stats
from vtp_jax.bench import targets

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec('libtpu') is None,
    reason="libtpu is not installed: pip install -r requirements-dev.txt (jax[tpu]) compiles for "
           "TPU topologies on this host")


def test_target_names_follow_each_generation_counting_rule():
  cases = {'v5p-256': ('v5p:4x4x8', 128), 'v4-128': ('v4:4x4x4', 64),
           'v5e-256': ('v5e:16x16', 256), 'v5litepod-16': ('v5e:4x4', 16),
           'v6e-64': ('v6e:8x8', 64), 'v5p:4x4x8': ('v5p:4x4x8', 128),
           'v5e-4': ('v5e:2x2', 4), 'h200-16': ('1x2x8', 16), 'h100:2x8': ('1x2x8', 16)}
  for name, (topology, chips) in cases.items():
    t = targets.parse(name)
    assert (t.topology, t.chips) == (topology, chips), name
  assert targets.parse('v5p-256', slices=2).chips == 256
  assert targets.parse('h100-8').chip.hbm_bytes == 80e9
  for bad, hint in (('v5p-6', 'TensorCores'), ('v5e-3', 'chips'), ('tpu-8', 'not a target'),
                    ('h100-12', 'nodes of 8')):
    with pytest.raises(targets.TargetError, match=hint):
      targets.parse(bad)


_HLO = """HloModule m, num_partitions=4

%body (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %p = (s32[], f32[256]) parameter(0)
  %x = f32[256]{0} get-tuple-element(%p), index=1
  %ag = f32[1024]{0} all-gather(%x), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %rs = f32[64]{0} reduce-scatter(%x), channel_id=2, replica_groups=[2,2]<=[4], dimensions={0}
  ROOT %t = (s32[], f32[256]) tuple(%i, %x)
}

%cond (p: (s32[], f32[256])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%all-reduce-scatter.1 (input.1: bf16[64,128]) -> bf16[16,128] {
  %input.1 = bf16[64,128]{1,0} parameter(0)
  %ar = bf16[64,128]{1,0} all-reduce(%input.1), channel_id=3, replica_groups={{0,1,2,3}}
}

ENTRY %main (a: f32[256], b: bf16[64,128]) -> f32[256] {
  %a = f32[256]{0} parameter(0)
  %w = (s32[], f32[256]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"6"}}
  %f = bf16[16,128]{1,0} fusion(%b), kind=kCustom, calls=%all-reduce-scatter.1
  %s = (f32[256]{0}, f32[256]{0}, u32[], u32[]) collective-permute-start(%a), channel_id=4, source_target_pairs={{0,1},{1,0}}
  %d = f32[256]{0} collective-permute-done(%s)
  %r = f32[256]{0} all-reduce-start(%a), channel_id=5, replica_groups=mesh['x'=2,'y'=2] {'y'}
  ROOT %o = f32[256]{0} all-reduce-done(%r)
}
"""


def test_collectives_are_counted_per_execution_with_their_bytes():
  stats = hlo_stats.collective_stats(_HLO)
  # The all-gather and reduce-scatter sit in a loop body run 6 times.
  assert stats['all-gather'] == {'count': 6, 'bytes': 6 * 1024 * 4, 'traffic_bytes': 6 * 3072}
  # Explicit reduce-scatter over groups of 2 (the iota form): input = 2 x the 64-float output;
  # plus the TPU-style all-reduce-scatter fusion over 4 devices (64 x 128 bf16 input).
  assert stats['reduce-scatter']['count'] == 6 + 1
  assert stats['reduce-scatter']['bytes'] == 6 * 128 * 4 + 64 * 128 * 2
  assert stats['reduce-scatter']['traffic_bytes'] == 6 * 128 * 4 // 2 + 64 * 128 * 2 * 3 // 4
  # all-reduce-start over mesh axis 'y' of size 2: 2 (n-1)/n of 1 KiB.
  assert stats['all-reduce'] == {'count': 1, 'bytes': 1024, 'traffic_bytes': 1024}
  assert stats['collective-permute'] == {'count': 1, 'bytes': 1024, 'traffic_bytes': 1024}
  assert stats['all-to-all']['count'] == 0
  # Partitions {0, 1} in slice 0 and {2, 3} in slice 1: the 4-wide groups cross slices, the
  # permute (0 <-> 1) and the 'y' all-reduce (groups {0,1}, {2,3}) do not.
  dcn = hlo_stats.collective_stats(_HLO, partition_slices=[0, 0, 1, 1])['dcn_traffic_bytes']
  assert dcn == 6 * 3072 + 64 * 128 * 2 * 3 // 4


def test_instructions_after_a_kernel_with_a_multiline_config_still_count():
  """A Pallas kernel's backend_config may hold newlines, and a continuation line may start with
  '}' (splash attention's does): the computation goes on to its closing line."""
  kernel = ('  %k = bf16[256]{0} custom-call(%a), custom_call_target="tpu_custom_call", '
            'backend_config={"custom_call_config": {"body": "x",\n"xprof_metadata":"{\\"block_q\\": '
            '128\n}"\n}}, metadata={op_name="splash"}\n')
  hlo = _HLO.replace('  %a = f32[256]{0} parameter(0)\n', '  %a = f32[256]{0} parameter(0)\n' + kernel)
  assert hlo.count('\n}}, metadata') == 1
  assert hlo_stats.collective_stats(hlo) == hlo_stats.collective_stats(_HLO)
  assert hlo_stats.kernel_calls(hlo) == {'tpu_custom_call': 1}


def test_kernel_calls_count_our_kernels_not_xla_bookkeeping():
  hlo = """
  %a = bf16[4,2,256,64]{3,2,1,0} custom-call(%q), custom_call_target="tpu_custom_call", backend_config="x"
  %b = bf16[4,2,256,64]{3,2,1,0} custom-call(%q), custom_call_target="tpu_custom_call"
  %c = (bf16[4,256,2,64], u8[0]) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax"
  %d = f32[8]{0} custom-call(), custom_call_target="AllocateBuffer"
"""
  assert hlo_stats.kernel_calls(hlo) == {'tpu_custom_call': 2, '__cudnn$fmhaSoftmax': 1}

def _config(**mesh):
  """vtp_tiny without the LPIPS term: its frozen VGG16 is no part of the sharded train state, and
  its convolutions' backward is over a third of the TPU compile time on 2 cores."""
  from configs import vtp_tiny
  config = vtp_tiny.get_config()
  config.mesh.update(mesh)
  config.loss.lpips_weight = 0.0
  return config


def _shapes_and_specs(config, target):
  """(full bytes, bytes per device) of the params and of the whole train state, per leaf from its
  shape and the mesh axes its sharding names (NumPy arithmetic, no compiler involved)."""
  from vtp_jax import sharding
  from vtp_jax import tasks
  mesh = sharding.make_mesh(config.mesh, targets.devices(target))
  state, _, _ = tasks.for_config(config).create_state(config, mesh, abstract=True)

  def totals(tree):
    full = per_device = 0
    for leaf in jax.tree.leaves(tree):
      nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
      split = 1
      for axes in leaf.sharding.spec:
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
          split *= mesh.shape[axis]
      full += nbytes
      per_device += nbytes / split
    return full, per_device

  return totals(state.params), totals(state)


def _assert_sharded_state_collectives_and_estimate(report, config, target):
  """The compiled program keeps the train state in exactly the shards its mesh asks for, FSDP
  gathers the weights, data parallelism reduces the gradients, and the step-time figures hang
  together: the estimate's parts add up to it, it is at least the HBM bound it refines, and the
  MFU figures divide the analytic FLOPs by them."""
  mesh = report['mesh']
  (params_full, params_dev), (state_full, state_dev) = _shapes_and_specs(config, target)
  gib = 1024 ** 3
  compiled_state = report['state_gib_per_device']
  assert compiled_state['params'] * gib == pytest.approx(params_dev, rel=1e-6)
  assert compiled_state['total'] * gib == pytest.approx(state_dev, rel=1e-6)
  # ... which are the full sizes split fsdp x tensor ways: nearly all bytes are in matrices, the
  # replicated norms and scalars are a few percent.
  shards = mesh['fsdp'] * mesh['tensor']
  assert params_full / shards <= params_dev <= params_full / shards * 1.1
  assert state_full / shards <= state_dev <= state_full / shards * 1.1
  # The step's outputs hold that state (donated, so aliased to the input).
  assert report['memory_per_device_gib']['outputs'] * gib >= state_dev
  assert report['memory_per_device_gib']['aliased'] * gib >= state_dev
  c = report['collectives']
  # FSDP gathers the parameter shards before use: most of a full parameter copy (float32 for
  # vtp_tiny; still split over 'tensor') for the student forward alone. Small replicated leaves
  # and the patch embedding's fsdp-only split make it a little less than all of it.
  assert c['all-gather']['count'] > 0
  assert c['all-gather']['bytes'] >= 0.75 * params_full / mesh['tensor']
  if mesh['data'] > 1:
    # Data parallelism sums every gradient shard over 'data': all-reduce or reduce-scatter of
    # at least the per-device parameter bytes (float32 gradients; bfloat16 would be half).
    reduced = c['all-reduce']['bytes'] + c['reduce-scatter']['bytes']
    assert reduced >= 0.9 * params_dev
  assert report['fits'] is True
  assert report['flops_per_device']['xla'] > 0.5 * report['flops_per_device']['analytic']
  assert report['bound_s']['compute'] > 0 and report['bound_s']['hbm'] > 0
  assert 0 < report['mfu_ceiling'] <= 1
  estimate, peak = report['estimate'], target.chip.peak_flops
  assert sum(estimate['parts'].values()) == pytest.approx(report['estimated_step_s'], rel=1e-6)
  assert report['estimated_step_s'] >= 0.99 * report['bound_s']['hbm']
  assert report['mfu_estimate'] == pytest.approx(
      report['flops_per_device']['analytic'] / peak / report['estimated_step_s'], rel=1e-9)
  assert estimate['parts']['attention kernels'] > 0  # 'auto' took the vmem kernel


@pytest.mark.heavy
@needs_libtpu
def test_tiny_step_compiles_for_tpu_with_sharded_state_and_collectives():
  """vtp_tiny over data, fsdp and tensor (2 x 2 x 2) on 8 v5p chips; pure FSDP is compiled in
  test_fsdp_gathers_weights_instead_of_windowed_einsum_loops."""
  mesh = dict(data=2, fsdp=2, tensor=2)
  config = _config(**mesh)
  config.precision.scan_layers = True  # as VTP-L and VTP-H ship; compiled in half the time
  target = targets.parse('v5p:2x2x2')
  report = aot.compile_report(config, target)
  assert report['devices'] == 8 and report['mesh'] == mesh
  assert report['batch'] == {'clip': 32, 'ssl': 8, 'rec': 4}
  assert report['hbm_gib'] == 95.0
  _assert_sharded_state_collectives_and_estimate(report, config, target)
  # At this batch the outputs are little but the state and the metrics; TPU tiling pads small
  # shards (a 32-wide minor dimension fills a 128-lane tile).
  state_dev = report['state_gib_per_device']['total']
  assert report['memory_per_device_gib']['outputs'] <= 1.3 * state_dev


@pytest.mark.heavy
@needs_libtpu
def test_fits_turns_false_when_the_batch_outgrows_the_chip():
  """vtp_tiny at 4096x its batch on 4 v5e chips (16 GiB each): the activations no longer fit."""
  config = _config(data=4, fsdp=1, tensor=1)
  config.data.batch_size = 32 * 4096
  config.precision.scan_layers = True  # the same program, compiled faster
  report = aot.compile_report(config, targets.parse('v5e-4'))
  assert report['memory_per_device_gib']['peak'] > 0.9 * 16
  assert report['fits'] is False


def test_plan_candidates_and_ranking():
  from configs import vtp_l
  from vtp_jax.bench import aot_plan
  config = vtp_l.get_config()  # 16 heads in encoder and decoder
  meshes = aot_plan.default_meshes(config, 128)
  assert (1, 128, 1) in meshes and (16, 8, 1) in meshes and (1, 32, 4) in meshes
  assert all(math.prod(m) == 128 for m in meshes)
  assert aot_plan.parse_meshes('2,4,1; 1,8,1') == [(2, 4, 1), (1, 8, 1)]
  with pytest.raises(ValueError, match='data,fsdp,tensor'):
    aot_plan.parse_meshes('2,4')

  def row(fits, bound, peak):
    return {'report': {'fits': fits, 'bound_step_s': bound,
                       'memory_per_device_gib': {'peak': peak}}}

  rows = [row(False, 0.1, 99.0), {'report': {'error': 'x'}}, row(True, 0.5, 10.0),
          row(True, 0.3, 50.0), row(True, 0.3, 40.0)]
  ranked = sorted(rows, key=aot_plan.rank_key)
  assert [r['report'].get('bound_step_s') for r in ranked] == [0.3, 0.3, 0.5, 0.1, None]
  assert ranked[0]['report']['memory_per_device_gib']['peak'] == 40.0


@pytest.mark.heavy
@needs_libtpu
def test_generator_step_compiles_for_tpu():
  """The downstream generator (config.task='generation') goes through the same tool: dit_tiny
  with pure FSDP on 4 v5e chips keeps its parameters, EMA and Adam moments 4-way sharded."""
  from configs import dit_tiny
  config = dit_tiny.get_config()
  config.mesh.update(data=1, fsdp=4, tensor=1)
  report = aot.compile_report(config, targets.parse('v5e-4'))
  assert report['batch'] == {'dit': 64} and report['fits'] is True
  state = report['state_gib_per_device']
  assert set(state) >= {'params', 'ema', 'opt_state', 'total'}
  assert state['ema'] == pytest.approx(state['params'])  # the EMA mirrors the weights' shards
  assert state['opt_state'] == pytest.approx(2 * state['params'], rel=0.01)  # Adam's mu and nu
  assert report['collectives']['all-gather']['count'] > 0


@pytest.mark.heavy
@needs_libtpu
def test_fsdp_gathers_weights_instead_of_windowed_einsum_loops():
  """vtp_tiny (scanned blocks) under pure FSDP over 8 v5p chips at a batch of 512: with XLA's
  windowed einsums on, this compile holds 27 collective-matmul loops and 1,428 collective-permutes
  (each weight shard passed round the ring while its activation is re-read); the step's compiler
  options (vtp_jax/compiler_options.py) gather each weight instead, so no such loop and no
  permute."""
  config = _config(data=1, fsdp=-1, tensor=1)
  config.data.batch_size = 512
  config.precision.scan_layers = True  # the same finding, compiled in a third of the time
  target = targets.parse('v5p-16')
  report = aot.compile_report(config, target, breakdown=True)
  assert report['mesh'] == {'data': 1, 'fsdp': 8, 'tensor': 1}
  _assert_sharded_state_collectives_and_estimate(report, config, target)
  assert report['compiler_options'] == {
      'xla_tpu_enable_windowed_einsum_for_all_gather': False,
      'xla_tpu_enable_windowed_einsum_for_reduce_scatter': False}
  loops = report['breakdown']['loops']
  assert 'collective matmul (windowed einsum)' not in loops['by_kind'], loops['by_kind']
  assert report['collectives']['collective-permute']['count'] <= 300
  # The weights are gathered: all-gathers carry at least the bf16 parameters once per use.
  assert report['collectives']['all-gather']['count'] > 0
  # Every scope's figures add up to the program's, the estimated seconds too.
  scopes = report['breakdown']['scopes'].values()
  assert sum(s['hbm_bytes_xla_scaled'] for s in scopes) == pytest.approx(
      report['hbm_bytes_per_device'], rel=1e-6)
  assert sum(s['estimated_s'] for s in scopes) == pytest.approx(
      report['estimated_step_s'], rel=1e-6)
