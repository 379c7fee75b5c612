"""Training metrics: on-device aggregation (clu.metrics), the writers (JSON lines, TensorBoard,
console), and the input-vs-reconstruction image grid.

The step returns replicated scalar metrics; `Accumulator` folds each step's into a clu
`Collection` on device (`single_from_model_output` + `merge` under jit: the pmap-era
`gather_from_model_output` is wrong for global arrays), so nothing leaves the devices between log
lines. Losses and norms are averaged over the window; schedule values (lr, temperatures, ...) keep
their last value. Under `train.nan_policy='skip'` a step whose update was dropped is masked out of
the averages. Only process 0 writes files; every process computes the same numbers.
"""

import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metrics as clu_metrics

from vtp_jax import paths
from vtp_jax import pixels
from vtp_jax import sharding
from vtp_jax.models import vtp

# Metrics that describe the schedule at a step rather than a quantity to average over steps.
LAST_VALUE = ('lr', 'weight_decay', 'teacher_temp', 'teacher_momentum', 'logit_scale',
              'disc_factor')
METRICS_FILE = 'metrics.jsonl'
# Shown on the console, in this order, when present; everything goes to the files.
CONSOLE = ('loss', 'clip', 'ssl', 'dino', 'ibot', 'koleo', 'rec', 'l1', 'lpips', 'g_loss', 'd_loss',
           'grad_norm', 'lr')


class Accumulator:
  """Window averages of the step metrics, kept on device until `compute`."""

  def __init__(self):
    self._collection_cls = None
    self._state = None
    self._update = None
    self._first = None

  def _build(self, names):
    fields = {n: (clu_metrics.LastValue if n in LAST_VALUE else clu_metrics.Average).from_output(n)
              for n in names}
    self._collection_cls = clu_metrics.Collection.create(**fields)
    cls = self._collection_cls

    def single(metrics):
      # clu forwards `mask` only to outputs with the same leading dim, so every value is (1,).
      out = {k: jnp.reshape(v, (1,)).astype(jnp.float32) for k, v in metrics.items()}
      skipped = metrics.get('update_skipped')
      out['mask'] = (jnp.ones((1,), bool) if skipped is None
                     else jnp.reshape(skipped, (1,)) == 0)
      return cls.single_from_model_output(**out)

    self._first = jax.jit(single)
    self._update = jax.jit(lambda state, metrics: state.merge(single(metrics)))

  def update(self, metrics: dict) -> None:
    if self._collection_cls is None:
      self._build(sorted(k for k in metrics if k != 'update_skipped'))
    if self._state is None:
      self._state = self._first(metrics)
    else:
      self._state = self._update(self._state, metrics)

  def compute(self) -> dict:
    """{name: float} over the window so far; then starts a new window."""
    if self._state is None:
      return {}
    values = jax.device_get(self._state.compute())
    self._state = None
    return {k: float(np.asarray(v)) for k, v in values.items()}


def evals_due(config, step: int, final: bool) -> bool:
  """Whether the training loop evaluates at `step` (`final`: the run's last step): the schedule
  of the evaluation rows `evaluations` reads back."""
  e = config.get('evals')
  if not e or not e.get('tasks'):
    return False
  every = int(e.get('every_steps', 0) or 0)
  return bool((every and step % every == 0) or (final and e.get('at_end', False)))


def _rows(workdir) -> list:
  path = paths.path(workdir) / METRICS_FILE
  return [json.loads(line) for line in path.read_text().splitlines()
          if line.strip()] if path.exists() else []


def evaluations(workdir) -> list:
  """The evaluation rows `Writer` wrote to workdir/metrics.jsonl, in order: (step, {name: value})
  with the 'eval/' prefix removed; [] when there is no file yet."""
  return [(r['step'], {k[len('eval/'):]: v for k, v in r.items() if k.startswith('eval/')})
          for r in _rows(workdir) if any(k.startswith('eval/') for k in r)]


class Writer:
  """metrics.jsonl + TensorBoard events (tensorboardX) in the workdir; process 0 only.

  metrics.jsonl holds each logged step once: a run resumed at `start_step` first drops the rows a
  killed run wrote after that step (it logs them again). On a disk rows are appended; a bucket
  cannot append, so there the file is rewritten whole at each log line (one object upload,
  atomic: a kill leaves the previous version), and the TensorBoard events are written locally and
  uploaded (`_EventsInBucket`; docs/checkpoints.md, 'Workdirs in a bucket').
  """

  def __init__(self, workdir, enabled: bool, start_step: int | None = None):
    self.enabled = enabled
    self._jsonl = self._tb = None
    if enabled:
      workdir = paths.path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self._path = workdir / METRICS_FILE
      self._bucket = paths.is_bucket(workdir)
      rows = _rows(workdir)
      kept = [r for r in rows if start_step is None or r['step'] <= start_step]
      self._lines = [json.dumps(r) + '\n' for r in kept]
      if len(kept) != len(rows):
        paths.write_whole(self._path, ''.join(self._lines))
      if not self._bucket:
        self._jsonl = self._path.open('a', encoding='utf-8')
      self._tb = (_EventsInBucket(workdir / 'tensorboard') if self._bucket
                  else _summary_writer(os.fspath(workdir / 'tensorboard')))

  def scalars(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    row = {'step': int(step), 'time': time.time(),
           **{k: _json_number(v) for k, v in values.items()}}
    line = json.dumps(row) + '\n'
    if self._bucket:
      self._lines.append(line)
      paths.write_whole(self._path, ''.join(self._lines))
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    for key, value in values.items():
      self._tb.add_scalar(key, value, int(step))
    self._tb.flush()

  def image(self, step: int, name: str, grid_uint8: np.ndarray) -> None:
    if self.enabled:
      self._tb.add_image(name, grid_uint8, int(step), dataformats='HWC')
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      if self._jsonl is not None:
        self._jsonl.close()
      self._tb.close()


def _summary_writer(logdir: str, suffix: str = ''):
  from tensorboardX import SummaryWriter  # local: only process 0 needs it
  return SummaryWriter(logdir=logdir, filename_suffix=suffix)


class _EventsInBucket:
  """TensorBoard events for a folder in a bucket: tensorboardX writes a local event file, and each
  flush uploads it whole (an object cannot be appended to). Once a file passes `segment_bytes` a
  new one is started, so no upload is larger; TensorBoard reads every event file of the folder."""

  def __init__(self, folder, segment_bytes: int = 8 << 20):
    import tempfile  # local: bucket workdirs only
    self._folder, self._segment_bytes = folder, segment_bytes
    self._local = tempfile.TemporaryDirectory(prefix='vtp_jax_events_')
    self._segment = 0
    self._writer = self._open()

  def _open(self):
    self._segment += 1
    return _summary_writer(os.path.join(self._local.name, str(self._segment)),
                           suffix=f'.{self._segment}')

  def _upload(self) -> None:
    folder = os.path.join(self._local.name, str(self._segment))
    for name in os.listdir(folder):
      paths.path(os.path.join(folder, name)).copy(self._folder / name, overwrite=True)

  def add_scalar(self, *args):
    self._writer.add_scalar(*args)

  def add_image(self, *args, **kwargs):
    self._writer.add_image(*args, **kwargs)

  def flush(self) -> None:
    self._writer.flush()
    self._upload()
    folder = os.path.join(self._local.name, str(self._segment))
    if sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)) > (
        self._segment_bytes):
      self._writer.close()
      self._writer = self._open()

  def close(self) -> None:
    self._writer.close()
    self._upload()
    self._local.cleanup()


def _json_number(value):
  value = float(value)
  return value if np.isfinite(value) else str(value)  # JSON has no NaN/Inf literals


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


def throughput(window_steps: int, window_s: float, global_batch: int, step_flops: float,
               peak_flops: float) -> dict:
  """Step time, images/s and (when a peak is configured) MFU of one log window."""
  step_s = window_s / max(window_steps, 1)
  out = {'perf/step_time_s': step_s, 'perf/images_per_s': global_batch / step_s}
  if peak_flops > 0:
    out['perf/mfu'] = step_flops / step_s / peak_flops
  return out


def progress_line(step: int, total: int, values: dict) -> str:
  """One console line: step, the main losses, images/s, step time, MFU and ETA."""
  parts = [f'step {step}/{total}']
  losses = ' '.join(f'{k} {values[k]:.4g}' for k in CONSOLE if k in values)
  if losses:
    parts.append(losses)
  if 'perf/images_per_s' in values:
    parts.append(f"{values['perf/images_per_s']:.1f} img/s")
    parts.append(f"{values['perf/step_time_s']:.3f} s/step")
  if 'perf/mfu' in values:
    parts.append(f"MFU {100 * values['perf/mfu']:.1f}%")
  if 'perf/step_time_s' in values:
    parts.append(f"ETA {_duration((total - step) * values['perf/step_time_s'])}")
  skipped = sum(v for k, v in values.items() if k.startswith('skipped/'))
  if skipped:
    parts.append(f'{int(skipped)} bad records skipped')
  return ' | '.join(parts)


def image_grid(inputs: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
  """(n, H, W, 3) uint8 each -> (2H, nW, 3): inputs on the top row, reconstructions below."""
  if inputs.shape != reconstructions.shape:
    raise ValueError(f'grid halves differ: {inputs.shape} vs {reconstructions.shape}')
  top = np.concatenate(list(inputs), axis=1)
  bottom = np.concatenate(list(reconstructions), axis=1)
  return np.concatenate([top, bottom], axis=0).astype(np.uint8)


def grid_source(batch: dict, n: int) -> np.ndarray:
  """The first n full-size images of a host batch (reconstruction view, else the CLIP view)."""
  for branch in ('rec', 'clip'):
    if branch in batch:
      return np.asarray(batch[branch]['image'][:n])
  raise ValueError('no full-size images in the batch for the reconstruction grid')


def make_reconstruct(config, mesh):
  """Jitted (params, uint8 images) -> uint8 reconstructions, replicated for process 0 to read."""
  model = vtp.build(config)
  rules = sharding.rules_from_config(config)
  replicated = sharding.replicated(mesh)

  def fn(params, images):
    with nn.logical_axis_rules(rules):
      x = pixels.normalize_on_device(images)
      z = model.apply({'params': params}, x, method=model.latents)
      y = model.apply({'params': params}, z, method=model.decode)
    # As pixels.to_uint8 (clamp, truncate), on device.
    return (jnp.clip(pixels.denormalize(y), 0.0, 1.0) * 255.0).astype(jnp.uint8)

  jitted = jax.jit(fn, out_shardings=replicated)

  def run(params, images_np):
    images = jax.make_array_from_callback(images_np.shape, replicated, lambda i: images_np[i])
    with jax.set_mesh(mesh):
      return np.asarray(jitted(params, images))

  return run


class ReconstructionLog:
  """The training loop's image grid: the first n full-size images of the first batch and their
  reconstructions by the current parameters (the reconstruction is compiled on first use)."""

  def __init__(self, config, mesh):
    self.config, self.mesh, self._reconstruct = config, mesh, None

  def take(self, batch: dict, n: int) -> np.ndarray:
    return grid_source(batch, n)

  def render(self, params, images: np.ndarray) -> np.ndarray:
    if self._reconstruct is None:
      self._reconstruct = make_reconstruct(self.config, self.mesh)
    return image_grid(images, self._reconstruct(params, images))


class SkipCounter:
  """Bad records the data pipeline skipped ('skipped' dict of every batch), summed over the run."""

  def __init__(self):
    from vtp_jax.data.decode import SKIP_REASONS  # local: keeps this module free of the data stack
    # Every reason starts at 0, so all processes gather arrays of the same length.
    self.totals: dict = {reason: 0 for reason in SKIP_REASONS}

  def add(self, skipped: dict | None) -> None:
    for reason, count in (skipped or {}).items():
      self.totals[reason] = self.totals.get(reason, 0) + int(np.sum(count))

  def global_totals(self) -> dict:
    """Totals over all processes (a collective: every process calls it at the same step)."""
    if jax.process_count() == 1:
      return {f'skipped/{k}': float(v) for k, v in self.totals.items()}
    from jax.experimental import multihost_utils  # local: multi-process only
    keys = sorted(self.totals)
    summed = multihost_utils.process_allgather(
        np.array([self.totals[k] for k in keys], np.int64)).sum(0)
    return {f'skipped/{k}': float(v) for k, v in zip(keys, summed)}


def log_line(line: str) -> None:
  if jax.process_index() == 0:
    logging.info('%s', line)
