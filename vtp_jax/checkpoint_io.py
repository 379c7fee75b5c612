"""Reading and writing parameters on disk (Orbax), and the config saved beside them.

A training workdir (written by train/checkpoints.py, whose folder layout is defined here) works
wherever a folder does: `resolve` picks its latest complete step, whose `params` and `teacher` are
read out of the saved train state. Nothing here imports train/, so inference and the tools read
checkpoints without the training stack.

A parameter checkpoint is a folder holding `config.json` (the full ml_collections config) and Orbax
PyTree items: `params` (plain nested dict) and, when present, `teacher` (the EMA encoder and DINO
head). Restores always name the target shardings, so a checkpoint loads onto any mesh.
"""

import json
import pathlib

import jax
import ml_collections
import orbax.checkpoint as ocp

CONFIG_FILE = 'config.json'
# A training workdir: WORKDIR/checkpoints/<step>/{state, data_iter, config}.
STATE, DATA_ITER, CONFIG = 'state', 'data_iter', 'config'
SUBDIR = 'checkpoints'


def config_to_dict(config) -> dict:
  """The config as plain JSON types (what config.json holds)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def save_config(path, config) -> None:
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(path, defaults=None) -> ml_collections.ConfigDict:
  """The config saved in a checkpoint folder, over today's defaults (so new keys get defaults):
  `defaults()` builds them (the generator's are configs/dit_base.get_config), else base.py's."""
  from configs import base  # local: configs is a sibling package; keep import cost off the hot path
  file = pathlib.Path(path) / CONFIG_FILE
  if not file.exists():  # a training workdir or step folder (train/checkpoints.py)
    path = resolve(path)
    file = path / CONFIG_FILE
    if not file.exists():
      file = path / 'config' / CONFIG_FILE
  if not file.exists():
    raise FileNotFoundError(f'{file} not found: {path} is not a vtp-jax checkpoint folder '
                            '(expected config.json beside the params).')
  saved = json.loads(file.read_text())
  config = (defaults or base.get_config)()
  _merge(config, saved)
  return config


def _merge(config, saved: dict) -> None:
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
      _merge(config[key], value)
    else:
      config[key] = tuple(value) if isinstance(value, list) else value


def save_params(path, config, params, teacher=None) -> None:
  """Writes config.json, `params` and (optionally) `teacher` into the folder `path`."""
  path = pathlib.Path(path).absolute()
  save_config(path, config)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / 'params', params, force=True)
  if teacher is not None:
    checkpointer.save(path / 'teacher', teacher, force=True)
  checkpointer.wait_until_finished()


def has_item(path, item: str) -> bool:
  if (pathlib.Path(path) / item).exists():
    return True
  path = resolve(path)
  if is_step_dir(path) and not (path / item).exists():
    return item in state_fields(path)
  return (path / item).exists()


def load_item(path, item: str, target=None):
  """Restores one item. `target` is an abstract tree (ShapeDtypeStruct leaves with .sharding) that
  fixes the placement; without it, arrays land on the default device."""
  if not (pathlib.Path(path) / item).exists():  # a training workdir or step folder
    path = resolve(path)
    if is_step_dir(path) and not (path / item).exists():
      return restore_subtree(path, item, target)  # a field of the saved train state
  path = pathlib.Path(path).absolute() / item
  if not path.exists():
    raise FileNotFoundError(f'{path} not found; the checkpoint has no {item!r} item.')
  checkpointer = ocp.StandardCheckpointer()
  if target is None:
    metadata = checkpointer.metadata(path)
    tree = metadata.item_metadata.tree if hasattr(metadata, 'item_metadata') else metadata
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  return checkpointer.restore(path, target)


def resolve(path) -> pathlib.Path:
  """A checkpoint folder itself, or the latest complete step folder under a training workdir."""
  path = pathlib.Path(path)
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

def checkpoint_root(workdir) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / SUBDIR


def latest_step_dir(workdir) -> pathlib.Path | None:
  """`WORKDIR/checkpoints/<latest complete step>`, or None when the workdir has no checkpoint."""
  root = checkpoint_root(workdir)
  if not root.is_dir():
    return None
  # Orbax's own reading of the folder: only finalized steps count (never a half-written one).
  latest = ocp.path.step.latest_step_metadata(root, ocp.path.step.standard_name_format())
  return None if latest is None else pathlib.Path(latest.path)


def is_step_dir(path) -> bool:
  path = pathlib.Path(path)
  return (path / STATE).is_dir() and (path / CONFIG / CONFIG_FILE).exists()


def _state_tree_metadata(step_dir):
  metadata = ocp.PyTreeCheckpointer().metadata(pathlib.Path(step_dir).absolute() / STATE)
  return metadata.item_metadata.tree if hasattr(metadata, 'item_metadata') else metadata


def subtree_metadata(step_dir, key: str):
  """Shapes/dtypes of one top-level field ('params', 'teacher', ...) of a saved train state."""
  tree = _state_tree_metadata(step_dir)
  if key not in tree:
    raise FileNotFoundError(f'{step_dir}/{STATE} has no {key!r} field (it holds {sorted(tree)}).')
  return tree[key]


def state_fields(step_dir) -> set:
  """The non-empty top-level fields of a saved train state ({'params', 'teacher', ...})."""
  return {k for k, v in _state_tree_metadata(step_dir).items() if v}


def restore_subtree(step_dir, key: str, target=None):
  """One field of a saved train state (e.g. 'params'); `target` (ShapeDtypeStructs with shardings)
  fixes the placement, else every array lands on the first local device."""
  if target is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          subtree_metadata(step_dir, key))
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  restored = ocp.PyTreeCheckpointer().restore(
      pathlib.Path(step_dir).absolute() / STATE,
      args=ocp.args.PyTreeRestore(item={key: target}, restore_args={key: restore_args},
                                  partial_restore=True))
  return restored[key]


def item_metadata(path, item: str):
  """Shapes/dtypes of `params` / `teacher` in a params folder or a training step folder."""
  path = pathlib.Path(path)
  if is_step_dir(path) and not (path / item).exists():
    return subtree_metadata(path, item)
  md = ocp.StandardCheckpointer().metadata(path.absolute() / item)
  return md.item_metadata.tree if hasattr(md, 'item_metadata') else md
