"""The data sources, tools and commands with their paths in a bucket (the local GCS server of
tests/gcs_server.py): each reads or writes `gs://...` and gives what the same call gives on local
copies, which are the references (their own tests check them against NumPy and the members).

  sources     tar shards, ArrayRecord files (written by tar_to_arrayrecord into the bucket), an
              image folder and a TFDS data_dir (vtp_shapes prepared into the bucket)
  reference   import_reference from a bucket into a bucket, export_reference back
  pipeline    a tokenizer saved into the bucket -> export_latents into the bucket -> a generator
              trained on those latents with its workdir in the bucket -> generation.sample from
              it into the bucket -> `python -m vtp_jax.eval` on the bucket's tokenizer and data
"""

import concurrent.futures
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import uuid

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import micro_config
from vtp_jax import checkpoints
from vtp_jax import paths
from vtp_jax.data import shapes
from vtp_jax.data import sources
from vtp_jax.data import tar_index

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = 3


def _png(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


def _members(shard: str, n: int, seed: int, broken: bool = True) -> list:
  """(name, bytes) of one WebDataset shard: n records with an image, a caption and a label, and
  (`broken`) one record without a caption and one caption without an image (kept, to be skipped
  later)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    key = f'{shard}-{i:03d}'
    out += [(f'{key}.png', _png(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))),
            (f'{key}.txt', f'caption {shard} {i}'.encode()),
            (f'{key}.json', json.dumps({'cls': i % CLASSES}).encode())]
  if broken:
    out += [(f'{shard}-nocap.png', _png(np.zeros((8, 8, 3), np.uint8))),
            (f'{shard}-noimg.txt', b'orphan caption')]
  return out


def _write_shards(folder, shards: dict) -> None:
  """shards: {name: members}; each written as folder/name.tar."""
  folder = paths.path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  for name, members in shards.items():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w') as tar:
      for member, data in members:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (folder / f'{name}.tar').write_bytes(buf.getvalue())


def _expected(shards: dict) -> list:
  """The raw records, built from the members themselves (not through any source)."""
  out = []
  for name, members in shards.items():
    by_name = dict(members)
    for stem in dict.fromkeys(m.rpartition('.')[0] for m, _ in members):
      meta = by_name.get(stem + '.json')
      caption = by_name.get(stem + '.txt')
      out.append({'key': f'{name}.tar/{stem}', 'image': by_name.get(stem + '.png'),
                  'caption': None if caption is None else caption.decode(),
                  'label': json.loads(meta)['cls'] if meta else -1})
  return out


def _all(source) -> list:
  return [source[i] for i in range(len(source))]


def test_sources_read_the_same_records_from_a_bucket_as_from_local_copies(gcs, tmp_path,
                                                                          monkeypatch):
  bucket = gcs.bucket('bucket-tools-sources')
  shards = {'s0': _members('s0', 4, 0), 's1': _members('s1', 3, 1)}
  expected = _expected(shards)
  local = tmp_path / 'shards'
  _write_shards(local, shards)
  paths.copy_tree(local, f'{bucket}/data/shards')

  # Tar shards: read by byte range from the bucket, the index cached beside them in it.
  remote = sources.TarSource(f'{bucket}/data/shards/*.tar', label_key='cls')
  assert _all(remote) == _all(sources.TarSource(f'{local}/*.tar', label_key='cls')) == expected
  assert paths.path(f'{bucket}/data/shards/s0.tar.idx.json').exists()
  monkeypatch.setattr(tar_index, 'scan', lambda p: pytest.fail(f'{p} scanned again'))
  again = sources.TarSource(f'{bucket}/data/shards', label_key='cls')  # a folder: its *.tar
  assert len(again) == len(expected)
  monkeypatch.undo()
  # A source sent to a worker reads there, and reads from several threads at once agree.
  clone = pickle.loads(pickle.dumps(remote))
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    assert list(pool.map(clone.__getitem__, list(range(len(clone))) * 3)) == expected * 3
  remote.close()

  # tar_to_arrayrecord from the bucket into the bucket (written locally, uploaded whole).
  from vtp_jax.tools import tar_to_arrayrecord
  summary = tar_to_arrayrecord.convert(f'{bucket}/data/shards/*.tar', f'{bucket}/data/ar',
                                       records_per_file=5, label_key='cls')
  assert summary['records'] == len(expected) == 11 and len(summary['files']) == 3  # 5 + 5 + 1
  assert paths.child_names(f'{bucket}/data/ar') == [f'part-{i:05d}.array_record' for i in range(3)]
  tar_to_arrayrecord.convert(f'{local}/*.tar', str(tmp_path / 'ar'), records_per_file=5,
                             label_key='cls')
  from configs import base
  config = base.get_config()
  config.data.source = f'arrayrecord:{bucket}/data/ar'
  from_bucket = sources.make_source(config)
  config.data.source = f'arrayrecord:{tmp_path / "ar"}'
  assert _all(from_bucket) == _all(sources.make_source(config)) == expected
  with pytest.raises(FileExistsError, match='already holds'):
    tar_to_arrayrecord.convert(f'{local}/*.tar', f'{bucket}/data/ar')
  with pytest.raises(ValueError, match=r'\*\*'):
    paths.glob_files(f'{bucket}/**/*.tar')
  assert paths.glob_files(f'{tmp_path}/**/s*.tar') == [f'{local}/s0.tar', f'{local}/s1.tar']
  # The training's start-up check of data.source looks in the bucket too.
  from vtp_jax.tasks import tokenizer as tokenizer_task
  config.data.source = f'tar:{bucket}/data/shards/s*.tar'
  tokenizer_task.check_data_source(config)
  config.data.source = f'tar:{bucket}/data/none-*.tar'
  with pytest.raises(ValueError, match='no file matches'):
    tokenizer_task.check_data_source(config)

  # An image folder with captions.
  folder = paths.path(tmp_path / 'images')
  (folder / 'sub').mkdir(parents=True)
  (folder / 'a.png').write_bytes(shards['s0'][0][1])
  (folder / 'a.txt').write_text('an image')
  (folder / 'sub' / 'b.png').write_bytes(shards['s1'][0][1])
  (folder / 'c.txt').write_text('a caption alone')
  paths.copy_tree(folder, f'{bucket}/data/images')
  in_bucket = _all(sources.FolderSource(f'{bucket}/data/images'))
  assert in_bucket == _all(sources.FolderSource(str(folder)))
  assert [r['key'] for r in in_bucket] == ['a.png', 'sub/b.png', 'c.txt']
  assert in_bucket[0]['caption'] == 'an image' and in_bucket[1]['caption'] is None

  # A TFDS data_dir in the bucket: vtp_shapes prepared into it (rendered locally, uploaded).
  config = base.get_config()
  config.data.update(shapes_train_size=6, shapes_val_size=3, shapes_image_size=32)
  config.data.data_dir = f'{bucket}/tfds'
  from_bucket = _all(sources.shapes_source(config, 'validation'))
  assert paths.path(f'{bucket}/tfds/vtp_shapes').is_dir()
  config.data.data_dir = str(tmp_path / 'tfds')
  assert from_bucket == _all(sources.shapes_source(config, 'validation'))
  assert [r['label'] for r in from_bucket] == [
      shapes.render_example(i, 'validation', 32)['label'] for i in range(3)]

  # A shard rewritten in the bucket (a new object generation) is indexed again.
  paths.path(f'{bucket}/data/shards/s1.tar').write_bytes((local / 's0.tar').read_bytes())
  rewritten = sources.TarSource(f'{bucket}/data/shards/s1.tar')
  assert [r['caption'] for r in _all(rewritten)] == [r['caption'] for r in expected[:6]]


def test_a_study_folder_in_a_bucket_keeps_its_records_logs_and_tables(gcs):
  """The study's runner with its folder in a bucket: cell records written whole, a changed
  command redone (its outputs removed from the bucket), each stage's log uploaded after its
  command with the earlier runs kept, the table and figures written there."""
  from configs.study import shapes_cpu
  from vtp_jax.study import cells as cells_lib
  from vtp_jax.study import figures, results, runner
  # A name of its own per run: the lock of a study in a bucket is a local file named after it,
  # which another pytest run on this machine would share.
  bucket = gcs.bucket(f'bucket-tools-study-{uuid.uuid4().hex[:12]}')
  config = shapes_cpu.get_config()
  study = runner.Study(config, f'{bucket}/study')
  cell = study.cells[0]
  cell_dir = study.cell_dir(cell)
  assert os.fspath(cell_dir) == f'{bucket}/study/cells/{cell.name}'
  assert f'--workdir={cell_dir}/tokenizer' in cells_lib.commands(
      cell, config, cell_dir, study.judge_dir)['tokenizer']
  study._reconcile(cell)
  for stage in cells_lib.STAGES:
    runner.write_json(cell_dir / 'done' / f'{stage}.json', {'wall_s': 1.0})
  paths.write_whole(cell_dir / 'generator' / 'checkpoints' / 'x', 'a file of the old run')
  config.generator.overrides = ['train.steps=5']
  runner.Study(config, f'{bucket}/study', redo_changed=True)._reconcile(cell)
  assert paths.child_names(cell_dir / 'done') == ['export.json', 'tokenizer.json']
  assert not (cell_dir / 'generator').exists()
  assert '--config.train.steps=5' in json.loads(
      (cell_dir / 'cell.json').read_text())['commands']['generator']

  command = [sys.executable, '-c', 'import sys; print("out"); print("err", file=sys.stderr)']
  log = cell_dir / 'logs' / 'export.log'
  for _ in range(2):
    rc, out, _ = study._run(command, log)
    assert rc == 0 and out == 'out\n'
  text = log.read_text()
  assert text.count('\n$ ') == 2 and text.count('err\n') == 2 and text.count('out\n') == 2
  # A bucket has no locks: a local file named after the folder keeps a second study out.
  assert not paths.is_bucket(study.lock_path())
  study._acquire()
  try:
    with pytest.raises(RuntimeError, match='another study is running'):
      runner.Study(config, f'{bucket}/study')._acquire()
  finally:
    study._lock_file.close()
    study.lock_path().unlink()

  table = [{'cell': f'vtp-{i}', 'objective': 'vtp', 'state': 'done', 'tokenizer_flops': 10.0 ** i,
            'generation/judge_accuracy': 0.1 * i, 'reconstruction/psnr': 20.0 + i}
           for i in (1, 2, 3)]
  results.write(table, study.dir)
  written = figures.write(table, study.dir)
  assert json.loads((study.dir / 'results.json').read_text()) == table
  assert (study.dir / 'results.csv').read_text().count('\n') == 4
  assert sorted(p.name for p in written) == ['generation_vs_flops.png',
                                             'reconstruction_vs_flops.png']
  assert all(paths.is_bucket(p) and len(p.read_bytes()) > 10_000 for p in written)


def test_reference_tools_import_from_and_export_to_a_bucket(gcs, reference_fixture, tmp_path):
  from safetensors.numpy import load_file
  from vtp_jax.tools import export_reference, import_reference
  bucket = gcs.bucket('bucket-tools-reference')
  paths.copy_tree(reference_fixture, f'{bucket}/released')
  import_reference.import_reference(f'{bucket}/released', f'{bucket}/ours', scan_layers=True)
  import_reference.import_reference(reference_fixture, tmp_path / 'ours', scan_layers=True)
  got = checkpoints.load_item(f'{bucket}/ours', 'params')
  want = checkpoints.load_item(tmp_path / 'ours', 'params')
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
  export_reference.export_reference(f'{bucket}/ours', f'{bucket}/back')
  ref = load_file(reference_fixture / 'model.safetensors')  # safetensors' own file reader
  (tmp_path / 'back.safetensors').write_bytes(
      paths.path(f'{bucket}/back/model.safetensors').read_bytes())
  out = load_file(tmp_path / 'back.safetensors')
  assert sorted(out) == sorted(ref)
  for key in ref:  # the round trip through the bucket is bit-identical to the released file
    assert out[key].dtype == ref[key].dtype and out[key].tobytes() == ref[key].tobytes(), key
  assert json.loads(paths.path(f'{bucket}/back/config.json').read_text())


def _micro_tokenizer_params(config):
  """Random micro-tokenizer parameters drawn in NumPy (no jitted init)."""
  from vtp_jax.models import vtp
  shapes = nn.unbox(jax.eval_shape(vtp.build(config).init, jax.random.key(0),
                                   jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 8), jnp.int32)))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype),
                      shapes['params'])


def _generator_config(latents: str):
  """dit_tiny shrunk as tests/generation/gen_util.py does, on 2 x 2 x 8 latents of 3 classes."""
  from configs import dit_tiny
  c = dit_tiny.get_config()
  c.dit.update(width=32, depth=2, heads=2, num_classes=CLASSES, in_channels=8, input_size=2)
  c.data.update(batch_size=8, read_threads=1, read_buffer_size=8)
  c.optim.update(lr=1e-3, warmup_steps=0)
  c.flow.ema_decay = 0.9
  c.train.update(steps=2, checkpoint_every=2, log_every=1)
  c.sample.update(steps=2, batch_size=4)
  c.latents.source = f'arrayrecord:{latents}/latents-*.array_record'
  return c


def _records(out_dir) -> list:
  from vtp_jax.tools import export_latents
  return list(export_latents.read_latents(out_dir))


@pytest.mark.heavy
def test_tokenizer_latents_generator_samples_and_eval_with_every_path_in_a_bucket(gcs, tmp_path):
  from vtp_jax.generation import sample
  from vtp_jax.inference import Tokenizer
  from vtp_jax.tools import export_latents
  from vtp_jax.driver import loop
  bucket = gcs.bucket('bucket-tools-pipeline')
  local = tmp_path
  shards = {'s0': _members('s0', 8, 2, broken=False), 's1': _members('s1', 8, 3, broken=False)}
  _write_shards(local / 'shards', shards)
  paths.copy_tree(local / 'shards', f'{bucket}/shards')

  # The tokenizer: one parameter set saved into the bucket and into a folder.
  config = micro_config()
  params = _micro_tokenizer_params(config)
  checkpoints.save_params(f'{bucket}/tok', config, params)
  checkpoints.save_params(local / 'tok', config, params)
  tok = {'bucket': Tokenizer.load(f'{bucket}/tok'), 'local': Tokenizer.load(local / 'tok')}
  assert tok['bucket'].config.to_dict() == tok['local'].config.to_dict()
  for a, b in zip(jax.tree.leaves(tok['bucket'].params), jax.tree.leaves(tok['local'].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # Latents of the bucket's shards, exported into the bucket.
  out = {'bucket': f'{bucket}/latents', 'local': str(local / 'latents')}
  data = {'bucket': f'{bucket}/shards', 'local': str(local / 'shards')}
  for where in ('bucket', 'local'):
    tok[where].config.data.label_key = 'cls'
    result = export_latents.export(tok[where], tok[where].config, f'tar:{data[where]}/*.tar',
                                   out[where], process_index=0, process_count=1, batch_size=8)
    assert result['written'] == 16 and int(result['stats']['count']) == 16 * 4
  assert paths.child_names(out['bucket']) == [
      'latents-00000-of-00001.array_record', 'latents_stats.npz', 'metadata.json',
      'stats-00000-of-00001.npz']  # no temporary file left behind
  got, want = _records(out['bucket']), _records(out['local'])
  assert [(r['index'], r['label']) for r in got] == [(r['index'], r['label']) for r in want]
  assert sorted({r['label'] for r in got}) == list(range(CLASSES))
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a['latent'], b['latent'])
    np.testing.assert_array_equal(a['latent_flip'], b['latent_flip'])
  stats = [export_latents.read_npz(f'{o}/latents_stats.npz') for o in out.values()]
  for key in ('mean', 'std', 'count'):
    np.testing.assert_array_equal(stats[0][key], stats[1][key])

  # The generator trains on the bucket's latents, its workdir in the bucket.
  gen = {'bucket': f'{bucket}/gen', 'local': str(local / 'gen')}
  for where in ('bucket', 'local'):
    assert loop.train_and_evaluate(_generator_config(out[where]), gen[where])['step'] == 2
  ema = [checkpoints.load_item(g, 'ema') for g in gen.values()]
  for a, b in zip(*map(jax.tree.leaves, ema)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # Samples from the bucket's generator and tokenizer, written into the bucket.
  samples = {'bucket': f'{bucket}/samples', 'local': str(local / 'samples')}
  tokenizer = {'bucket': f'{bucket}/tok', 'local': str(local / 'tok')}
  for where in ('bucket', 'local'):
    result = sample.run(gen[where], tokenizer[where], 3, samples[where], labels='2,0', steps=2)
    assert result['out'] == f'{samples[where]}/samples.npz'
  npz = [export_latents.read_npz(f'{s}/samples.npz') for s in samples.values()]
  assert npz[0]['images'].shape == (3, 32, 32, 3)
  np.testing.assert_array_equal(npz[0]['labels'], [2, 0, 2])
  for key in ('images', 'labels'):
    np.testing.assert_array_equal(npz[0][key], npz[1][key])
  grids = [np.asarray(Image.open(io.BytesIO(paths.path(f'{s}/grid.png').read_bytes())))
           for s in samples.values()]
  np.testing.assert_array_equal(grids[0], grids[1])

  # `python -m vtp_jax.eval` on the bucket's tokenizer, data and class names; its JSON written
  # into the bucket, its metrics those of the same evaluation on the local copies, in process.
  names = 'red thing\ngreen thing\nblue thing\n'
  paths.write_whole(f'{bucket}/names.txt', names)
  (local / 'names.txt').write_text(names)
  run = subprocess.run(
      [sys.executable, '-m', 'vtp_jax.eval', f'--checkpoint={bucket}/tok', '--task=zero_shot',
       f'--dataset=tar:{bucket}/shards/*.tar', '--max_examples=0', '--set=data.label_key=cls',
       f'--set=evals.class_names={bucket}/names.txt', f'--out={bucket}/eval/zero_shot.json'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  printed = json.loads(run.stdout.strip().splitlines()[-1])
  assert json.loads(paths.path(f'{bucket}/eval/zero_shot.json').read_text()) == printed
  from vtp_jax.eval import runner
  config = tok['local'].config
  config.evals.update(class_names=str(local / 'names.txt'), max_examples=0, tasks='zero_shot',
                      dataset=f'tar:{local}/shards/*.tar')
  want = runner.run_evals(tok['local'], config)
  assert printed['metrics'].keys() == want.keys() and 'zero_shot/top1' in want
  for key, value in want.items():
    assert printed['metrics'][key] == pytest.approx(value, abs=1e-6), key
