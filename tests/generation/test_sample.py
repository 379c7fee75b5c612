"""`python -m vtp_jax.generation.sample`: a generator checkpoint and a tokenizer in, samples.npz and
grid.png out, sharded over the 8 test devices, decoded by Tokenizer.decode."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from conftest import micro_config as tokenizer_micro_config
from gen_util import micro_config, write_latents
from vtp_jax import tasks
from vtp_jax import checkpoints
from vtp_jax import pixels
from vtp_jax import sharding
from vtp_jax.generation import sample
from vtp_jax.generation.generator import Generator
from vtp_jax.inference import Tokenizer
from vtp_jax.models import vtp
from vtp_jax.checkpoints import manager
from vtp_jax.train import state as state_lib


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """(generator workdir at its initial state, tokenizer folder, the latent statistics)."""
  root = tmp_path_factory.mktemp('sample')
  stats = write_latents(root / 'latents', n=4, shards=1)
  config = micro_config()
  config.latents.source = f'arrayrecord:{root}/latents/latents-*.array_record'
  mesh = sharding.make_mesh(config.mesh)
  state, _, _ = tasks.for_config(config).create_state(config, mesh)
  ckpts = manager.Checkpoints(root / 'gen', 1)
  ckpts.save(0, state, None, config)
  ckpts.close()
  tok_config = tokenizer_micro_config()  # 32 px images -> 2 x 2 x 8 latents, as the generator's
  model = vtp.build(tok_config)
  images, tokens = state_lib._init_inputs(tok_config)
  params = jax.jit(lambda k: nn.unbox(model.init({'params': k}, images, tokens)['params']))(
      jax.random.key(0))
  checkpoints.save_params(root / 'tok', tok_config, params)
  return root / 'gen', root / 'tok', stats


def test_sample_writes_images_labels_and_grid_decoded_by_the_tokenizer(saved, tmp_path):
  gen_dir, tok_dir, _ = saved
  result = sample.run(str(gen_dir), str(tok_dir), 5, str(tmp_path), labels='2,0', steps=3,
                      solver='heun', cfg_scale=2.0)
  assert result['images'] == 5 and result['shape'] == [32, 32, 3]
  with np.load(tmp_path / 'samples.npz') as f:
    images, labels = f['images'], f['labels']
  assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.array([2, 0, 2, 0, 2], np.int32))
  assert Image.open(tmp_path / 'grid.png').size == (96, 64)  # 3 columns x 2 rows of 32 px
  # The same latents decoded unsharded, one image at a time, by a fresh Tokenizer.
  gen = Generator.load(gen_dir)
  z = gen.sample_latents(labels, seed=0, steps=3, solver='heun', cfg_scale=2.0)
  tok = Tokenizer.load(tok_dir)
  again = np.concatenate([pixels.to_uint8(np.asarray(tok.decode(z[i:i + 1]))) for i in range(5)])
  assert np.abs(again.astype(int) - images.astype(int)).max() <= 1  # float rounding at .5


def test_an_untrained_generator_returns_its_noise_in_the_tokenizers_latent_space(saved):
  """The output layer starts at zero, so v = 0 and the ODE leaves the noise unchanged: the latents
  are N(0, I) mapped back by z * std + mean with the exported statistics."""
  gen_dir, _, stats = saved
  gen = Generator.load(gen_dir, weights='params')
  z = gen.sample_latents(np.zeros(64, np.int32), seed=1, steps=2)
  unit = ((z - stats['mean']) / stats['std']).reshape(-1, z.shape[-1])  # 256 values a channel
  np.testing.assert_allclose(unit.mean(0), 0.0, atol=0.25)
  np.testing.assert_allclose(unit.std(0), 1.0, atol=0.15)


def test_labels_are_checked_against_the_classes():
  np.testing.assert_array_equal(sample.parse_labels('', 5, 3), [0, 1, 2, 0, 1])
  with pytest.raises(ValueError, match='outside'):
    sample.parse_labels('1,7', 4, 3)
  with pytest.raises(ValueError, match='integer'):
    sample.parse_labels('a,b', 4, 3)
