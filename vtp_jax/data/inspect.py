"""Look at what the input pipeline feeds the step: JSON statistics, record keys, a PNG grid.

  python -m vtp_jax.data.inspect --config=configs/vtp_tiny.py [--config.data.source=tar:/d/*.tar]
      [--batches=4] [--list_keys] [--save_grid=views.png]

Prints JSON: examples seen, records skipped by reason, the first batch's shapes and dtypes, and
token statistics (mean/max length in tokens including start and end, fraction of captions
truncated to the context length). `--list_keys` runs exactly one pass over the source (this
process's share) instead of `--batches`, keeping the last partial batch, and lists the key of
every record used and of every record skipped with its reason. `--save_grid` draws the first
batch: CLIP views, reconstruction views, then each SSL example's two global crops (iBOT mask in
red) followed by its local crops. The source and --save_grid may be local or in a bucket
(`gs://BUCKET/...`).
"""

import io
import json

import numpy as np
from PIL import Image

from vtp_jax.data import pipeline, text

_MASK_TINT = np.array([255, 0, 0], np.float32)


def _flatten_shapes(batch) -> dict:
  out = {}
  for branch in ('clip', 'ssl', 'rec'):
    for field, value in batch.get(branch, {}).items():
      out[f'{branch}/{field}'] = {'shape': list(value.shape), 'dtype': str(value.dtype)}
  out['labels'] = {'shape': list(batch['labels'].shape), 'dtype': str(batch['labels'].dtype)}
  return out


def run(config, *, batches: int = 4, list_keys: bool = False, source=None) -> tuple[dict, dict]:
  """(report, first batch). With list_keys, one full pass over the source instead of `batches`."""
  config = config.copy_and_resolve_references()
  if list_keys:
    config.data.num_epochs = 1
  it = pipeline.make_iterator(config, process_index=0, process_count=1, source=source,
                              drop_remainder=not list_keys, with_keys=True)
  skipped = {}
  used, skipped_keys, lengths, truncated = [], [], [], 0
  first = None
  context = config.model.text.context_length
  n = 0
  try:
    for batch in it:
      first = first if first is not None else batch
      n += 1
      for reason, count in batch['skipped'].items():
        skipped[reason] = skipped.get(reason, 0) + int(count)
      used.extend(batch['keys'])
      skipped_keys.extend([k, r] for k, r in batch['skipped_keys'])
      if batch['captions']:
        # Untruncated length: tokenise again with room for any caption.
        full = (text.tokenize(batch['captions'], context_length=4096) != 0).sum(-1)
        lengths.extend(np.minimum(full, context).tolist())
        truncated += int((full > context).sum())
      if not list_keys and n >= batches:
        break
  finally:
    if hasattr(it, 'close'):
      it.close()
  report = {
      'source': repr(source) if source is not None else config.data.get('source'),
      'batches': n,
      'examples': len(used),
      'skipped': skipped,
      'shapes': _flatten_shapes(first) if first is not None else {},
      'tokens': {'context_length': context,
                 'mean_length': float(np.mean(lengths)) if lengths else 0.0,
                 'max_length': int(np.max(lengths)) if lengths else 0,
                 'fraction_truncated': truncated / len(lengths) if lengths else 0.0},
  }
  if list_keys:
    report['used_keys'] = used
    report['skipped_keys'] = skipped_keys
  return report, first


def _cell(image: np.ndarray, side: int) -> np.ndarray:
  """Top-left-aligned image on a grey side x side cell."""
  out = np.full((side, side, 3), 64, np.uint8)
  out[:image.shape[0], :image.shape[1]] = image
  return out


def _overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Tints the masked patches of a global crop red (mask is flat over the patch grid)."""
  grid = int(round(np.sqrt(mask.size)))
  patch = image.shape[0] // grid
  big = np.kron(mask.reshape(grid, grid), np.ones((patch, patch)))[..., None]
  return (image * (1 - 0.5 * big) + _MASK_TINT * 0.5 * big).astype(np.uint8)


def grid(batch: dict, config, max_rows: int = 4) -> np.ndarray:
  """An RGB uint8 picture of one batch's views (see the module docstring)."""
  d = config.data
  side = max(d.image_size, d.global_crop_size, d.local_crop_size)
  rows = []
  per_row = max(8, 2 + d.n_local_crops)
  for branch in ('clip', 'rec'):
    if branch in batch and len(batch[branch]['image']):
      images = batch[branch]['image'][:per_row]
      rows.append([_cell(im, side) for im in images])
  if 'ssl' in batch:
    ssl = batch['ssl']
    for i in range(min(max_rows, len(ssl['global']))):
      row = [_cell(_overlay(ssl['global'][i, c], ssl['mask'][i, c]), side) for c in range(2)]
      row += [_cell(im, side) for im in ssl['local'][i]]
      rows.append(row)
  if not rows:
    return np.zeros((side, side, 3), np.uint8)
  blank = np.zeros((side, side, 3), np.uint8)
  rows = [np.concatenate(r + [blank] * (per_row - len(r)), axis=1) for r in rows]
  return np.concatenate(rows, axis=0)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  config = f.config
  report, first = run(config, batches=f.batches, list_keys=f.list_keys)
  if f.save_grid:
    if first is None:
      raise SystemExit('no batch was produced, so there is nothing to draw; check the source.')
    from vtp_jax import paths  # pylint: disable=g-import-not-at-top
    buf = io.BytesIO()
    Image.fromarray(grid(first, config)).save(buf, format='PNG')
    paths.write_whole(f.save_grid, buf.getvalue())
    report['grid'] = f.save_grid
  print(json.dumps(report))


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'config file', lock_config=False)
  flags.DEFINE_integer('batches', 4, 'batches to read (ignored with --list_keys)')
  flags.DEFINE_bool('list_keys', False, 'one pass over the source, listing used/skipped keys')
  flags.DEFINE_string('save_grid', None, 'write a PNG grid of the first batch here')
  flags.mark_flags_as_required(['config'])
  app.run(main)
