"""Checkpoint folders on disk (Orbax) and the config saved beside them.

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


def save_config(path, config) -> None:
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(path) -> ml_collections.ConfigDict:
  """The config saved in a checkpoint folder, over today's defaults (so new keys get defaults)."""
  from configs import base  # local: configs is a sibling package; keep import cost off the hot path
  file = pathlib.Path(path) / CONFIG_FILE
  if not file.exists():
    raise FileNotFoundError(f'{file} not found: {path} is not a vtp-jax checkpoint folder '
                            '(expected config.json beside the params).')
  saved = json.loads(file.read_text())
  config = base.get_config()
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
  return (pathlib.Path(path) / item).exists()


def load_item(path, item: str, target=None):
  """Restores one item. `target` is an abstract tree (ShapeDtypeStruct leaves with .sharding) that
  fixes the placement; without it, arrays land on the default device."""
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
  if (path / CONFIG_FILE).exists():
    return path
  steps = []
  for root in (path, path / 'checkpoints'):
    if root.is_dir():
      steps += [d for d in root.iterdir() if d.name.isdigit() and (d / CONFIG_FILE).exists()]
  if not steps:
    raise FileNotFoundError(f'{path} holds no vtp-jax checkpoint (no config.json, and no step '
                            'folders with one under it or under checkpoints/).')
  return max(steps, key=lambda d: int(d.name))
