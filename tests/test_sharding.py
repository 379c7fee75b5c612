"""Sharding: the mesh from config, the PartitionSpec of every parameter, sharded init that never
builds an unsharded copy, and a sharded forward equal to the single-device one."""

import importlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import micro_config
from vtp_jax import sharding
from vtp_jax.models import vtp


def _config(name):
  return importlib.import_module(f'configs.{name}').get_config()


def _mesh(data, fsdp, tensor):
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)))


def _init_fn(config, image=32):
  model = vtp.build(config)
  images = jnp.zeros((1, image, image, 3))
  tokens = jnp.zeros((1, config.model.text.context_length), jnp.int32)
  return lambda: model.init(jax.random.key(0), images, tokens)


# Expected mesh axes per parameter of vtp_s (scanned: a leading None for the layer axis).
EXPECTED_VTP_S = [
    (r'encoder/patch_embed/kernel', P(None, None, None, 'fsdp')),
    (r'encoder/patch_embed/bias', P('fsdp')),
    (r'encoder/(cls|mask)_token', P(None)),
    (r'encoder/norm/scale', P(None)),
    (r'encoder/bottleneck/kernel', P('fsdp', None)),
    (r'(encoder|decoder|text)/blocks/attn/qkv/kernel', P(None, 'fsdp', None, 'tensor', None)),
    (r'(encoder|decoder|text)/blocks/attn/qkv/bias', P(None, None, 'tensor', None)),
    (r'(encoder|decoder|text)/blocks/attn/proj/kernel', P(None, 'tensor', None, 'fsdp')),
    (r'(encoder|decoder|text)/blocks/attn/proj/bias', P(None, 'fsdp')),
    (r'(encoder|decoder)/blocks/mlp/w[12]/kernel', P(None, 'fsdp', 'tensor')),
    (r'(encoder|decoder)/blocks/mlp/w[12]/bias', P(None, 'tensor')),
    (r'(encoder|decoder)/blocks/mlp/w3/kernel', P(None, 'tensor', 'fsdp')),
    (r'(encoder|decoder)/blocks/mlp/w3/bias', P(None, 'fsdp')),
    (r'text/blocks/mlp/fc1/kernel', P(None, 'fsdp', 'tensor')),
    (r'text/blocks/mlp/fc1/bias', P(None, 'tensor')),
    (r'text/blocks/mlp/fc2/kernel', P(None, 'tensor', 'fsdp')),
    (r'text/blocks/mlp/fc2/bias', P(None, 'fsdp')),
    (r'(encoder|decoder|text)/blocks/norm[12]/(scale|bias)', P(None, None)),
    (r'decoder/proj_in/kernel', P(None, 'fsdp')),
    (r'decoder/proj_in/bias', P('fsdp')),
    (r'decoder/proj_out/kernel', P('fsdp', None)),
    (r'decoder/proj_out/bias', P(None)),
    (r'decoder/norm/(scale|bias)', P(None)),
    (r'text/token_embedding/embedding', P('tensor', 'fsdp')),
    (r'text/positional_embedding', P(None, 'fsdp')),
    (r'text/projection', P('fsdp', None)),
    (r'text/ln_final/(scale|bias)', P(None)),
    (r'dino_head/mlp_0/kernel', P('fsdp', 'tensor')),
    (r'dino_head/mlp_0/bias', P('tensor')),
    (r'dino_head/mlp_1/kernel', P('tensor', 'fsdp')),
    (r'dino_head/mlp_1/bias', P('fsdp')),
    (r'dino_head/mlp_2/kernel', P('fsdp', None)),
    (r'dino_head/mlp_2/bias', P('fsdp')),
    (r'dino_head/v', P('tensor', 'fsdp')),  # (prototypes, bottleneck), PyTorch's weight_v layout
    (r'dino_head/g', P('tensor')),
    (r'clip/proj/kernel', P('fsdp', None)),
    (r'clip/logit_scale', P()),
]


def _normalise(spec):
  spec = list(spec)
  while spec and spec[-1] is None:
    spec.pop()
  return tuple(spec)


def _expected_vtp_s(scanned: bool):
  """EXPECTED_VTP_S for either block layout: unrolled blocks ('blocks_3') have no layer axis."""
  if scanned:
    return EXPECTED_VTP_S
  return [(pattern.replace('/blocks/', r'/blocks_\d+/'), P(*want[1:]) if '/blocks/' in pattern else want)
          for pattern, want in EXPECTED_VTP_S]


@pytest.mark.parametrize('scanned', [True, False])
def test_every_vtp_s_parameter_gets_its_partition_spec(scanned):
  config = _config('vtp_s')
  config.precision.scan_layers = scanned
  mesh = _mesh(2, 2, 2)
  rules = sharding.rules_from_config(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(_init_fn(config))
    shardings = sharding.logical_to_sharding(abstract, mesh, rules)['params']
  flat = {'/'.join(k.key for k in path): s.spec
          for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  unmatched = []
  for path, spec in flat.items():
    expected = [want for pattern, want in _expected_vtp_s(scanned) if re.fullmatch(pattern, path)]
    if not expected:
      unmatched.append(path)
      continue
    assert _normalise(spec) == _normalise(expected[0]), f'{path}: {spec} != {expected[0]}'
  assert not unmatched, f'parameters missing from the table: {unmatched}'


def test_vtp_h_abstract_init_puts_an_eighth_of_the_bytes_on_each_device():
  config = _config('vtp_h')
  mesh = _mesh(1, 8, 1)
  rules = sharding.rules_from_config(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(_init_fn(config))
    shardings = sharding.logical_to_sharding(abstract, mesh, rules)
  params = sharding.unbox_without_constraint(abstract)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  replicated = sum(x.size * x.dtype.itemsize
                   for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings))
                   if s.is_fully_replicated)
  per_device = sharding.abstract_bytes_per_device(params, shardings)
  assert per_device <= total / 8 + replicated
  assert replicated < 0.002 * total  # only norms, tokens, scalars and small biases stay whole


def test_sharded_init_lays_shards_without_a_full_copy():
  config = micro_config(scan_layers=True)  # the stacked layer axis stays unsharded
  mesh = _mesh(1, 8, 1)
  rules = sharding.rules_from_config(config)
  params, shardings = sharding.init_sharded(_init_fn(config), mesh, rules)
  kernel = params['params']['encoder']['blocks']['mlp']['w1']['kernel']
  assert kernel.sharding.spec == P(None, 'fsdp', 'tensor')
  assert {s.data.shape for s in kernel.addressable_shards} == {(2, 4, 88)}
  per_device = sharding.bytes_per_device(params)
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  assert max(per_device.values()) < total / 4


@pytest.mark.heavy
def test_sharded_forward_equals_single_device_forward():
  config = micro_config()
  model = vtp.build(config)
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  tokens = jax.random.randint(jax.random.key(2), (4, 8), 1, 49407)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), images, tokens))
  single = jax.jit(model.apply)(params, images, tokens)

  mesh = _mesh(2, 2, 2)
  rules = sharding.rules_from_config(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), images, tokens))
    shardings = sharding.logical_to_sharding(boxed, mesh, rules)
    sharded_params = jax.device_put(params, shardings)
    batch = sharding.batch_sharding(mesh, ndim=4)
    out = jax.jit(model.apply)(sharded_params, jax.device_put(images, batch),
                               jax.device_put(tokens, sharding.batch_sharding(mesh, ndim=2)))
  assert len(out['latents'].sharding.device_set) == 8
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), out, single)


@pytest.mark.parametrize('sizes,message', [
    ((3, -1, 1), 'does not divide'),
    ((2, 2, 1), 'needs 4 devices'),
    ((-1, -1, 1), 'at most one axis'),
])
def test_bad_mesh_shapes_fail_with_a_clear_message(sizes, message):
  with pytest.raises(ValueError, match=message):
    _mesh(*sizes)
