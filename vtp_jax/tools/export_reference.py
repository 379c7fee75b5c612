"""Export a vtp-jax checkpoint to the released VTP format (config.json + model.safetensors).

  python -m vtp_jax.tools.export_reference --src DIR --dst DIR [--legacy]

The output loads in the reference PyTorch `VTPModel`. `--legacy` writes the training-class names
(`proj`, `transformer`) and adds the DINO head and the EMA teacher when the checkpoint holds them.
Float32 tensors are written as float32 and the RoPE period buffers as bfloat16, as the reference.
--src and --dst may be local or in a bucket (`gs://BUCKET/...`); each file is written whole,
config.json first and model.safetensors last.
"""

import json
import re

import jax
import ml_dtypes
import numpy as np
from absl import app, flags
from safetensors.numpy import save as save_safetensors

from vtp_jax import paths
from vtp_jax.models import layout
from vtp_jax.models import rope as rope_lib
from vtp_jax.tools import reference_format as fmt
from vtp_jax import checkpoints


def _template(rule: fmt.Rule) -> tuple[re.Pattern, str]:
  """Our-path regex of a rule, and the PyTorch key template it fills."""
  ours = re.compile(re.escape(rule.ours).replace(r'\{0\}', r'(\d+)') + '$')
  torch = rule.torch.replace(r'(\d+)', '{0}').replace('\\', '')
  return ours, torch


def to_reference(config, params, teacher=None, legacy: bool = False) -> dict:
  """Our (any-layout) params -> {PyTorch key: numpy array} of the released format."""
  trees = {'params': layout.unstack_blocks(params)}
  if not legacy:
    trees['params'] = {k: v for k, v in trees['params'].items() if k != 'dino_head'}
  elif teacher is not None:
    trees['teacher'] = layout.unstack_blocks(teacher)
  templates = [(*_template(rule), rule) for rule in fmt.rules(legacy)]
  out, unmapped = {}, []
  for name, tree in trees.items():
    for path, value in fmt.flatten(tree, name).items():
      for pattern, torch_template, rule in templates:
        match = pattern.match(path)
        if match:
          groups = list(match.groups())
          if rule.kind.endswith('_seq'):
            groups[0] = int(groups[0]) * 2
          tensor = fmt.to_torch(rule.kind, np.asarray(jax.device_get(value), np.float32))
          # C order: safetensors writes the raw buffer, and ascontiguousarray turns 0-d into 1-d.
          out[torch_template.format(*groups)] = np.ascontiguousarray(tensor).reshape(tensor.shape)
          break
      else:
        unmapped.append(path)
  if unmapped:
    raise ValueError('parameters with no reference name (is the model outside the released '
                     'architecture?):\n  ' + '\n  '.join(unmapped))
  prefixes = ['trunk', 'pixel_decoder'] + (['teacher_trunk'] if 'teacher' in trees else [])
  for prefix in prefixes:
    tower = config.model.decoder if prefix == 'pixel_decoder' else config.model.encoder
    spec = rope_lib.RopeSpec(head_dim=tower.width // tower.heads, base=config.model.rope.base,
                             dtype='bfloat16')  # the reference buffer is always bfloat16
    out[f'{prefix}.rope_embed.periods'] = rope_lib.periods(spec).astype(ml_dtypes.bfloat16)
  return out


def export_reference(src, dst, legacy: bool = False) -> dict:
  config = checkpoints.load_config(src)
  params = checkpoints.load_item(src, 'params')
  teacher = (checkpoints.load_item(src, 'teacher') if checkpoints.has_item(src, 'teacher')
             else None)
  tensors = to_reference(config, params, teacher, legacy)
  dst = paths.path(dst)
  paths.write_whole(dst / 'config.json', json.dumps(fmt.reference_from_config(config), indent=2))
  paths.write_whole(dst / 'model.safetensors',
                    save_safetensors(tensors, metadata={'format': 'pt'}))
  return tensors


def main(argv):
  del argv
  with checkpoints.report_unreadable():  # a damaged checkpoint: one line, exit status 2
    tensors = export_reference(flags.FLAGS.src, flags.FLAGS.dst, flags.FLAGS.legacy)
  print(json.dumps({'dst': flags.FLAGS.dst, 'tensors': len(tensors)}))


if __name__ == '__main__':
  flags.DEFINE_string('src', None, 'vtp-jax checkpoint folder (config.json + params; local or '
                      'gs://...)')
  flags.DEFINE_string('dst', None, 'output folder for config.json + model.safetensors (local or '
                      'gs://...)')
  flags.DEFINE_bool('legacy', False, 'write legacy training-class names, DINO head and teacher')
  flags.mark_flags_as_required(['src', 'dst'])
  app.run(main)
