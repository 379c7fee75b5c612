"""Host-local numpy batches -> global jax.Arrays on the batch sharding (vtp_jax/batch.py).

Each JAX process holds B/P rows of every field; `jax.make_array_from_process_local_data` stitches
them into one global array whose batch axis is sharded over ('data', 'fsdp'), without any
cross-host copy. The host-only fields ('skipped', 'labels', and the inspection-only 'keys',
'captions' and 'skipped_keys') are dropped: the driver reads them on the host before calling this.
"""

import jax

from vtp_jax import batch as batch_lib


def to_global(batch: dict, mesh, shapes: dict) -> dict:
  """{branch: {field: jax.Array}} of the global batch whose contract is `shapes` ({branch:
  {field: (global shape, dtype)}}, e.g. `vtp_jax.batch.batch_shapes(config)`)."""
  batch_lib.check_rows_divide(shapes, mesh)
  shardings = batch_lib.shardings_of(shapes, mesh)
  missing = [b for b in shardings if b not in batch]
  if missing:
    raise ValueError(f'batch lacks the active branches {missing} (has {sorted(batch)}); the '
                     'pipeline and the step must be built from the same config.')
  out = {}
  for branch, fields in shardings.items():
    out[branch] = {}
    for field, sharding in fields.items():
      shape, dtype = shapes[branch][field]
      local = batch[branch][field]
      if local.dtype != dtype:
        raise ValueError(f'batch[{branch!r}][{field!r}] has dtype {local.dtype}, expected {dtype}.')
      out[branch][field] = jax.make_array_from_process_local_data(sharding, local, shape)
  return out
