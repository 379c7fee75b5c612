"""Training metrics: clu aggregation against NumPy, skipped updates masked out, the writers' files,
the console line and the image grid."""

import json

import jax.numpy as jnp
import numpy as np

from vtp_jax.train import metrics


def test_window_averages_match_numpy_and_skipped_steps_are_masked():
  rng = np.random.default_rng(0)
  losses = rng.uniform(1, 5, 6).astype(np.float32)
  lrs = np.linspace(1e-4, 6e-4, 6).astype(np.float32)
  skipped = np.array([0, 0, 1, 0, 0, 0], np.int32)
  losses[2] = np.nan  # the step whose update was skipped: its NaN must not poison the average
  acc = metrics.Accumulator()
  for loss, lr, s in zip(losses, lrs, skipped):
    acc.update({'loss': jnp.asarray(loss), 'lr': jnp.asarray(lr), 'update_skipped': jnp.asarray(s)})
  out = acc.compute()
  np.testing.assert_allclose(out['loss'], np.mean(losses[skipped == 0]), rtol=1e-6)
  np.testing.assert_allclose(out['lr'], lrs[-1], rtol=1e-6)  # a schedule value: the last one
  assert 'update_skipped' not in out
  acc.update({'loss': jnp.asarray(2.0), 'lr': jnp.asarray(1.0)})  # a new window starts afresh
  assert acc.compute() == {'loss': 2.0, 'lr': 1.0}
  assert acc.compute() == {}


def test_writer_files_progress_line_and_throughput(tmp_path):
  writer = metrics.Writer(tmp_path, enabled=True)
  writer.scalars(10, {'loss': 1.5, 'perf/mfu': 0.25, 'bad': float('nan')})
  writer.scalars(20, {'loss': 1.0})
  writer.image(20, 'reconstruction', np.zeros((8, 16, 3), np.uint8))
  writer.close()
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [10, 20]
  assert rows[0]['loss'] == 1.5 and rows[0]['bad'] == 'nan' and rows[1]['loss'] == 1.0
  events = list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))
  assert events and events[0].stat().st_size > 0
  silent = metrics.Writer(tmp_path / 'other', enabled=False)  # processes other than 0
  silent.scalars(1, {'loss': 1.0})
  silent.close()
  assert not (tmp_path / 'other').exists()

  perf = metrics.throughput(window_steps=10, window_s=5.0, global_batch=32, step_flops=1e12,
                            peak_flops=4e12)
  assert perf == {'perf/step_time_s': 0.5, 'perf/images_per_s': 64.0, 'perf/mfu': 0.5}
  assert 'perf/mfu' not in metrics.throughput(10, 5.0, 32, 1e12, 0.0)
  line = metrics.progress_line(100, 1000, {'loss': 1.25, 'clip': 0.5, **perf,
                                           'skipped/undecodable_image': 3.0})
  assert line.startswith('step 100/1000 | loss 1.25 clip 0.5 | 64.0 img/s | 0.500 s/step')
  assert 'MFU 50.0%' in line and 'ETA 7m30s' in line and '3 bad records skipped' in line


def test_image_grid_puts_inputs_above_reconstructions():
  inputs = np.stack([np.full((4, 4, 3), i, np.uint8) for i in range(3)])
  recons = inputs + 10
  grid = metrics.image_grid(inputs, recons)
  assert grid.shape == (8, 12, 3) and grid.dtype == np.uint8
  for i in range(3):
    assert (grid[:4, 4 * i:4 * i + 4] == i).all()
    assert (grid[4:, 4 * i:4 * i + 4] == i + 10).all()


def test_skip_counter_sums_every_reason():
  counter = metrics.SkipCounter()
  counter.add({'undecodable_image': np.int64(2), 'missing_caption': np.int64(1)})
  counter.add({'undecodable_image': np.int64(3)})
  counter.add(None)
  totals = counter.global_totals()
  assert totals['skipped/undecodable_image'] == 5.0
  assert totals['skipped/missing_caption'] == 1.0
  assert totals['skipped/missing_image'] == 0.0
