"""bench.roofline: scopes from jax's op_name paths, FLOPs and bytes per scope with loop iterations
counted, and collective-matmul loops told apart from other loops, on a hand-written HLO program
whose figures are computed here by hand."""

import pytest

from vtp_jax.bench import roofline

_HLO = """HloModule m, num_partitions=4

%fused_dot (a: bf16[64,128], b: bf16[128,32]) -> bf16[64,32] {
  %a = bf16[64,128]{1,0} parameter(0)
  %b = bf16[128,32]{1,0} parameter(1)
  ROOT %d = bf16[64,32]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/transpose(jvp(VTP.encode))/encoder/blocks_0/mlp/dot_general"}
}

%windowed_body (p: (s32[], bf16[64,128], bf16[128,32])) -> (s32[], bf16[64,128], bf16[128,32]) {
  %p = (s32[], bf16[64,128], bf16[128,32]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[64,128]{1,0} get-tuple-element(%p), index=1
  %w = bf16[128,32]{1,0} get-tuple-element(%p), index=2
  %cp = bf16[128,32]{1,0} collective-permute(%w), channel_id=1, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %f = bf16[64,32]{1,0} fusion(%x, %cp), kind=kOutput, calls=%fused_dot
  ROOT %t = (s32[], bf16[64,128], bf16[128,32]) tuple(%i, %x, %cp)
}

%cond (p: (s32[], bf16[64,128], bf16[128,32])) -> pred[] {
  %p = (s32[], bf16[64,128], bf16[128,32]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(4)
  ROOT %c = pred[] compare(%i, %n), direction=LT
}

%plain_body (q: (s32[], f32[256])) -> (s32[], f32[256]) {
  %q = (s32[], f32[256]) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %v = f32[256]{0} get-tuple-element(%q), index=1
  %e = f32[256]{0} exponential(%v)
  ROOT %u = (s32[], f32[256]) tuple(%j, %e)
}

%cond2 (q: (s32[], f32[256])) -> pred[] {
  ROOT %c2 = pred[] constant(true)
}

ENTRY %main (x0: bf16[64,128], w0: bf16[128,32], v0: f32[256]) -> f32[256] {
  %x0 = bf16[64,128]{1,0} parameter(0)
  %w0 = bf16[128,32]{1,0} parameter(1)
  %v0 = f32[256]{0} parameter(2)
  %init = (s32[], bf16[64,128], bf16[128,32]) tuple(%x0, %w0)
  %loop = (s32[], bf16[64,128], bf16[128,32]) while(%init), condition=%cond, body=%windowed_body, metadata={op_name="jit(step)/transpose(jvp(VTP.encode))/encoder/blocks_0/mlp/dot_general"}
  %init2 = (s32[], f32[256]) tuple(%v0)
  %loop2 = (s32[], f32[256]) while(%init2), condition=%cond2, body=%plain_body, backend_config={"known_trip_count":{"n":"3"}}, metadata={op_name="jit(step)/jvp(VTP.clip_text_features)/text/exp"}
  %ag = bf16[512,32]{1,0} all-gather(%w0), channel_id=2, replica_groups={{0,1,2,3}}, dimensions={0}, metadata={op_name="jit(step)/VTP.encode/encoder/blocks_0/attn/qkv"}
  ROOT %m = f32[256]{0} multiply(%v0, %v0), metadata={op_name="jit(step)/mul"}
}
"""


def test_scopes_name_the_tower_and_the_direction():
  cases = {
      'jit(step)/transpose(jvp(VTP.encode))/encoder/blocks_3/attn/dot': 'backward SSL encoder',
      'jit(step)/jvp(VTP.clip_image_features)/encoder/x': 'forward CLIP image encoder',
      'jit(step)/VTP.encode/encoder/blocks_0/mlp': 'no-grad SSL encoder (teacher)',
      'jit(step)/VTP.dino/dino_head/x': 'no-grad DINO/iBOT head (teacher)',
      'jit(step)/jvp(LPIPS)/sub': 'forward LPIPS',
      'jit(step)/transpose(jvp(jit(log_softmax)))/sub': 'backward losses',
      'jit(step)/mul': 'update and teacher targets',
  }
  for op_name, scope in cases.items():
    assert roofline.scope_of_op_name(op_name) == scope, op_name


def test_breakdown_counts_loop_iterations_and_names_collective_matmuls():
  result = roofline.breakdown(_HLO, peak_flops=1e12, hbm_bytes_per_s=1e9)
  backward = result['scopes']['backward SSL encoder']
  # The fused dot runs once per iteration of the 4-iteration loop (its `counter < 4` condition):
  # 2 x 64 x 32 x 128 FLOPs each; the fusion reads x and the permuted weight and writes 64 x 32.
  assert backward['flops'] == 4 * 2 * 64 * 32 * 128
  assert backward['hbm_bytes'] == pytest.approx(4 * (64 * 32 + 64 * 128 + 128 * 32) * 2 +
                                                4 * 2 * 128 * 32 * 2)  # + the permutes' bytes
  assert backward['collective_counts'] == {'collective-permute': 4}
  assert backward['collective_bytes'] == {'collective-permute': 4 * 128 * 32 * 2}
  assert backward['intensity'] == pytest.approx(backward['flops'] / backward['hbm_bytes'])
  # The exponential loop runs 3 times, in the forward text tower; it moves but does no matmul.
  text = result['scopes']['forward text tower']
  assert text['flops'] == 0 and text['hbm_bytes'] == 3 * 2 * 256 * 4
  assert result['scopes']['no-grad SSL encoder (teacher)']['collective_bytes'] == {
      'all-gather': 512 * 32 * 2}
  loops = result['loops']
  kinds = {loop['name']: (loop['kind'], loop['trip_count'], loop['scope'])
           for loop in loops['loops']}
  assert kinds == {'loop': ('collective matmul (windowed einsum)', 4, 'backward SSL encoder'),
                   'loop2': ('loop', 3, 'forward text tower')}
  assert loops['collective_matmul_iterations'] == 4
  assert result['top_instructions'][0]['scope'] == 'backward SSL encoder'
  assert 'collective matmul' in roofline.table(result)
