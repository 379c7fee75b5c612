"""The Tokenizer API on the imported reference checkpoint: shapes, batching, and uint8 helpers."""

import numpy as np
import pytest

from vtp_jax import inference
from vtp_jax.inference import Tokenizer


def test_uint8_helpers_invert_each_other():
  pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  model_space = inference.to_model_space(pixels)
  # ImageNet normalisation by hand: channel 0 of pixel (0,0,0).
  want = (pixels[0, 0, 0, 0] / 255 - 0.485) / 0.229
  assert model_space[0, 0, 0, 0] == pytest.approx(want, rel=1e-6)
  # +0.5/255 keeps truncation from rounding a value down to the integer below.
  back = inference.to_uint8(model_space + 0.5 / 255 / inference.IMAGENET_STD)
  np.testing.assert_array_equal(back, pixels)
  with pytest.raises(ValueError, match='uint8'):
    inference.to_model_space(pixels.astype(np.float32))


def test_tokenizer_methods_shapes_and_chunked_batches(imported_fixture):
  tok = Tokenizer.load(imported_fixture)
  images = np.random.default_rng(1).standard_normal((5, 64, 64, 3)).astype(np.float32)
  latents = tok.encode(images)
  assert latents.shape == (5, 4, 4, 8)
  assert tok.decode(latents).shape == (5, 64, 64, 3)
  emb = np.asarray(tok.clip_image_features(images))
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
  text = np.asarray(tok.clip_text_features_from_strings(['a red circle', 'two blue squares']))
  assert text.shape == (2, 64)
  np.testing.assert_allclose(np.linalg.norm(text, axis=-1), 1.0, rtol=1e-5)
  feats = tok.features(images)
  assert feats['cls_token'].shape == (5, 64) and feats['patch_tokens'].shape == (5, 16, 64)
  layers = tok.intermediate_layers(images, 2)
  assert len(layers) == 2
  np.testing.assert_allclose(layers[-1][0], feats['patch_tokens'], rtol=1e-5, atol=1e-6)

  chunked = Tokenizer(tok.config, tok.params, batch_size=2)  # 5 = 2 + 2 + 1 (padded)
  np.testing.assert_allclose(chunked.encode(images), latents, rtol=1e-5, atol=1e-6)


def test_load_names_a_folder_that_is_not_a_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match='no vtp-jax checkpoint'):
    Tokenizer.load(tmp_path)
