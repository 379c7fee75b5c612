"""The inspection tool (JSON report, key listing, PNG grid) and the data benchmark."""

import json
import os
import pathlib
import subprocess
import sys

import instant_clip_tokenizer
import numpy as np
from conftest import micro_config
from PIL import Image
from test_pipeline import write_shards  # shard writer, same folder

from vtp_jax.bench import data as bench_data
from vtp_jax.data import inspect

REPO = pathlib.Path(__file__).resolve().parents[2]


def _tar_config(tmp_path):
  (tmp_path / 'shards').mkdir()
  good, bad = write_shards(tmp_path / 'shards')
  config = micro_config()
  config.data.update(batch_size=4, source=f'tar:{tmp_path}/shards/*.tar',
                     index_cache_dir=str(tmp_path / 'index'), read_threads=2)
  return config, good, bad


def test_list_keys_accounts_for_every_record_and_token_stats(tmp_path):
  config, good, bad = _tar_config(tmp_path)
  report, first = inspect.run(config, list_keys=True)
  assert sorted(report['used_keys']) == sorted(good)  # 10 good records: 2 full batches + 2
  assert dict(map(tuple, report['skipped_keys'])) == bad
  assert report['examples'] == len(good)
  assert report['skipped'] == {r: 1 for r in ('missing_image', 'missing_caption',
                                              'empty_caption', 'undecodable_image')}
  assert report['shapes']['clip/tokens'] == {'shape': [4, 8], 'dtype': 'int32'}
  assert report['shapes']['ssl/mask'] == {'shape': [1, 2, 16], 'dtype': 'bool'}
  # Token statistics against the BPE directly: the write_shards captions of the good records.
  captions = [f'a good picture {i}' for i in range(7)] + ['cmyk photo', 'grey photo',
                                                          'a 10x10 photo']
  tok = instant_clip_tokenizer.Tokenizer()
  full = np.array([len(tok.encode(c)) + 2 for c in captions])
  assert report['tokens']['max_length'] == min(full.max(), 8)
  assert abs(report['tokens']['mean_length'] - np.minimum(full, 8).mean()) < 1e-9
  assert report['tokens']['fraction_truncated'] == (full > 8).mean()
  assert json.dumps(report)  # JSON-serialisable as printed


def test_grid_tints_masked_patches_red():
  config = micro_config()
  config.data.update(n_local_crops=2)
  batch = {'ssl': {'global': np.zeros((1, 2, 64, 64, 3), np.uint8),
                   'local': np.full((1, 2, 32, 32, 3), 200, np.uint8),
                   'mask': np.zeros((1, 2, 16), bool)}}
  batch['ssl']['mask'][0, 0, 5] = True  # patch row 1, column 1 of the 4x4 grid (16 px patches)
  picture = inspect.grid(batch, config)
  assert picture.dtype == np.uint8 and picture.shape == (64, 64 * 8, 3)
  assert (picture[16:32, 16:32] == [127, 0, 0]).all()
  assert picture[:16, :64].max() == 0 and picture[:, 64:128].max() == 0  # unmasked, crop 2
  assert (picture[:32, 128:160] == 200).all()  # first local crop, top-left of its cell


def test_cli_prints_json_and_saves_a_grid(tmp_path):
  config, good, _ = _tar_config(tmp_path)
  png = tmp_path / 'grid.png'
  result = subprocess.run(
      [sys.executable, '-m', 'vtp_jax.data.inspect', '--config=configs/vtp_tiny.py',
       f'--config.data.source={config.data.source}',
       f'--config.data.index_cache_dir={config.data.index_cache_dir}',
       '--config.data.batch_size=8', '--batches=1', f'--save_grid={png}'],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
      timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout)
  assert report['batches'] == 1 and report['examples'] == 8
  assert report['shapes']['clip/image']['shape'] == [8, 64, 64, 3]
  # vtp_tiny: cells of 64 px, 8 per row (2 global + 4 local < 8); rows: clip, rec (1 image),
  # and one per SSL example (8 / 4 = 2).
  assert Image.open(png).size == (64 * 8, 64 * 4)


def test_bench_reports_images_per_second():
  config = micro_config()
  config.data.batch_size = 8
  out = bench_data.bench(config, workers=0, batches=2,
                         source=bench_data.SyntheticSource(12, side=48))
  assert out['batch_size'] == 8 and out['batches'] == 2
  assert out['branches'] == ['clip', 'ssl', 'rec']
  assert abs(out['images_per_s'] - 16 / out['seconds']) < 1e-6 and out['images_per_s'] > 0
