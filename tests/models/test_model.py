"""Model structure and behaviour: parameter counts, layouts, remat, pixel shuffle, drop path, masks."""

import functools
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import micro_config
from vtp_jax.models import decoder, layers, layout, vision, vtp


def _config(name, **precision):
  config = importlib.import_module(f'configs.{name}').get_config()
  config.precision.update(precision)
  return config


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_params(config):
  model = vtp.build(config)
  size = 32
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)),
      jnp.zeros((1, config.model.text.context_length), jnp.int32)))
  return nn.unbox(shapes)['params']


@pytest.mark.parametrize('name,total', [('vtp_s', 167.18e6), ('vtp_b', 295.64e6),
                                        ('vtp_l', 731.57e6)])
def test_released_parameter_counts_match_the_spec(name, total):
  params = _abstract_params(_config(name))
  released = sum(_count(params[k]) for k in ('encoder', 'decoder', 'text', 'clip'))
  assert abs(released - total) <= 1e-3 * total, f'{name}: {released / 1e6:.2f}M vs {total / 1e6}M'


def _tiny_model(scan, remat='none'):
  return vtp.build(micro_config(scan_layers=scan, remat_policy=remat))


@functools.lru_cache(maxsize=1)
def _tiny_scanned_params():
  """Scanned micro-model parameters, initialised once: several tests only read them, and the
  parameters do not depend on the remat policy."""
  params = jax.jit(_tiny_model(scan=True).init)(
      jax.random.key(1), jnp.zeros((2, 32, 32, 3)), jnp.zeros((2, 8), jnp.int32))['params']
  return nn.unbox(params)


def _init_tiny():
  """The scanned micro model and its parameters, as a fresh tree of dicts over the cached arrays
  (so a test may replace an entry)."""
  return _tiny_model(scan=True), jax.tree.map(lambda x: x, _tiny_scanned_params())


def _apply(model, method, **kwargs):
  return jax.jit(lambda p, *a: model.apply({'params': p}, *a, method=method, **kwargs))


def test_scanned_and_unscanned_encoders_give_the_same_outputs():
  scanned_model, params = _init_tiny()
  unrolled_model = _tiny_model(scan=False)
  images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  a = _apply(scanned_model, scanned_model.encode, n_intermediate=2, use_bottleneck=True)(
      params, images)
  b = _apply(unrolled_model, unrolled_model.encode, n_intermediate=2, use_bottleneck=True)(
      layout.unstack_blocks(params), images)
  for key in ('cls', 'patches', 'latent_patches'):
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5)
  for (pa, ca), (pb, cb) in zip(a['intermediate'], b['intermediate']):
    np.testing.assert_allclose(pa, pb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ca, cb, rtol=1e-5, atol=1e-5)
  # The stack/unstack conversion is exact in both directions.
  back = layout.stack_blocks(layout.unstack_blocks(params))
  jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize('policy', ['full', 'dots'])
def test_rematerialisation_does_not_change_gradients(policy):
  model, params = _init_tiny()
  remat_model = _tiny_model(scan=True, remat=policy)
  images = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))

  def loss(m):
    def f(p):
      z = m.apply({'params': p}, images, method=m.latents)
      return jnp.mean(jnp.square(m.apply({'params': p}, z, method=m.decode) - images))
    return f

  g_plain = jax.jit(jax.grad(loss(model)))(params)
  g_remat = jax.jit(jax.grad(loss(remat_model)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               g_plain, g_remat)


def test_pixel_shuffle_uses_pytorch_channel_order():
  p, h, w = 4, 2, 3
  x = np.random.default_rng(0).standard_normal((1, h, w, 3 * p * p)).astype(np.float32)
  out = np.asarray(decoder.pixel_shuffle(jnp.asarray(x), p))
  for c in range(3):
    for i in range(p):
      for j in range(p):
        # PyTorch: input channel c*p^2 + i*p + j -> out[c, p*y + i, p*x + j].
        np.testing.assert_array_equal(out[0, i::p, j::p, c], x[0, :, :, c * p * p + i * p + j])


@pytest.mark.parametrize('init', ['vit', 'fan_in'])
def test_vit_tower_init_matches_its_formula(init):
  """'vit': trunc-normal(0.02) for every linear (spec 1.13); 'fan_in': trunc-normal(fan_in^-0.5),
  the fan-in being the contracted width (the SwiGLU hidden size for w3). Truncation at 2 sigma
  shrinks the std by SciPy's truncnorm(-2, 2).std()."""
  from scipy import stats as scipy_stats
  config = micro_config(scan_layers=False)
  for tower in (config.model.encoder, config.model.decoder):
    tower.update(width=96, heads=2, init=init)
  spec = vtp.spec_from_config(config)
  towers = {'encoder': (vision.VisionEncoder(spec.encoder), (1, 32, 32, 3)),
            'decoder': (decoder.PixelDecoder(spec.decoder), (1, 2, 2, config.model.bottleneck_dim))}
  hidden = layers.swiglu_hidden(96, 4.0)
  shrink = scipy_stats.truncnorm(-2, 2).std()
  all_params = nn.unbox(jax.jit(lambda key: {  # one compilation for both towers
      name: module.init(key, jnp.zeros(shape))['params'] for name, (module, shape) in towers.items()
  })(jax.random.key(3)))
  for tower, params in all_params.items():
    block = params['blocks_0']
    kernels = {'qkv': (block['attn']['qkv']['kernel'], 96),
               'proj': (block['attn']['proj']['kernel'], 96),
               'w1': (block['mlp']['w1']['kernel'], 96), 'w3': (block['mlp']['w3']['kernel'], hidden)}
    for name, (kernel, fan_in) in kernels.items():
      want = shrink * (0.02 if init == 'vit' else fan_in ** -0.5)
      got = float(np.std(np.asarray(kernel)))
      assert abs(got - want) < 0.05 * want, f'{tower} {name}: std {got:.4f}, want {want:.4f}'
      assert float(np.max(np.abs(np.asarray(kernel)))) <= 2 * want / shrink + 1e-6


def test_unknown_init_is_a_named_error():
  with pytest.raises(ValueError, match="init='glorot'"):
    layers.BlockSpec(width=32, heads=2, init='glorot')


def test_swiglu_hidden_size_rule():
  assert [layers.swiglu_hidden(d, 4.0) for d in (384, 768, 1024, 64)] == [1024, 2048, 2736, 176]


def test_subset_drop_path_touches_only_the_kept_samples():
  x = jnp.arange(8.0)[:, None] * jnp.ones((8, 4))
  out = layers.drop_path_residual(lambda t: jnp.ones_like(t), x, 0.5, 'subset',
                                  jax.random.key(0))
  changed = np.asarray(jnp.any(out != x, axis=1))
  assert changed.sum() == 4  # keep = max(int(8 * 0.5), 1)
  np.testing.assert_allclose(np.asarray(out - x)[changed], 2.0)  # scaled by b / keep


def test_mask_token_replaces_masked_patches_only():
  model, params = _init_tiny()
  params['encoder']['mask_token'] = jnp.full_like(params['encoder']['mask_token'], 3.0)
  images = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
  mask = jnp.zeros((2, 4), bool).at[0, 2].set(True)
  encode = _apply(model, model.encode)
  a = encode(params, images, mask)
  b = encode(params, images, None)
  assert not np.allclose(a['patches'][0], b['patches'][0])  # attention spreads the change
  np.testing.assert_allclose(a['patches'][1], b['patches'][1], rtol=1e-6)


def test_text_tower_pools_at_the_end_token():
  model, params = _init_tiny()
  base = jnp.array([[49406, 320, 1125, 49407] + [0] * 4])
  altered_padding = base.at[0, 6].set(7)  # after EOT: invisible under the causal mask
  f = lambda t: _apply(model, model.clip_text_features)(params, t)
  np.testing.assert_allclose(f(base), f(altered_padding), rtol=1e-6)
  assert not np.allclose(f(base), f(base.at[0, 1].set(2368)), rtol=1e-4)
