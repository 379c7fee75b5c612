"""The device mesh, the one table that maps logical axis names to mesh axes, and sharded init.

Modules name logical axes only ('embed', 'mlp', 'heads', 'act_batch', ...); this file alone knows the
mesh axes ('data', 'fsdp', 'tensor'). Parameters are sharded ZeRO-3 style: every matrix splits its
model-width ('embed') dimension over 'fsdp' and its heads / MLP hidden / vocabulary / prototypes
over 'tensor'; biases follow their kernel's output dim; norm scales, tokens and scalars stay
replicated because they are small.
Activations split their batch over ('data', 'fsdp') and their heads / MLP hidden over 'tensor'.
"""

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# (logical name, mesh axes). First match wins; names absent here are replicated.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Parameters.
    ('embed', 'fsdp'),  # model width D of every matrix: ZeRO-3 parameter sharding
    ('mlp', 'tensor'),  # MLP hidden (and the DINO head's first hidden layer)
    ('mlp2', 'fsdp'),  # second DINO-head hidden layer (its input dim already takes 'tensor')
    ('heads', 'tensor'),  # attention heads
    ('vocab', 'tensor'),  # text token embedding rows
    ('prototypes', 'tensor'),  # DINO/iBOT prototypes (65,536): rows of the prototype weight
    ('head_bottleneck', 'fsdp'),  # DINO head bottleneck (256): the prototype matrix's other dim
    ('layers', None),  # nn.scan's stacked-layer axis
    # The generator (vtp_jax/generation/dit.py).
    ('modulation', 'tensor'),  # adaLN output width (6 x D per block): the largest DiT matrices
    ('latent_channels', None),  # latent channels x patch pixels (64 at patch 1): small, replicated
    ('timestep_freq', None),  # sinusoidal timestep features (256): small, replicated
    ('classes', None),  # class-embedding rows (classes + 1 null row): small, replicated
    # Activations.
    ('act_batch', BATCH_AXES),
    ('act_seq', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_prototypes', 'tensor'),
)


def rules_from_config(config) -> tuple:
  """Config overrides (`mesh.rules`, a sequence of (logical, mesh axes) pairs) before the defaults."""
  overrides = tuple(tuple(rule) for rule in config.mesh.get('rules', ()) or ())
  for rule in overrides:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f'mesh.rules entry {rule!r} must be a (logical_name, mesh_axes) pair.')
  return overrides + DEFAULT_RULES


def mesh_shape(mesh_config, n_devices: int) -> tuple[int, int, int]:
  """Resolves the (data, fsdp, tensor) sizes; at most one of them may be -1 (the rest)."""
  sizes = [int(mesh_config.data), int(mesh_config.fsdp), int(mesh_config.tensor)]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1.')
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % fixed:
      raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} does not divide the {n_devices} '
                       'devices; change mesh.data/fsdp/tensor.')
    sizes[sizes.index(-1)] = n_devices // fixed
  if math.prod(sizes) != n_devices:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but '
                     f'{n_devices} are present; set mesh.data=-1 or fix the sizes.')
  return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None,
              slices: int = 1) -> jax.sharding.Mesh:
  """The ('data', 'fsdp', 'tensor') mesh, axis types stated (Auto: GSPMD propagates shardings).

  Over several slices (TPU multislice, or GPU nodes joined by the data-centre network) 'data' is
  split between them and every other axis stays inside a slice, so only the data-parallel gradient
  reduction crosses the slower network (MaxText's dcn_data_parallelism)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_config, len(devices))
  if slices == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
  if shape[0] % slices:
    raise ValueError(f'mesh.data={shape[0]} must be a multiple of the {slices} slices: the data '
                     'axis is the one split across slices.')
  from jax.experimental import mesh_utils  # local: only multi-slice meshes need it
  grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices,) + shape[1:], (slices, 1, 1),
                                              devices)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def fit_spec(spec: P, shape: Sequence[int], mesh: jax.sharding.Mesh) -> P:
  """Drops mesh axes from dims they do not divide (e.g. 3 heads on tensor=2) rather than fail."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    size = 1
    for name in names:
      if dim % (size * mesh.shape[name]) == 0:
        kept.append(name)
        size *= mesh.shape[name]
    fitted.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  return P(*fitted)


def unbox_without_constraint(boxed_tree):
  """Strips nn.Partitioned boxes without the sharding constraint Flax's unbox adds under a mesh
  (which fails on abstract ShapeDtypeStruct leaves)."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned)
                      else x, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def logical_to_sharding(boxed_tree, mesh, rules):
  """NamedShardings for a tree of (abstract) params still boxed in nn.LogicallyPartitioned."""
  logical = nn.get_partition_spec(boxed_tree)
  unboxed = unbox_without_constraint(boxed_tree)

  def to_sharding(spec, leaf):
    mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if spec is not None else P()
    return NamedSharding(mesh, fit_spec(mesh_spec, leaf.shape, mesh))

  return jax.tree.map(to_sharding, logical, unboxed,
                      is_leaf=lambda x: isinstance(x, P) or x is None)


def init_sharded(init_fn, mesh, rules, *args):
  """Runs `init_fn(*args)` (returning boxed Flax variables) straight into sharded, unboxed params.

  `jax.eval_shape` gives shapes and logical axes without allocating; the jitted init then writes
  each shard on its own device, so no unsharded copy of the model ever exists.
  Returns (params, shardings), both plain nested dicts.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_to_sharding(abstract, mesh, rules)
    params = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return params, shardings


def batch_shards(mesh) -> int:
  """How many ways the batch axis splits: the product of the mesh's ('data', 'fsdp') sizes (1 for
  an empty abstract mesh)."""
  return math.prod(dict(mesh.shape).get(a, 1) for a in BATCH_AXES)


def batch_sharding(mesh, ndim: int = 1, leading_axes: int = 1) -> NamedSharding:
  """Sharding of an input array whose batch axis is `leading_axes - 1` (earlier axes replicated)."""
  spec = [None] * (leading_axes - 1) + [BATCH_AXES] + [None] * (ndim - leading_axes)
  return NamedSharding(mesh, P(*spec))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying their target shardings: a restore's target, or `lower`'s input."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)


def bytes_per_device(tree) -> dict:
  """Bytes of `tree` resident on each device (for memory checks and start-up logs)."""
  totals: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
  return totals


def abstract_bytes_per_device(abstract_tree, shardings) -> int:
  """Largest per-device byte count of an abstract tree under `shardings` (nothing allocated)."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    shard_shape = sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard_shape)) * np.dtype(leaf.dtype).itemsize
  return total
