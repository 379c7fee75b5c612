"""The FID InceptionV3 weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` state dict
(torch names) or its converted form ('/'-joined Flax names) -> the parameter tree of eval/fid.py,
checked against that network's shapes, without torch.

The torch state dict comes as .safetensors or .npz (named arrays, torch names such as
`Mixed_5b.branch1x1.conv.weight`); docs/evaluation.md shows the two-line torch snippet that writes
either from the .pth on a machine with torch. A converted .npz (tools/convert_fid_inception.py)
holds float32 arrays under Flax names (`Mixed_5b/branch1x1/conv/kernel`); `load_params` reads
both.

Mapping: `X.conv.weight` (O, I, kh, kw) -> `X/conv/kernel` (kh, kw, I, O); `X.bn.weight|bias|
running_mean|running_var` -> `X/scale|bias|mean|var`. `fc.*` (the 1008-way logits),
`AuxLogits.*` and `*.num_batches_tracked` are not used by pool3 and are dropped. Missing,
unexpected and mis-shaped names are all listed in one error.

Every file may be local or in a bucket (`gs://BUCKET/...`): it is read as bytes and written whole
through vtp_jax/paths.py.
"""

import io
import os

import jax
import numpy as np

from vtp_jax import paths
from vtp_jax.eval import fid
from vtp_jax.tools import reference_format

_BN_FIELDS = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'}
_IGNORED_PREFIXES = ('fc.', 'AuxLogits.')


def read_arrays(path) -> dict:
  """{name: np.ndarray} from .npz or .safetensors (no torch)."""
  path = os.fspath(path)
  if path.endswith('.npz'):
    with np.load(io.BytesIO(paths.path(path).read_bytes()), allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  if path.endswith('.safetensors'):
    return reference_format.read_safetensors(path)
  raise ValueError(f'{path}: unsupported format. Give .npz or .safetensors; a torch .pth must be '
                   'converted with torch first (docs/evaluation.md has the two lines).')


def flax_name(torch_key: str) -> str | None:
  """The '/'-joined Flax name of a torch key, or None for keys pool3 does not use."""
  if torch_key.startswith(_IGNORED_PREFIXES) or torch_key.endswith('num_batches_tracked'):
    return None
  parts = torch_key.split('.')
  if len(parts) < 3:
    return '?' + torch_key
  module, layer, field = '/'.join(parts[:-2]), parts[-2], parts[-1]
  if layer == 'conv' and field == 'weight':
    return f'{module}/conv/kernel'
  if layer == 'bn' and field in _BN_FIELDS:
    return f'{module}/{_BN_FIELDS[field]}'
  return '?' + torch_key  # not a name this network has


def _check(flat: dict, source: str) -> None:
  want = fid.param_shapes()
  missing = sorted(set(want) - set(flat))
  unexpected = sorted(set(flat) - set(want))
  misshaped = [f'{k}: {flat[k].shape} != {want[k]}' for k in sorted(set(flat) & set(want))
               if tuple(flat[k].shape) != want[k]]
  if missing or unexpected or misshaped:
    def show(items):
      return ', '.join(items[:8]) + (f' ... (+{len(items) - 8})' if len(items) > 8 else '')
    raise ValueError(f'{source} is not the FID InceptionV3 (pt_inception-2015-12-05): '
                     f'{len(missing)} missing [{show(missing)}], {len(unexpected)} unexpected '
                     f'[{show(unexpected)}], {len(misshaped)} mis-shaped [{show(misshaped)}].')


def torch_to_flax(state: dict, source: str = 'state dict') -> dict:
  """Torch-named arrays -> the nested fid.FIDInceptionV3 parameter dict (float32), checked."""
  flat = {}
  for key, value in state.items():
    name = flax_name(key)
    if name is None:
      continue
    value = np.asarray(value, np.float32)
    if name.endswith('/kernel'):
      if value.ndim != 4:
        raise ValueError(f'{source}: {key} has shape {value.shape}; a conv weight is 4-d.')
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    flat[name] = value
  _check(flat, source)
  return reference_format.unflatten(flat)


def load_any(path) -> dict:
  """Parameters from a converted file ('/' names) or a torch-named one ('.' names)."""
  arrays = read_arrays(path)
  if any('/' in k for k in arrays):
    flat = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
    _check(flat, os.fspath(path))
    return reference_format.unflatten(flat)
  return torch_to_flax(arrays, os.fspath(path))


def save(params: dict, path) -> None:
  """The converted .npz ('/'-joined Flax names, float32), written whole; '.npz' is appended to a
  name without it, as np.savez does."""
  path = os.fspath(path)
  if not path.endswith('.npz'):
    path += '.npz'
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  buf = io.BytesIO()
  np.savez(buf, **{'/'.join(k.key for k in p): np.asarray(v, np.float32) for p, v in flat})
  paths.write_whole(path, buf.getvalue())


def load_params(path) -> dict:
  """FID Inception parameters from a converted .npz or a torch-named .npz / .safetensors."""
  path = os.fspath(path)
  if not paths.path(path).exists():
    raise FileNotFoundError(f'FID weights {path} not found; see docs/evaluation.md for how to '
                            'convert pt_inception-2015-12-05-6726825d.pth, or set '
                            'evals.fid_weights to "" to skip rFID.')
  return load_any(path)
