"""Benchmark what checkpoint digests cost and print JSON.

  python -m vtp_jax.bench.checkpoint --config=configs/vtp_s.py [--steps=3] [--rounds=2]
      [--root=gs://BUCKET/scratch] [--config.data.batch_size=8 ...]

The real train step and state of `config` (bench/common.py) run `--steps` steps in each of three
modes: no saves, an async save after every step without digests, and the same with digests (a save
every step is the worst case; the loop saves every `train.checkpoint_every` steps). The modes
alternate for `--rounds` rounds, so that a shared machine's drift touches them alike. A step is
timed as the loop lives it: the poll of the save in flight, the step, and the save's blocking part
(which waits for the previous save to commit). Then, per digest mode, saves timed on their own
(blocking part, and until committed) and restores of the newest step (`Checkpoints.restore`,
which checks the digests when they were saved); and the hashing of the whole state on its own
(host copies already made), as bytes/s. docs/checkpoints.md, 'What the digests cost', quotes it.

`--root` names where the checkpoints go: a fresh local temporary folder by default, or a folder in
a bucket (bucket mode; it is emptied at the end), which 'Workdirs in a bucket' quotes.
"""

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file', lock_config=False)
flags.DEFINE_integer('steps', 3, 'steps timed per mode and round, after one warm-up step')
flags.DEFINE_integer('rounds', 2, 'rounds over the three modes')
flags.DEFINE_integer('saves', 3, 'saves and restores timed on their own per digest mode')
flags.DEFINE_string('root', '', 'where the checkpoints go (a gs:// folder: bucket mode); default a '
                    'local temporary folder')
FLAGS = flags.FLAGS

_MODES = ('no_saves', 'saves_without_digests', 'saves_with_digests')


def _summary(times: list[float]) -> dict:
  return {'median_s': statistics.median(times), 'all_s': [round(t, 4) for t in times]}


@contextlib.contextmanager
def _scratch(root: str):
  """A folder for the saves: a local temporary one, or a fresh one under `root` removed after."""
  if not root:
    with tempfile.TemporaryDirectory(prefix='vtp_bench_ckpt_') as scratch:
      yield scratch
    return
  from vtp_jax import paths  # local: flags parse before anything heavy loads
  scratch = paths.path(root) / f'vtp_bench_ckpt_{uuid.uuid4().hex[:8]}'
  try:
    yield os.fspath(scratch)
  finally:
    paths.remove_tree(scratch)


def main(argv):
  del argv
  from vtp_jax import host_malloc  # first, before JAX starts: it may restart the process
  malloc_line = host_malloc.apply(host_malloc.mode_of(_CONFIG.value))
  import jax

  from vtp_jax.checkpoints import digest as checkpoint_digest
  from vtp_jax import tasks
  from vtp_jax.bench import common
  from vtp_jax.checkpoints import manager

  config = _CONFIG.value
  mesh, _, run, state = common.warmed_up_step(config)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)

  step_times = {mode: [] for mode in _MODES}
  save_blocking = {mode: [] for mode in _MODES[1:]}
  with _scratch(FLAGS.root) as scratch:
    managers = {mode: manager.Checkpoints(f'{scratch}/{mode}', keep=2,
                                              digests=mode == 'saves_with_digests')
                for mode in _MODES[1:]}
    saved = {mode: 0 for mode in _MODES[1:]}
    for _ in range(FLAGS.rounds):
      for mode in _MODES:
        ckpts = managers.get(mode)
        for _ in range(FLAGS.steps):
          t = time.perf_counter()
          if ckpts is not None:
            ckpts.check_save()
          state, metrics = run(state)
          if ckpts is not None:
            saved[mode] += 1
            t_save = time.perf_counter()
            ckpts.save(saved[mode], state, None, config)
            save_blocking[mode].append(time.perf_counter() - t_save)
          jax.block_until_ready(metrics)
          step_times[mode].append(time.perf_counter() - t)
        if ckpts is not None:
          ckpts.wait()  # the next mode's steps start with no save in flight

    alone = {}
    for mode, ckpts in managers.items():
      blocking, committed, restores = [], [], []
      for _ in range(FLAGS.saves):
        saved[mode] += 1
        t = time.perf_counter()
        ckpts.save(saved[mode], state, None, config)
        blocking.append(time.perf_counter() - t)
        ckpts.wait()
        committed.append(time.perf_counter() - t)
      for _ in range(FLAGS.saves):
        t = time.perf_counter()
        jax.block_until_ready(ckpts.restore(saved[mode], abstract))
        restores.append(time.perf_counter() - t)
      ckpts.close()
      alone[mode] = {'save_blocking': _summary(blocking), 'save_until_committed':
                     _summary(committed), 'restore': _summary(restores)}

  shards = checkpoint_digest.host_shards(state)
  state_bytes = sum(s.data.nbytes for s in shards)
  hash_times = []
  for _ in range(FLAGS.saves):
    t = time.perf_counter()
    checkpoint_digest.digest_record(shards, None, None)
    hash_times.append(time.perf_counter() - t)

  report = {
      'config': {**tasks.for_config(config).summary(config),
                 'remat': config.precision.remat_policy},
      'devices': [str(d.device_kind) for d in jax.devices()][:1] + [len(jax.devices())],
      'mesh': dict(mesh.shape),
      'root': FLAGS.root or 'local temporary folder',
      'state_arrays': len(jax.tree.leaves(state)),
      'state_bytes': state_bytes,
      'steps_per_mode_and_round': FLAGS.steps, 'rounds': FLAGS.rounds,
      'step_time': {mode: _summary(times) for mode, times in step_times.items()},
      'save_blocking_during_steps': {m: _summary(t) for m, t in save_blocking.items()},
      'alone': alone,
      'digest_threads': checkpoint_digest.HASH_THREADS,
      'digest': {**_summary(hash_times),
                 'bytes_per_s': state_bytes / statistics.median(hash_times)},
      'host_malloc': malloc_line,
      'jax': jax.__version__,
  }
  print(json.dumps(report, indent=1))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
  sys.exit(0)
