"""to_global: host-local pipeline batches become batch-sharded global arrays on 8 fake devices."""

import jax
import numpy as np
import pytest
from conftest import micro_config

from vtp_jax import batch as batch_lib
from vtp_jax import sharding
from vtp_jax.data import device


def _mesh_config(config, data, fsdp, tensor):
  config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  return config


@pytest.mark.parametrize('axes', [(4, 1, 2), (2, 2, 2)])
def test_to_global_shards_the_batch_axis_and_keeps_values(axes):
  config = _mesh_config(micro_config(), *axes)
  mesh = sharding.make_mesh(config.mesh)
  local = batch_lib.synthetic_batch(config, seed=3)
  local['labels'] = np.arange(32, dtype=np.int32)
  local['skipped'] = {'missing_image': np.int64(1)}
  out = device.to_global(local, mesh, batch_lib.batch_shapes(config))
  assert set(out) == {'clip', 'ssl', 'rec'}  # host-only fields dropped
  n_batch_shards = axes[0] * axes[1]
  for branch, fields in batch_lib.batch_shapes(config).items():
    for field, (shape, dtype) in fields.items():
      array = out[branch][field]
      assert isinstance(array, jax.Array) and array.shape == shape and array.dtype == dtype
      np.testing.assert_array_equal(np.asarray(array), local[branch][field])
      # Each device holds 1/(data*fsdp) of the batch axis and all of every other axis.
      shard_shapes = {s.data.shape for s in array.addressable_shards}
      assert shard_shapes == {(shape[0] // n_batch_shards,) + shape[1:]}
      assert array.sharding.spec[0] == sharding.BATCH_AXES


def test_to_global_refuses_missing_branches_and_wrong_dtypes():
  config = _mesh_config(micro_config(), 8, 1, 1)
  config.data.batch_size = 64  # rec sub-batch 8 splits over 8 devices
  mesh = sharding.make_mesh(config.mesh)
  local = batch_lib.synthetic_batch(config, seed=0)
  with pytest.raises(ValueError, match='lacks the active branches'):
    device.to_global({'clip': local['clip']}, mesh, batch_lib.batch_shapes(config))
  local['clip']['tokens'] = local['clip']['tokens'].astype(np.int64)
  with pytest.raises(ValueError, match='dtype int64'):
    device.to_global(local, mesh, batch_lib.batch_shapes(config))
