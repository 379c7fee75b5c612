"""The study's figures (matplotlib, written as PNG beside results.csv):

  generation_vs_flops.png      each generation metric against tokenizer training FLOPs, one line
                               per objective (the paper's scaling figure)
  reconstruction_vs_flops.png  PSNR and LPIPS against tokenizer FLOPs, one line per objective
  generation_vs_probe.png      each generation metric against the linear probe on the tokenizer's
                               features, every finished cell, with Pearson's r (the paper's
                               understanding-generation correlation)

Each PNG is written whole, in a folder or a bucket.
"""

import io
import math

from vtp_jax import paths
from vtp_jax.study import results

GENERATION = (('generation/judge_accuracy', 'judge accuracy (higher is better)'),
              ('generation/judge_fd', 'judge FD (lower is better)'),
              ('generation/gfid', 'gFID (lower is better)'))
RECONSTRUCTION = (('reconstruction/psnr', 'PSNR dB'), ('reconstruction/lpips', 'LPIPS'))
PROBE = ('linear_probe/n1/top1', 'linear probe top-1 (last-layer features)')


def _finite(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(float(value))


def _present(table, metrics):
  return [(k, label) for k, label in metrics if any(_finite(r.get(k)) for r in table)]


def _by_flops(ax, table, key, label):
  for objective in dict.fromkeys(r['objective'] for r in table):
    pts = sorted((r['tokenizer_flops'], r[key]) for r in table
                 if r['objective'] == objective and _finite(r.get(key)) and
                 _finite(r.get('tokenizer_flops')))
    if pts:
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o', label=objective)
  ax.set_xscale('log')
  ax.set_xlabel('tokenizer training FLOPs')
  ax.set_ylabel(label)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)


def _save(plt, fig, out) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, dpi=120, format='png')
  plt.close(fig)
  paths.write_whole(out, buf.getvalue())


def _grid_figure(plt, table, metrics, out, title: str):
  fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
  for ax, (key, label) in zip(axes[0], metrics):
    _by_flops(ax, table, key, label)
  fig.suptitle(title)
  fig.tight_layout()
  _save(plt, fig, out)


def write(table, out_dir) -> list:
  """Writes the figures that the table has data for; returns their paths."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  out_dir = paths.path(out_dir)
  done = [r for r in table if r.get('state') == 'done']
  written = []
  gen = _present(done, GENERATION)
  if gen:
    path = out_dir / 'generation_vs_flops.png'
    _grid_figure(plt, done, gen, path, 'Generation against tokenizer compute')
    written.append(path)
  rec = _present(done, RECONSTRUCTION)
  if rec:
    path = out_dir / 'reconstruction_vs_flops.png'
    _grid_figure(plt, done, rec, path, 'Reconstruction against tokenizer compute')
    written.append(path)
  probe_key, probe_label = PROBE
  if gen and any(_finite(r.get(probe_key)) for r in done):
    fig, axes = plt.subplots(1, len(gen), figsize=(4.5 * len(gen), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], gen):
      for objective in dict.fromkeys(r['objective'] for r in done):
        pts = [(r[probe_key], r[key]) for r in done if r['objective'] == objective and
               _finite(r.get(probe_key)) and _finite(r.get(key))]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=objective)
      r = results.pearson([row.get(probe_key) for row in done], [row.get(key) for row in done])
      ax.set_title(f'Pearson r = {r:.2f}')
      ax.set_xlabel(probe_label)
      ax.set_ylabel(label)
      ax.grid(True, alpha=0.3)
      ax.legend(fontsize=8)
    fig.suptitle('Generation against understanding, every cell')
    fig.tight_layout()
    path = out_dir / 'generation_vs_probe.png'
    _save(plt, fig, path)
    written.append(path)
  return written
