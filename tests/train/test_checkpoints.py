"""Training checkpoints in-process on the 8 fake devices: restore onto other meshes (checked against
the saved digests there), half-written steps ignored, training workdirs readable as checkpoint
folders, and init_from's partial restore.

States are placed with jax.device_put of NumPy values (no compilation), so these tests are fast.
"""

import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding

from conftest import micro_config
from vtp_jax import sharding
from vtp_jax.models import layout
from vtp_jax import checkpoints
from vtp_jax.checkpoints import init_from as init_from_lib
from vtp_jax.checkpoints import manager
from vtp_jax.train import state as state_lib


def _mesh(data, fsdp, tensor, n=8):
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)),
                            devices=jax.devices()[:n])


def _placed_state(config, mesh, seed=0):
  """A TrainState of random values on `mesh`, with the parameters' real shardings."""
  _, param_shardings, params_shape = state_lib.param_init(config, mesh)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
      lambda a, s: jax.device_put(rng.standard_normal(a.shape).astype(a.dtype), s),
      params_shape, param_shardings)
  replicated = sharding.replicated(mesh)
  state = state_lib.TrainState(
      step=jax.device_put(np.int32(7), replicated), params=params,
      opt_state={'mu': jax.tree.map(lambda x: x * 2.0, params)},
      teacher=state_lib.teacher_of(jax.tree.map(lambda x: x * 3.0, params)), loss_state={},
      rng=jax.device_put(np.array([1, 2], np.uint32), replicated), disc={})
  return state, jax.tree.map(lambda x: x.sharding, state)


def _target_on(state, mesh):
  """The restore target on another mesh: same PartitionSpecs, fitted to the new mesh's sizes."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NamedSharding(mesh, sharding.fit_spec(x.sharding.spec, x.shape,
                                                                       mesh))), state)


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def _assert_equal(a, b):
  for x, y in zip(jax.tree.leaves(_host(a)), jax.tree.leaves(_host(b))):
    np.testing.assert_array_equal(x, y)


@pytest.mark.heavy
def test_saved_on_2x2x2_restores_onto_1x8x1_and_one_device_checked_by_its_digests(tmp_path):
  config = micro_config()
  state, _ = _placed_state(config, _mesh(2, 2, 2))
  expected = _host(state)
  ckpts = manager.Checkpoints(tmp_path, keep=2)
  ckpts.save(7, state, None, config)
  ckpts.wait()
  for mesh in (_mesh(1, 8, 1), _mesh(1, 1, 1, n=1)):
    restored = ckpts.restore(7, _target_on(state, mesh))  # every saved region checks out
    _assert_equal(restored, expected)
    leaf = restored.params['encoder']['patch_embed']['kernel']
    assert leaf.sharding.mesh.shape == mesh.shape  # placed on the new mesh, not the saved one
  # Asked for in another dtype: read (and checked) as saved, then cast.
  as_bf16 = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, jnp.bfloat16, sharding=t.sharding)
                         if t.dtype == jnp.float32 else t, _target_on(state, _mesh(1, 8, 1)))
  restored = ckpts.restore(7, as_bf16)
  assert restored.params['encoder']['patch_embed']['kernel'].dtype == jnp.bfloat16
  _assert_equal(restored.params, jax.tree.map(lambda x: x.astype(jnp.bfloat16), expected.params))
  # One region's digest changed: caught on a mesh whose shards cut that region (1x8x1) and on one
  # device, naming the array.
  file = tmp_path / 'checkpoints' / '7' / 'digest' / 'process_0-of-1.json'
  record = json.loads(file.read_text())
  regions = record['arrays']['params.encoder.patch_embed.kernel']['shards']
  assert len(regions) > 1  # saved in several shards
  region = sorted(regions)[-1]
  regions[region] = ('0' if regions[region][0] != '0' else '1') + regions[region][1:]
  file.write_text(json.dumps(record))
  for mesh in (_mesh(1, 8, 1), _mesh(1, 1, 1, n=1)):
    with pytest.raises(checkpoints.CheckpointUnreadable,
                       match=r'/7: state cannot be read \(params\.encoder\.patch_embed\.kernel '
                             r'digest mismatch\)'):
      ckpts.restore(7, _target_on(state, mesh))
  ckpts.close()


def test_a_step_saved_without_digests_has_no_digest_item_and_reads_unchecked(tmp_path):
  """What `bench.checkpoint` compares against: `digests=False` writes the step as it was before
  digests existed, and such a step restores without a check."""
  from vtp_jax.checkpoints import digest as checkpoint_digest
  config = micro_config()
  state, _ = _placed_state(config, _mesh(1, 2, 1, n=2))
  for digests in (False, True):
    ckpts = manager.Checkpoints(tmp_path / str(digests), keep=1, digests=digests)
    ckpts.save(3, state, None, config)
    ckpts.wait()
    step_dir = ckpts.root / '3'
    assert checkpoint_digest.saved_with_digests(step_dir) is digests
    assert (step_dir / checkpoint_digest.ITEM).exists() is digests
    _assert_equal(ckpts.restore(3, _target_on(state, _mesh(1, 2, 1, n=2))), _host(state))
    ckpts.close()


def test_workdir_reads_as_a_checkpoint_folder_and_ignores_half_written_steps(tmp_path):
  config = micro_config()
  state, _ = _placed_state(config, _mesh(1, 1, 1, n=1))
  ckpts = manager.Checkpoints(tmp_path, keep=3)
  ckpts.save(5, state, None, config)
  ckpts.close()
  # What a save killed mid-write leaves: Orbax's temporary folder, never renamed to "9".
  (tmp_path / 'checkpoints' / '9.orbax-checkpoint-tmp' / 'state').mkdir(parents=True)
  assert checkpoints.latest_step_dir(tmp_path) == tmp_path / 'checkpoints' / '5'
  assert checkpoints.resolve(tmp_path) == tmp_path / 'checkpoints' / '5'
  assert checkpoints.load_config(tmp_path).model.encoder.width == config.model.encoder.width
  _assert_equal(checkpoints.load_item(tmp_path, 'params'), state.params)
  _assert_equal(checkpoints.load_item(tmp_path, 'teacher'), state.teacher)
  assert checkpoints.has_item(tmp_path, 'teacher')
  assert not checkpoints.has_item(tmp_path, 'disc')
  saved = json.loads((tmp_path / 'checkpoints' / '5' / 'config' / 'config.json').read_text())
  assert saved['model']['encoder']['width'] == config.model.encoder.width
  with pytest.raises(FileNotFoundError, match='no vtp-jax checkpoint'):
    checkpoints.resolve(tmp_path / 'empty')
  # A new manager on the same workdir (a resumed run) deletes the leftover and sees step 5.
  again = manager.Checkpoints(tmp_path, keep=3)
  assert again.latest_step() == 5
  again.close()
  leftover = tmp_path / 'checkpoints' / '9.orbax-checkpoint-tmp'
  deadline = time.time() + 20  # Orbax deletes it on a background thread
  while leftover.exists() and time.time() < deadline:
    time.sleep(0.1)
  assert not leftover.exists()


@pytest.mark.parametrize('scan_source', [True, False])
def test_init_from_overwrites_present_params_and_keeps_init_for_missing(tmp_path, scan_source):
  config = micro_config()
  mesh = _mesh(2, 2, 2)
  fresh, shardings = _placed_state(config, mesh, seed=0)
  fresh_host = _host(fresh)
  source = jax.tree.map(lambda x: x + 1.0, fresh_host.params)
  del source['text']  # a source without the text tower: it keeps its fresh init
  checkpoints.save_params(tmp_path / 'src', config, layout.to_layout(source, scan_source))
  out = init_from_lib.init_from(tmp_path / 'src', fresh, shardings, config)
  params = _host(out.params)
  for key in ('encoder', 'decoder', 'dino_head', 'clip'):
    _assert_equal(params[key], source[key])
  _assert_equal(params['text'], fresh_host.params['text'])
  # The source has no teacher: the teacher restarts as a copy of the restored student.
  _assert_equal(out.teacher, {k: source[k] for k in state_lib.TEACHER_KEYS})
  _assert_equal(out.opt_state, fresh_host.opt_state)  # optimizer state stays fresh
  assert out.params['encoder']['patch_embed']['kernel'].sharding == (
      shardings.params['encoder']['patch_embed']['kernel'])


def test_init_from_with_nothing_matching_is_a_clear_error(tmp_path):
  config = micro_config()
  fresh, shardings = _placed_state(config, _mesh(1, 1, 1, n=1))
  checkpoints.save_params(tmp_path / 'other', config,
                         {'unrelated': {'w': np.zeros((3,), np.float32)}})
  with pytest.raises(ValueError, match='no parameter of .* matches this model'):
    init_from_lib.init_from(tmp_path / 'other', fresh, shardings, config)
