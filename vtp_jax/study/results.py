"""The study's table: one row per cell, read back from the cells' `done/` records.

Columns: the cell (name, objective, budget, state), the tokenizer's analytic training FLOPs and
size, wall time per stage and in all, the tokenizer's end-of-run evaluations under their own names
(zero_shot/top1, linear_probe/n1/top1, linear_probe/latent_mean/top1, reconstruction/psnr, ...)
and the generator's under `generation/` (generation/judge_accuracy, generation/judge_fd,
generation/gfid). Written as DIR/results.json and DIR/results.csv, each whole (DIR local or in a
bucket).
"""

import csv
import io
import json
import math

from vtp_jax import paths
from vtp_jax.study import cells as cells_lib

LEAD = ('cell', 'objective', 'budget', 'state', 'tokenizer_flops', 'tokenizer_steps',
        'encoder_width', 'encoder_depth', 'wall_s')


def cell_row(cell, cell_dir) -> dict:
  cell_dir = paths.path(cell_dir)
  row = {'cell': cell.name, 'objective': cell.objective, 'budget': cell.budget}
  done = cell_dir / 'done'
  wall = 0.0
  finished = 0
  for stage in cells_lib.STAGES:
    path = done / f'{stage}.json'
    if not path.exists():
      continue
    record = json.loads(path.read_text())
    finished += 1
    wall += record['wall_s']
    row[f'wall_s/{stage}'] = record['wall_s']
    for key in ('tokenizer_flops', 'tokenizer_step_flops', 'tokenizer_steps', 'encoder_width',
                'encoder_depth'):
      if key in record:
        row[key] = record[key]
    prefix = 'generation/' if stage == 'generation_eval' else ''
    for key, value in record.get('metrics', {}).items():
      row[prefix + key] = value
  row['wall_s'] = wall
  if finished == len(cells_lib.STAGES):
    row['state'] = 'done'
  elif (cell_dir / 'failed.json').exists():
    row['state'] = 'failed: ' + json.loads((cell_dir / 'failed.json').read_text())['stage']
  else:
    row['state'] = 'pending'
  return row


def rows(study_runner) -> list:
  return [cell_row(c, study_runner.cell_dir(c)) for c in study_runner.cells]


def columns(table) -> list:
  keys = {k for r in table for k in r}
  return [k for k in LEAD if k in keys] + sorted(keys - set(LEAD))


def write(table, out_dir) -> None:
  out_dir = paths.path(out_dir)
  paths.write_whole(out_dir / 'results.json', json.dumps(table, indent=1, sort_keys=True))
  cols = columns(table)
  buf = io.StringIO(newline='')
  writer = csv.DictWriter(buf, fieldnames=cols)
  writer.writeheader()
  for r in table:
    writer.writerow({k: r.get(k, '') for k in cols})
  paths.write_whole(out_dir / 'results.csv', buf.getvalue())


def pearson(xs, ys) -> float:
  """Pearson's r over the pairs where both values are finite; nan with fewer than 3 pairs."""
  pairs = [(float(x), float(y)) for x, y in zip(xs, ys)
           if x is not None and y is not None and math.isfinite(float(x)) and
           math.isfinite(float(y))]
  if len(pairs) < 3:
    return float('nan')
  n = len(pairs)
  mx = sum(p[0] for p in pairs) / n
  my = sum(p[1] for p in pairs) / n
  sxy = sum((x - mx) * (y - my) for x, y in pairs)
  sxx = sum((x - mx) ** 2 for x, _ in pairs)
  syy = sum((y - my) ** 2 for _, y in pairs)
  if sxx == 0 or syy == 0:
    return float('nan')
  return sxy / math.sqrt(sxx * syy)
