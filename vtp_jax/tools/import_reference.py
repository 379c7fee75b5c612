"""Import a released VTP checkpoint (PyTorch/HF format) into a vtp-jax checkpoint.

  python -m vtp_jax.tools.import_reference --src DIR --dst DIR [--unscanned]

DIR (src) holds `config.json` and `model.safetensors` with the key names of spec 5.2, or the legacy
training names (`proj`, `transformer`, `dino_head`, `teacher_*`). Every key must map to a parameter
of the model that config.json describes, with the right shape; unknown, missing and mis-shaped keys
are all listed in one error. The RoPE period buffers are recomputed and checked, not stored.
--src and --dst may be local or in a bucket (`gs://BUCKET/...`).
"""

import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from vtp_jax import paths
from vtp_jax.models import layout
from vtp_jax.models import rope as rope_lib
from vtp_jax.models import vtp
from vtp_jax.tools import reference_format as fmt
from vtp_jax import checkpoints


def is_legacy(keys) -> bool:
  return any(k == 'proj.weight' or k.startswith(('transformer.', 'dino_head.', 'teacher_'))
             for k in keys)


def expected_shapes(config, with_dino_head: bool) -> dict:
  """'/'-joined param paths -> shapes of the model `config` describes (unrolled layout)."""
  model = vtp.build(config)
  size = config.data.image_size
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)),
      jnp.zeros((1, config.model.text.context_length), jnp.int32)))
  params = layout.unstack_blocks(nn.unbox(abstract)['params'])
  if not with_dino_head:
    params.pop('dino_head')
  return {f'params/{k}': v.shape for k, v in fmt.flatten(params).items()}


def _dino_head_from_weights(config, tensors):
  """The DINO head sizes are not in config.json: read them off the legacy weights."""
  idx = sorted(int(m.group(1)) for k in tensors if (m := re.match(r'dino_head\.mlp\.(\d+)\.weight', k)))
  if not idx:
    return
  h = config.model.dino_head
  h.nlayers = len(idx)
  h.hidden = tensors[f'dino_head.mlp.{idx[0]}.weight'].shape[0]
  h.bottleneck = tensors['dino_head.last_layer.weight_v'].shape[1]
  h.prototypes = tensors['dino_head.last_layer.weight_v'].shape[0]


def _check_periods(config, tensors, errors):
  for key, tensor in tensors.items():
    if not fmt.DERIVED_KEYS.match(key):
      continue
    tower = config.model.decoder if 'pixel_decoder' in key else config.model.encoder
    want = rope_lib.periods(rope_lib.RopeSpec(head_dim=tower.width // tower.heads,
                                              base=config.model.rope.base))
    if tensor.shape != want.shape or not np.array_equal(tensor.astype(np.float32), want):
      errors.append(f'{key}: stored RoPE periods {tensor.astype(np.float32)} differ from the '
                    f'recomputed {want}; the checkpoint uses RoPE settings we do not model.')


def read_reference(src):
  """(config, {'params': ..., ['teacher': ...]}) in our unrolled layout, numpy leaves."""
  src = paths.path(src)
  for name in ('config.json', 'model.safetensors'):
    if not (src / name).exists():
      raise FileNotFoundError(f'{os.fspath(src / name)} not found; --src must hold config.json '
                              'and model.safetensors of a released VTP checkpoint.')
  ref_config = json.loads((src / 'config.json').read_text())
  tensors = fmt.read_safetensors(src / 'model.safetensors')
  legacy = is_legacy(tensors)
  proj_key = 'proj.weight' if legacy else 'visual_proj.weight'
  if proj_key not in tensors:
    raise ValueError(f'{src}: no {proj_key!r} tensor; this is not a VTP checkpoint.')
  config = fmt.config_from_reference(ref_config, clip_dim=tensors[proj_key].shape[0])
  _dino_head_from_weights(config, tensors)
  heads = {'encoder': config.model.encoder.heads, 'decoder': config.model.decoder.heads,
           'text': config.model.text.heads}
  rules = [(re.compile(r.torch + '$'), r) for r in fmt.rules(legacy)]
  flat, unknown, errors = {}, [], []
  for key, tensor in tensors.items():
    if fmt.DERIVED_KEYS.match(key) or fmt.UNUSED_KEYS.match(key):
      continue
    for pattern, rule in rules:
      match = pattern.match(key)
      if match:
        groups = list(match.groups())
        if rule.kind.endswith('_seq'):
          groups[0] = fmt.dino_mlp_index(int(groups[0]))
        flat[rule.ours.format(*groups)] = fmt.to_ours(
            rule.kind, np.asarray(tensor, np.float32), heads.get(rule.tower, 1))
        break
    else:
      unknown.append(key)
  _check_periods(config, tensors, errors)
  want = expected_shapes(config, with_dino_head=legacy and 'params/dino_head/g' in flat)
  if legacy and any(k.startswith('teacher/') for k in flat):
    want.update({'teacher/' + k[len('params/'):]: v for k, v in want.items()
                 if k.startswith(('params/encoder/', 'params/dino_head/'))})
  missing = sorted(set(want) - set(flat))
  unexpected = sorted(set(flat) - set(want))
  shape_errors = [f'{k}: checkpoint {flat[k].shape} vs model {want[k]}'
                  for k in sorted(set(flat) & set(want)) if flat[k].shape != tuple(want[k])]
  if unknown or missing or unexpected or shape_errors or errors:
    lines = ([f'unknown key: {k}' for k in unknown] + [f'missing: {k}' for k in missing] +
             [f'not in the model: {k}' for k in unexpected] +
             [f'shape mismatch: {e}' for e in shape_errors] + errors)
    raise ValueError(f'{src} does not match the model its config.json describes:\n  ' +
                     '\n  '.join(lines))
  return config, fmt.unflatten(flat)


def import_reference(src, dst, scan_layers: bool = True):
  """Reads `src` (reference format) and writes our checkpoint folder `dst`; returns the config."""
  config, trees = read_reference(src)
  config.precision.scan_layers = scan_layers
  params = layout.to_layout(trees['params'], scan_layers)
  teacher = layout.to_layout(trees['teacher'], scan_layers) if 'teacher' in trees else None
  checkpoints.save_params(dst, config, params, teacher)
  return config


def main(argv):
  del argv
  config = import_reference(flags.FLAGS.src, flags.FLAGS.dst, scan_layers=not flags.FLAGS.unscanned)
  print(json.dumps({'dst': str(flags.FLAGS.dst), 'encoder': config.model.encoder.to_dict(),
                    'bottleneck_dim': config.model.bottleneck_dim}))


if __name__ == '__main__':
  flags.DEFINE_string('src', None, 'folder with config.json + model.safetensors (reference format; '
                      'local or gs://...)')
  flags.DEFINE_string('dst', None, 'output folder for the vtp-jax checkpoint (local or gs://...)')
  flags.DEFINE_bool('unscanned', False, 'store blocks unrolled (blocks_i) instead of scanned')
  flags.mark_flags_as_required(['src', 'dst'])
  app.run(main)
