"""Linear probes: a separable synthetic problem is learned, the lr grid selects the classifier NumPy
scores best, holdout selection, per-factor probes on vtp_shapes labels, and the DINOv2 feature
layout on a micro random-init tokenizer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import micro_config
from vtp_jax.data import shapes
from vtp_jax.eval import data as eval_data
from vtp_jax.eval import linear_probe
from vtp_jax.inference import Tokenizer
from vtp_jax.models import vtp

LRS = (1e-7, 0.3)
FIT = dict(steps=150, batch_size=64, seed=0)


def _blobs(n, seed, classes=4, dim=16):
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(99).standard_normal((classes, dim)) * 3.0
  y = rng.integers(0, classes, n)
  return (centres[y] + rng.standard_normal((n, dim))).astype(np.float32), y


def test_probe_learns_a_separable_problem_and_the_grid_picks_the_best():
  train_x, train_y = _blobs(256, 0)
  eval_x, eval_y = _blobs(128, 1)
  probes = linear_probe.fit_probes(train_x, train_y, 4, LRS, **FIT)
  assert probes['w'].shape == (2, 16, 4) and probes['b'].shape == (2, 4)
  numpy_acc = [np.mean(np.argmax(eval_x @ w + b, axis=1) == eval_y)
               for w, b in zip(probes['w'], probes['b'])]
  assert numpy_acc[1] >= 0.95  # the useful lr separates the blobs
  assert numpy_acc[0] < numpy_acc[1] - 0.2  # the tiny one barely moves from its random init
  got = linear_probe.probe(train_x, train_y, eval_x, eval_y, LRS, num_classes=4, **FIT)
  assert got['best_lr'] == LRS[int(np.argmax(numpy_acc))]
  assert got['top1'] == pytest.approx(max(numpy_acc))
  np.testing.assert_allclose(got['per_lr_top1'], numpy_acc)
  assert got['top5'] == 1.0 and got['dims'] == 16

  held = linear_probe.probe(train_x, train_y, eval_x, eval_y, LRS, select='holdout', **FIT)
  assert held['best_lr'] == 0.3 and held['top1'] >= 0.95
  adam = linear_probe.probe(train_x, train_y, eval_x, eval_y, (1e-2,), optimizer='adamw', **FIT)
  assert adam['top1'] >= 0.95
  with pytest.raises(ValueError, match='probe_select'):
    linear_probe.probe(train_x, train_y, eval_x, eval_y, LRS, select='test', **FIT)


def test_factor_probes_report_a_feature_that_knows_colour_but_not_shape():
  """vtp_shapes labels: features carry the colour (a blob per colour) and no shape at all, so the
  colour probe is near 1, the shape probe near chance (1/6) and the 48-class probe near 1/6."""
  rng = np.random.default_rng(0)
  centres = np.random.default_rng(99).standard_normal((len(shapes.COLOURS), 16)) * 3.0

  def features(n):
    colour, shape = rng.integers(0, 8, n), rng.integers(0, 6, n)
    names = shapes.class_names()
    y = np.array([names.index(f'{shapes.COLOURS[c]} {shapes.SHAPES[s]}')
                  for c, s in zip(colour, shape)])
    return {'f': (centres[colour] + rng.standard_normal((n, 16))).astype(np.float32)}, y

  (train_f, train_y), (eval_f, eval_y) = features(600), features(600)
  got = linear_probe.probe_inputs(train_f, train_y, eval_f, eval_y, LRS,
                                  eval_data.label_factors('shapes:validation'), **FIT)
  assert got['f/colour_top1'] >= 0.95
  assert got['f/shape_top1'] < 0.26 and got['f/top1'] < 0.26
  assert 'f/colour_top1' not in linear_probe.probe_inputs(
      train_f, train_y, eval_f, eval_y, LRS, eval_data.label_factors('tfds:mnist'), **FIT)


def test_probe_features_follow_the_dinov2_layout_and_run_reports_them():
  config = micro_config()
  config.evals.update(batch_size=4, probe_n_blocks='2', probe_latent_pool='flatten',
                      probe_lrs='1e-3,0.1', probe_steps=20, probe_batch_size=8)
  shapes = nn.unbox(jax.eval_shape(vtp.build(config).init, jax.random.key(0),
                                   jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 8), jnp.int32)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype),
                        shapes['params'])
  tok = Tokenizer(config, params)
  images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  x = ((images / 255 - np.array([0.485, 0.456, 0.406])) /
       np.array([0.229, 0.224, 0.225])).astype(np.float32)
  feats = jax.tree.map(np.asarray, linear_probe.feature_fn(tok, (1, 2), ('mean', 'flatten'))(x))
  layers = [(np.asarray(p), np.asarray(c)) for p, c in tok.intermediate_layers(x, 2)]
  z = np.asarray(tok.encode(x))
  d = config.model.encoder.width
  np.testing.assert_allclose(feats['n1'], np.concatenate([layers[1][1], layers[1][0].mean(1)], -1),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      feats['n2'], np.concatenate([layers[0][1], layers[1][1], layers[1][0].mean(1)], -1),
      rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(feats['latent_mean'], z.mean((1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(feats['latent_flatten'], z.reshape(4, -1), rtol=1e-5, atol=1e-6)

  batches = [(images, np.array([0, 1, 0, 1]))]
  got = linear_probe.run(tok, config, 'unused', train_batches=batches, eval_batches=batches)
  assert sorted(got) == sorted(f'{k}/{m}' for k in ('n2', 'latent_flatten')
                               for m in ('top1', 'top5', 'best_lr', 'dims'))
  assert got['n2/dims'] == 3 * d and got['latent_flatten/dims'] == z[0].size
  assert all(0 <= got[f'{k}/top1'] <= 1 for k in ('n2', 'latent_flatten'))
  assert got['n2/best_lr'] in (1e-3, 0.1)
