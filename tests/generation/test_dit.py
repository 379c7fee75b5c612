"""The LightningDiT generator: sizes against the published ones, adaLN-Zero identity at init, and
the fixed tables (RoPE, position and timestep embeddings) against NumPy versions of LightningDiT's
formulas; the analytic FLOP count against XLA's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dit_b, dit_tiny, dit_xl
from vtp_jax.generation import dit
from vtp_jax.generation import flops
from vtp_jax.models import layers


def tiny(**dit_overrides):
  c = dit_tiny.get_config()
  c.dit.update(width=32, depth=2, heads=2, num_classes=5, in_channels=8, input_size=4)
  c.dit.update(dit_overrides)
  return c


def test_dit_xl_has_the_published_675m_parameters():
  """LightningDiT-XL/1 over 64-channel latents (DiT-XL's published 675M); B/1 is DiT-B's 130M.
  Counted with jax.eval_shape: nothing is allocated."""
  assert dit.param_count(dit_xl.get_config()) / 1e6 == pytest.approx(675.0, abs=0.5)
  assert dit.param_count(dit_b.get_config()) / 1e6 == pytest.approx(130.4, abs=0.5)
  # LightningDiT's SwiGLU hidden int(2/3 * 4 D): 3072 at XL, 2048 at B.
  assert dit.block_spec(dit_xl.get_config()).mlp_hidden == 3072
  assert dit.block_spec(dit_b.get_config()).mlp_hidden == 2048


@pytest.mark.parametrize('wo_shift', [False, True])
def test_adaln_zero_block_is_the_identity_at_init(wo_shift):
  spec = dit.block_spec(tiny())
  block = dit.DiTBlock(spec, wo_shift)
  x = jax.random.normal(jax.random.key(0), (3, 16, 32))
  c = jax.random.normal(jax.random.key(1), (3, 32))
  sin, cos = (jnp.asarray(a) for a in dit.rope_tables(4, spec.head_dim, 10000.0))
  params = nn.unbox(block.init(jax.random.key(2), x, c, sin, cos))
  out, _ = jax.jit(block.apply)(params, x, c, sin, cos)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
  # The block is not trivially dead: its attention and MLP weights are random, only adaLN is 0.
  assert float(jnp.std(params['params']['attn']['qkv']['kernel'])) > 0.01


def test_model_predicts_zero_velocity_at_init_and_conditions_on_class():
  config = tiny()
  model = dit.build(config)
  x, t, y = dit.init_inputs(config, batch=2)
  params = nn.unbox(model.init({'params': jax.random.key(0)}, x, t, y)['params'])
  x = jax.random.normal(jax.random.key(1), x.shape)
  out = jax.jit(model.apply)({'params': params}, x, jnp.array([0.2, 0.7]), jnp.array([1, 5]))
  assert out.shape == x.shape
  np.testing.assert_array_equal(np.asarray(out), 0.0)  # zero-initialised output layer
  # The class table has a null row for CFG: num_classes + 1 rows while class_dropout > 0.
  assert params['y_embedder'].shape == (6, 32)


def test_rope_rotates_by_lightningdit_angles():
  """LightningDiT (EVA's VisionRotaryEmbeddingFast, dim = head_dim/2, theta 10000) rotates
  interleaved pairs (2k, 2k+1) of q; our tables rotate the pair (i, i + head_dim/2). Moving feature
  2k to position k and 2k+1 to k + head_dim/2 must turn one rotation into the other."""
  grid, head_dim = 3, 16
  dim = head_dim // 2
  freqs = 1.0 / 10000 ** (np.arange(0, dim, 2)[:dim // 2] / dim)  # dim/2 frequencies
  per_axis = np.repeat(np.arange(grid)[:, None] * freqs[None], 2, axis=1)  # '(n r)', r = 2
  angles = np.concatenate([np.broadcast_to(per_axis[:, None], (grid, grid, dim)),
                           np.broadcast_to(per_axis[None, :], (grid, grid, dim))], axis=-1)
  angles = angles.reshape(grid * grid, head_dim)
  q = np.random.default_rng(0).standard_normal((grid * grid, head_dim))
  rotated_half = np.stack([-q[:, 1::2], q[:, 0::2]], axis=-1).reshape(q.shape)
  reference = q * np.cos(angles) + rotated_half * np.sin(angles)

  perm = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
  sin, cos = dit.rope_tables(grid, head_dim, 10000.0)
  from vtp_jax.models import rope
  ours = np.asarray(rope.apply_rope(jnp.asarray(q[None, :, None, perm], jnp.float32),
                                    jnp.asarray(sin), jnp.asarray(cos), 'float32'))[0, :, 0]
  np.testing.assert_allclose(ours, reference[:, perm], atol=1e-5)


def test_fixed_embeddings_follow_dit_formulas():
  # Timestep: [cos(t f), sin(t f)], f_i = 10000^(-i/half), t fed in [0, 1].
  t = np.array([0.0, 0.25, 1.0])
  f = np.exp(-np.log(10000.0) * np.arange(128) / 128)
  want = np.concatenate([np.cos(t[:, None] * f), np.sin(t[:, None] * f)], axis=1)
  np.testing.assert_allclose(np.asarray(dit.timestep_embedding(jnp.asarray(t), 256)), want,
                             atol=1e-6)
  # 2-D sin-cos position embedding (MAE): column half then row half, each [sin, cos].
  width, grid = 8, 3
  omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
  rows, cols = np.divmod(np.arange(grid * grid), grid)
  parts = [f(p[:, None] * omega) for p in (cols, rows) for f in (np.sin, np.cos)]
  np.testing.assert_allclose(dit.sincos_pos_embed(width, grid), np.concatenate(parts, 1),
                             atol=1e-6)


def test_xavier_init_bounds_are_torchs_on_the_fused_weights():
  spec = layers.BlockSpec(width=48, heads=4, mlp='swiglu', init='xavier')
  kernel = spec.init_for('qkv')(jax.random.key(0), (48, 3, 4, 12))
  bound = np.sqrt(6.0 / (48 + 3 * 48))
  assert float(jnp.max(jnp.abs(kernel))) <= bound
  assert float(jnp.max(jnp.abs(kernel))) > 0.95 * bound


def test_analytic_flops_match_xla_count_of_the_forward():
  config = tiny(depth=1)
  model = dit.build(config)
  x, t, y = dit.init_inputs(config, batch=2)
  params = nn.unbox(model.init({'params': jax.random.key(0)}, x, t, y))
  compiled = jax.jit(model.apply).lower(params, x, t, y).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = 2 * flops.forward(config)
  assert flops.step_flops(config)['total'] == 3 * config.data.batch_size * flops.forward(config)
  # XLA also counts norms, softmax, modulation and the SwiGLU gate: a little over the matmuls.
  assert analytic <= cost['flops'] <= 1.25 * analytic, (cost['flops'], analytic)
