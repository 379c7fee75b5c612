"""Two JAX processes on this machine (jax.distributed on CPU): disjoint shares, one global batch."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import tarfile
import textwrap

from conftest import micro_config
from test_pipeline import _add, _encode, _picture, write_shards  # shard writers, same folder

REPO = pathlib.Path(__file__).resolve().parents[2]

_WORKER = textwrap.dedent('''
    import json, os, sys
    import numpy as np
    import jax
    process_id, port, source, index_dir, out = sys.argv[1:6]
    jax.distributed.initialize(f'localhost:{port}', num_processes=2, process_id=int(process_id),
                               initialization_timeout=120)
    from configs import vtp_tiny  # not conftest: its 8-device XLA flag would override ours
    from vtp_jax import sharding
    from vtp_jax import batch as batch_lib
    from vtp_jax.data import device, pipeline
    config = vtp_tiny.get_config()
    config.data.image_size = 32
    config.model.text.context_length = 8
    config.data.update(batch_size=32, num_epochs=1, source=source, index_cache_dir=index_dir,
                       read_threads=2)
    # process_index / process_count come from jax.distributed.
    batches = list(pipeline.make_iterator(config, drop_remainder=False, with_keys=True))
    keys = [k for b in batches for k in b['keys']]
    skipped = [list(k) for b in batches for k in b['skipped_keys']]
    mesh = sharding.make_mesh(config.mesh)  # data axis over all 4 devices of both processes
    glob = device.to_global(batches[0], mesh, batch_lib.batch_shapes(config))
    local_ok = True
    for branch, fields in glob.items():
      for field, array in fields.items():
        shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start)
        mine = np.concatenate([np.asarray(s.data) for s in shards])
        local_ok &= bool(np.array_equal(mine, batches[0][branch][field]))
    json.dump({'keys': keys, 'skipped': skipped, 'local_ok': local_ok,
               'process_count': jax.process_count(), 'devices': jax.device_count(),
               'shapes': {f'{b}/{f}': list(a.shape) for b, fs in glob.items()
                          for f, a in fs.items()}}, open(out, 'w'))
    jax.distributed.shutdown()
''')


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_see_disjoint_shares_and_build_one_global_batch(tmp_path):
  shards = tmp_path / 'shards'
  shards.mkdir()
  good, bad = write_shards(shards)
  with tarfile.open(shards / 'c.tar', 'w') as tar:
    for i in range(40):
      _add(tar, f'{i:05d}.jpg', _encode(_picture(100 + i, 24, 24)))
      _add(tar, f'{i:05d}.txt', f'extra {i}'.encode())
      good[f'c.tar/{i:05d}'] = -1
  source, index_dir = f'tar:{shards}/*.tar', str(tmp_path / 'index')
  # Build the shard indexes once, so the two processes do not race to write them.
  from vtp_jax.data import sources
  config = micro_config()
  config.data.update(source=source, index_cache_dir=index_dir)
  assert len(sources.make_source(config)) == len(good) + len(bad)

  script = tmp_path / 'worker.py'
  script.write_text(_WORKER)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO),
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), source, index_dir,
                             str(tmp_path / f'out{i}.json')], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=240)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  outs = [json.loads((tmp_path / f'out{i}.json').read_text()) for i in range(2)]

  for out in outs:
    assert out['process_count'] == 2 and out['devices'] == 4
    assert out['local_ok']  # each process's addressable shards hold exactly its own rows
    assert out['shapes'] == {'clip/image': [32, 32, 32, 3], 'clip/tokens': [32, 8],
                             'ssl/global': [8, 2, 64, 64, 3], 'ssl/local': [8, 4, 32, 32, 3],
                             'ssl/mask': [8, 2, 16], 'rec/image': [4, 32, 32, 3]}
  keys = [set(out['keys']) for out in outs]
  assert all(len(k) == len(out['keys']) for k, out in zip(keys, outs))  # no repeats
  assert not keys[0] & keys[1]
  assert keys[0] | keys[1] == set(good)  # one pass: every usable record, once
  skipped = [tuple(k) for out in outs for k in out['skipped']]
  assert dict(skipped) == bad and len(skipped) == len(bad)
