"""Reading and writing parameters (Orbax), and the config saved beside them, in a folder or a
bucket alike (vtp_jax/paths.py).

A training workdir (written by manager.py; its folder layout is defined here) is read wherever it
lies: `resolve` picks its latest complete step, whose `params` and `teacher` are read out of the
saved train state. Nothing here imports train/, so inference and the tools read checkpoints
without the training stack.

A parameter checkpoint is a folder holding `config.json` (the full ml_collections config) and Orbax
PyTree items: `params` (plain nested dict) and, when present, `teacher` (the EMA encoder and DINO
head). Restores always name the target shardings, so a checkpoint loads onto any mesh.

Reading a training step checks it against the digests saved with it (digest.py), in the saved
dtypes; a folder that cannot be read or fails its digests raises errors.CheckpointUnreadable.
"""

import json

import jax
import ml_collections
import orbax.checkpoint as ocp

from vtp_jax import paths
from vtp_jax.checkpoints import digest as checkpoint_digest
from vtp_jax.checkpoints.errors import CheckpointUnreadable, MissingItem, reading

CONFIG_FILE = 'config.json'
# A training workdir: WORKDIR/checkpoints/<step>/{state, data_iter, config, digest}
# (the digest item's format is digest.py's).
STATE, DATA_ITER, CONFIG = 'state', 'data_iter', 'config'
SUBDIR = 'checkpoints'


def config_to_dict(config) -> dict:
  """The config as plain JSON types (what config.json holds)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def save_config(path, config) -> None:
  paths.write_whole(paths.path(path) / CONFIG_FILE,
                    config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(path, defaults=None) -> ml_collections.ConfigDict:
  """The config saved in a checkpoint folder, over today's defaults (so new keys get defaults):
  `defaults()` builds them (the generator's are configs/dit_base.get_config), else base.py's."""
  from configs import base  # local: configs is a sibling package; keep import cost off the hot path
  file = paths.path(path) / CONFIG_FILE
  if not file.exists():  # a training workdir or step folder (manager.py writes them)
    path = resolve(path)
    file = path / CONFIG_FILE
    if not file.exists():
      file = path / 'config' / CONFIG_FILE
  if not file.exists():
    raise FileNotFoundError(f'{file} not found: {path} is not a vtp-jax checkpoint folder '
                            '(expected config.json beside the params).')
  if file.parent.name == CONFIG and is_step_dir(file.parent.parent):
    saved = read_step_config(file.parent.parent)
  else:
    with reading(file.parent, file.name):
      saved = json.loads(file.read_text())
  config = (defaults or base.get_config)()
  _merge(config, saved)
  return config


def read_step_config(step_dir, digests: dict | None = None) -> dict:
  """A training step's config.json as saved, checked against its digest (`digests`: the step's,
  when the caller has read them already)."""
  part = f'{CONFIG}/{CONFIG_FILE}'
  with reading(step_dir, part):
    saved = json.loads((paths.path(step_dir) / part).read_text())
  digests = saved_digests(step_dir) if digests is None else digests
  if digests and digests['config'] not in (
      None, checkpoint_digest.hexdigest(checkpoint_digest.canonical_json(saved))):
    raise CheckpointUnreadable(step_dir, part, 'digest mismatch')
  return saved


def _merge(config, saved: dict) -> None:
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
      _merge(config[key], value)
    else:
      config[key] = tuple(value) if isinstance(value, list) else value


def save_params(path, config, params, teacher=None) -> None:
  """Writes config.json, `params` and (optionally) `teacher` into the folder `path`."""
  path = paths.path(path)
  save_config(path, config)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / 'params', params, force=True)
  if teacher is not None:
    checkpointer.save(path / 'teacher', teacher, force=True)
  checkpointer.wait_until_finished()


def has_item(path, item: str) -> bool:
  if (paths.path(path) / item).exists():
    return True
  path = resolve(path)
  if is_step_dir(path) and not (path / item).exists():
    return item in state_fields(path)
  return (path / item).exists()


def load_item(path, item: str, target=None):
  """Restores one item. `target` is an abstract tree (ShapeDtypeStruct leaves with .sharding) that
  fixes the placement; without it, arrays land on the default device."""
  if not (paths.path(path) / item).exists():  # a training workdir or step folder
    path = resolve(path)
    if is_step_dir(path) and not (path / item).exists():
      return restore_subtree(path, item, target)  # a field of the saved train state
  path = paths.path(path) / item
  if not path.exists():
    raise MissingItem(f'{path} not found; the checkpoint has no {item!r} item.')
  checkpointer = ocp.StandardCheckpointer()
  with reading(path.parent, item):
    if target is None:
      metadata = checkpointer.metadata(path)
      tree = metadata.item_metadata.tree if hasattr(metadata, 'item_metadata') else metadata
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            tree)
    return checkpointer.restore(path, target)


def resolve(path) -> paths.Path:
  """A checkpoint folder itself, or the latest complete step folder under a training workdir."""
  path = paths.path(path)
  if (path / CONFIG_FILE).exists() or is_step_dir(path):
    return path
  latest = latest_step_dir(path)
  if latest is not None:
    return latest
  steps = []
  for root in (path, path / 'checkpoints'):
    if root.is_dir():
      steps += [d for d in root.iterdir() if d.name.isdigit() and (d / CONFIG_FILE).exists()]
  if not steps:
    raise FileNotFoundError(f'{path} holds no vtp-jax checkpoint (no config.json, and no step '
                            'folders with one under it or under checkpoints/).')
  return max(steps, key=lambda d: int(d.name))


# -- a training workdir's step folders ------------------------------------------------------

def checkpoint_root(workdir) -> paths.Path:
  return paths.path(workdir) / SUBDIR


def latest_step_dir(workdir) -> paths.Path | None:
  """`WORKDIR/checkpoints/<latest complete step>`, or None when the workdir has no checkpoint."""
  root = checkpoint_root(workdir)
  if not root.is_dir():
    return None
  # Orbax's own reading of the folder: only finalized steps count (never a half-written one).
  latest = ocp.path.step.latest_step_metadata(root, ocp.path.step.standard_name_format())
  return None if latest is None else paths.path(latest.path)


def is_step_dir(path) -> bool:
  path = paths.path(path)
  return (path / STATE).is_dir() and (path / CONFIG / CONFIG_FILE).exists()


def _state_tree_metadata(step_dir):
  with reading(step_dir, f'{STATE} metadata'):
    metadata = ocp.PyTreeCheckpointer().metadata(paths.path(step_dir) / STATE)
    return metadata.item_metadata.tree if hasattr(metadata, 'item_metadata') else metadata


def subtree_metadata(step_dir, key: str):
  """Shapes/dtypes of one top-level field ('params', 'teacher', ...) of a saved train state."""
  tree = _state_tree_metadata(step_dir)
  if key not in tree:
    raise MissingItem(f'{step_dir}/{STATE} has no {key!r} field (it holds {sorted(tree)}).')
  return tree[key]


def state_fields(step_dir) -> set:
  """The non-empty top-level fields of a saved train state ({'params', 'teacher', ...})."""
  return {k for k, v in _state_tree_metadata(step_dir).items() if v}


def saved_digests(step_dir) -> dict | None:
  """The digests saved with a training step (checkpoint_digest.read_files); None for a step saved
  before there were digests; CheckpointUnreadable when they cannot be read."""
  with reading(step_dir, checkpoint_digest.ITEM):
    if not checkpoint_digest.saved_with_digests(step_dir):
      return None
    return checkpoint_digest.read_files(paths.path(step_dir) / checkpoint_digest.ITEM)


def in_saved_dtypes(target, digests: dict):
  """`target` with each leaf the digests describe in its saved dtype (digests compare bytes)."""
  dtypes = checkpoint_digest.saved_dtypes(digests, target)
  return jax.tree_util.tree_map_with_path(
      lambda p, t: jax.ShapeDtypeStruct(t.shape, dtypes.get(checkpoint_digest.key_of(p), t.dtype),
                                        sharding=t.sharding), target)


def verify(step_dir, part: str, restored, digests: dict, prefix: str = '') -> None:
  """Raises CheckpointUnreadable when `restored` (a tree whose keys carry `prefix`) differs from
  what the digests say was saved."""
  problems = checkpoint_digest.verify_arrays(restored, digests, prefix)
  if problems:
    more = f' and {len(problems) - 1} more' if len(problems) > 1 else ''
    raise CheckpointUnreadable(step_dir, part, problems[0] + more)


def cast_like(tree, target):
  """`tree` in `target`'s dtypes (a no-op where they already agree)."""
  return jax.tree.map(lambda x, t: x if x.dtype == t.dtype else x.astype(t.dtype), tree, target)


def restore_subtree(step_dir, key: str, target=None):
  """One field of a saved train state (e.g. 'params'), checked against its digests; `target`
  (ShapeDtypeStructs with shardings) fixes the placement, else every array lands on the first
  local device."""
  step_dir = paths.path(step_dir)
  if target is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          subtree_metadata(step_dir, key))
  digests = saved_digests(step_dir)
  wanted = {key: target}
  read_as = in_saved_dtypes(wanted, digests) if digests else wanted
  with reading(step_dir, f'{STATE}/{key}'):
    restore_args = ocp.checkpoint_utils.construct_restore_args(read_as[key])
    restored = ocp.PyTreeCheckpointer().restore(
        step_dir / STATE,
        args=ocp.args.PyTreeRestore(item=read_as, restore_args={key: restore_args},
                                    partial_restore=True))
  if digests:
    verify(step_dir, f'{STATE}/{key}', {key: restored[key]}, digests)
  return cast_like({key: restored[key]}, wanted)[key]


def item_metadata(path, item: str):
  """Shapes/dtypes of `params` / `teacher` in a params folder or a training step folder."""
  path = paths.path(path)
  if is_step_dir(path) and not (path / item).exists():
    return subtree_metadata(path, item)
  with reading(path, f'{item} metadata'):
    md = ocp.StandardCheckpointer().metadata(path / item)
    return md.item_metadata.tree if hasattr(md, 'item_metadata') else md
