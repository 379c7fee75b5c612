"""Where a run's wall time goes: the training thread's time split into the device step, waiting for
the next batch, blocking checkpoint work, evaluation, compilation, start-up and the rest, per log
interval (metrics.jsonl and TensorBoard: `time/<part>_share`, `time/<part>_s`) and for the whole
run (the goodput is the steps' share, as MaxText reports goodput and badput).

The step is dispatched asynchronously, so the thread's time "in the step" is the dispatch plus the
waits for the device (the run-ahead bound, the NaN checks at log lines); time spent waiting for a
batch while earlier steps still run on the device shortens those waits instead of adding to them.
So a device-bound run shows its time under `step`, and a run whose input pipeline cannot keep up
shows it under `data`: the first interval whose data share passes `INPUT_BOUND_SHARE` logs one
line saying so (docs/benchmarks.md, 'Where the time goes').
"""

import contextlib
import time

from absl import logging

PARTS = ('step', 'data', 'checkpoint', 'evaluation', 'compile', 'startup', 'other')
INPUT_BOUND_SHARE = 0.10


class WallTime:
  """Accumulates the thread's time by part; `interval()` closes a log interval."""

  def __init__(self):
    self._start = self._interval_start = time.perf_counter()
    self._interval = dict.fromkeys(PARTS, 0.0)
    self._total = dict.fromkeys(PARTS, 0.0)
    self._warned = False

  @contextlib.contextmanager
  def part(self, name: str):
    t0 = time.perf_counter()
    try:
      yield
    finally:
      elapsed = time.perf_counter() - t0
      self._interval[name] += elapsed
      self._total[name] += elapsed

  def startup_done(self) -> None:
    """Books the time since the start that no part measured as 'startup' (distributed init, the
    data iterator, the state's init, the step's construction)."""
    now = time.perf_counter()
    unmeasured = max(now - self._start - sum(self._total.values()), 0.0)
    self._interval['startup'] += unmeasured
    self._total['startup'] += unmeasured

  def interval(self) -> dict:
    """The interval since the last call as metrics ({'time/data_share': ..., 'time/data_s': ...};
    'other' is what no part measured), then starts the next one."""
    now = time.perf_counter()
    wall = max(now - self._interval_start, 1e-9)
    parts = dict(self._interval)
    parts['other'] = max(wall - sum(v for k, v in parts.items() if k != 'other'), 0.0)
    self._total['other'] += parts['other']
    self._interval = dict.fromkeys(PARTS, 0.0)
    self._interval_start = now
    out = {}
    for name, seconds in parts.items():
      out[f'time/{name}_s'] = seconds
      out[f'time/{name}_share'] = seconds / wall
    return out

  def check_input_bound(self, values: dict, worker_count) -> None:
    """Logs once, at the first interval whose batch wait passes INPUT_BOUND_SHARE of its time;
    `worker_count()` gives the input pipeline's worker processes for the line."""
    share = values.get('time/data_share', 0.0)
    if not self._warned and share > INPUT_BOUND_SHARE:
      self._warned = True
      logging.warning('Input-bound: the training thread waited for its batches %.0f%% of the last '
                      'interval (more than %.0f%%); raise data.worker_count (%s) or shrink the '
                      'sources (python -m vtp_jax.tools.resize_shards).', 100 * share,
                      100 * INPUT_BOUND_SHARE, worker_count())

  def totals(self) -> dict:
    """The whole run: seconds per part ('other' includes the time since the last interval), the
    wall time, and each part's share ('goodput' is the steps')."""
    wall = max(time.perf_counter() - self._start, 1e-9)
    totals = dict(self._total)
    totals['other'] += max(wall - sum(totals.values()), 0.0)
    return {'wall_s': wall, 'seconds': totals,
            'shares': {k: v / wall for k, v in totals.items()},
            'goodput': totals['step'] / wall}

  @staticmethod
  def summary_line(totals: dict) -> str:
    shares = ', '.join(f'{name} {100 * totals["shares"][name]:.1f}%' for name in PARTS)
    return (f'Wall time {totals["wall_s"]:.1f} s: {shares}; goodput (the steps\' share) '
            f'{100 * totals["goodput"]:.1f}%.')
