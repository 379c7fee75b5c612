"""Latent export: records read back equal Tokenizer.encode of the centre-cropped images (and of their
mirror images), the two process shards cover the dataset once, and the statistics equal NumPy's."""

import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from conftest import micro_config
from vtp_jax.eval import data as eval_data
from vtp_jax.inference import Tokenizer
from vtp_jax.models import vtp
from vtp_jax.tools import export_latents
from vtp_jax import checkpoints


def _png(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


def _saved_micro_tokenizer(path):
  """A random-init micro checkpoint on disk (parameters drawn in NumPy: no jitted init)."""
  config = micro_config()
  shapes = nn.unbox(jax.eval_shape(vtp.build(config).init, jax.random.key(0),
                                   jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 8), jnp.int32)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype),
                        shapes['params'])
  checkpoints.save_params(path, config, params)
  return Tokenizer.load(path)


def test_export_reads_back_as_encode_with_flips_shards_and_stats(tmp_path, monkeypatch):
  tok = _saved_micro_tokenizer(tmp_path / 'ckpt')
  rng = np.random.default_rng(1)
  originals = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(8)]
  source = [{'key': str(i), 'image': _png(im), 'caption': None, 'label': 10 + i}
            for i, im in enumerate(originals)]
  monkeypatch.setattr(eval_data, 'open_source', lambda config, spec, split=None: source)
  out = tmp_path / 'latents'
  first = export_latents.export(tok, tok.config, 'shapes', out, split='train', process_index=0,
                                process_count=2, batch_size=4)
  assert first['written'] == 4 and first['stats'] is None  # process 1 has not written yet
  second = export_latents.export(tok, tok.config, 'shapes', out, split='train', process_index=1,
                                 process_count=2, batch_size=4)
  assert second['written'] == 4 and second['stats'] is not None
  assert sorted(p.name for p in out.glob('latents-*')) == [
      'latents-00000-of-00002.array_record', 'latents-00001-of-00002.array_record']

  records = list(export_latents.read_latents(out))
  assert [r['index'] for r in records] == list(range(8))
  assert [r['label'] for r in records] == [10 + i for i in range(8)]
  crops = np.stack([eval_data.center_crop_arr(im, 32) for im in originals])
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  model_space = ((crops / 255 - mean) / std).astype(np.float32)
  want = np.concatenate([np.asarray(tok.encode(model_space[i:i + 4])) for i in (0, 4)])
  want_flip = np.concatenate([np.asarray(tok.encode(model_space[i:i + 4, :, ::-1]))
                              for i in (0, 4)])
  got = np.stack([r['latent'] for r in records])
  got_flip = np.stack([r['latent_flip'] for r in records])
  assert got.shape == (8, 2, 2, tok.config.model.bottleneck_dim) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_flip, want_flip, rtol=1e-5, atol=1e-6)
  assert np.abs(got_flip - got).max() > 1e-3  # flipping matters for a random encoder

  with np.load(out / 'latents_stats.npz') as f:
    np.testing.assert_allclose(f['mean'], want.reshape(-1, want.shape[-1]).mean(0), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(f['std'], want.reshape(-1, want.shape[-1]).std(0, ddof=1),
                               rtol=1e-5)
    assert int(f['count']) == 8 * 4
  # A subset of 3 images for the statistics: 3 x (2 x 2) latent vectors.
  export_latents.export(tok, tok.config, 'shapes', tmp_path / 'sub', process_index=0,
                        process_count=1, batch_size=4, stats_examples=3, max_examples=4)
  with np.load(tmp_path / 'sub' / 'latents_stats.npz') as f:
    assert int(f['count']) == 3 * 4


def test_record_format_round_trips_bfloat16_and_shards_split_evenly():
  z = np.random.default_rng(2).standard_normal((2, 3, 4)).astype(np.float32)
  rec = export_latents.read_record(export_latents.encode_record(5, -1, z, -z, 'bfloat16'))
  assert rec['index'] == 5 and rec['label'] == -1 and rec['latent'].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(rec['latent'], z.astype(ml_dtypes.bfloat16))
  np.testing.assert_array_equal(rec['latent_flip'], (-z).astype(ml_dtypes.bfloat16))
  ranges = [export_latents.shard_range(10, p, 3) for p in range(3)]
  assert ranges == [(0, 3), (3, 6), (6, 10)]
  with pytest.raises(ValueError, match='process_index'):
    export_latents.shard_range(10, 3, 3)
