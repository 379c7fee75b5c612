"""Each reference norm class imports with the reference's eps and exports back to its own class.

The expected eps are the reference's constants, written out here (not read from our tables):
LayerNorm `layernorm` 1e-6, `layernormbf16` 1e-5, RMSNorm `rmsnorm` 1e-5, q/k RMSNorm(head_dim)
1e-5 whatever the block norm, and the text tower's OpenCLIP LayerNorm 1e-5 (spec, "Text tower").
"""

import json

import numpy as np
import pytest

from vtp_jax.models import layers
from vtp_jax.tools import reference_format

REFERENCE_EPS = {'layernorm': 1e-6, 'layernormbf16': 1e-5, 'rmsnorm': 1e-5}
REFERENCE_KIND = {'layernorm': 'layernorm', 'layernormbf16': 'layernorm', 'rmsnorm': 'rmsnorm'}


def _ref_config(reference_fixture, **fields):
  ref = json.loads((reference_fixture / 'config.json').read_text())
  ref.update(fields)
  return ref


@pytest.mark.parametrize('vision', sorted(REFERENCE_EPS))
@pytest.mark.parametrize('decoder', sorted(REFERENCE_EPS))
def test_every_norm_class_imports_with_the_reference_eps(reference_fixture, vision, decoder):
  ref = _ref_config(reference_fixture, vision_norm_layer=vision, decoder_norm_layer=decoder,
                    vision_use_qk_norm=True, decoder_use_qk_norm=True)
  m = reference_format.config_from_reference(ref, clip_dim=64).model
  assert (m.encoder.norm, m.encoder.norm_eps) == (REFERENCE_KIND[vision], REFERENCE_EPS[vision])
  assert (m.decoder.norm, m.decoder.norm_eps) == (REFERENCE_KIND[decoder], REFERENCE_EPS[decoder])
  assert m.encoder.qk_norm_eps == 1e-5 and m.decoder.qk_norm_eps == 1e-5
  assert m.text.norm_eps == 1e-5
  back = reference_format.reference_from_config(reference_format.config_from_reference(ref, 64))
  assert back['vision_norm_layer'] == vision and back['decoder_norm_layer'] == decoder


def test_layernorm_checkpoint_imports_with_eps_1e6_and_qk_eps_1e5(reference_fixture):
  """The acceptance case: `vision_norm_layer: layernorm` no longer keeps our default 1e-5."""
  ref = _ref_config(reference_fixture, vision_norm_layer='layernorm', vision_use_qk_norm=True)
  m = reference_format.config_from_reference(ref, clip_dim=64).model
  assert m.encoder.norm == 'layernorm' and m.encoder.norm_eps == 1e-6
  assert m.encoder.qk_norm_eps == 1e-5


def test_qk_norm_uses_its_own_eps_not_the_block_eps():
  """The attention block's q norm is x * rsqrt(mean(x^2) + 1e-5) (NumPy) with block eps 1e-6."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  spec = layers.BlockSpec(width=8, heads=2, mlp='gelu', mlp_ratio=2.0, norm='layernorm',
                          norm_eps=1e-6, qk_norm=True, qk_norm_eps=1e-5, dtype='float32',
                          rope_dtype='float32')
  # Tiny activations, so the eps term dominates and 1e-5 vs 1e-6 differs by about 2x.
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32) * 1e-4)
  module = layers.Attention(spec)
  variables = module.init(jax.random.key(0), x)
  params = jax.tree.map(np.asarray, nn.unbox(variables['params']))
  _, state = module.apply(variables, x, capture_intermediates=True)
  q_normed = np.asarray(state['intermediates']['q_norm']['__call__'][0])
  qkv = params['qkv']
  q = np.einsum('btd,dnh->bnth', np.asarray(x), qkv['kernel'][:, 0]) + qkv['bias'][0][:, None, :]
  want = q / np.sqrt(np.mean(q * q, axis=-1, keepdims=True) + 1e-5) * params['q_norm']['scale']
  np.testing.assert_allclose(q_normed, want, rtol=1e-4, atol=1e-7)


def test_unknown_norm_class_is_named(reference_fixture):
  ref = _ref_config(reference_fixture, vision_norm_layer='groupnorm')
  with pytest.raises(ValueError, match="vision_norm_layer='groupnorm'"):
    reference_format.config_from_reference(ref, clip_dim=64)


@pytest.mark.parametrize('key,value,match', [
    ('encoder.norm_eps', 1e-4, 'norm .rmsnorm. with eps 0.0001 has no class'),
    ('decoder.norm_eps', 3e-6, 'norm .layernorm. with eps 3e-06 has no class'),
    ('encoder.qk_norm_eps', 1e-6, 'model.encoder.qk_norm_eps=1e-06'),
    ('text.norm_eps', 1e-6, 'model.text.norm_eps=1e-06'),
])
def test_export_refuses_an_eps_no_reference_class_has(reference_fixture, key, value, match):
  config = reference_format.config_from_reference(_ref_config(reference_fixture), clip_dim=64)
  config.model.encoder.qk_norm = True
  tower, field = key.split('.')
  config.model[tower][field] = value
  with pytest.raises(ValueError, match=match):
    reference_format.reference_from_config(config)
