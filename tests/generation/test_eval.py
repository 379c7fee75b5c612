"""Generation evaluation: the judge's scores and Frechet distance from its predictions (closed
forms), and the judge's storage and its refusal below 90% on real images. The judge's training
itself is a few CPU minutes (`python -m vtp_jax.eval.judge`), run outside the suite."""

import jax
import numpy as np
import pytest

from vtp_jax.data import shapes
from vtp_jax.eval import generation
from vtp_jax.eval import judge


def test_judge_scores_are_the_fractions_and_fd_the_closed_form():
  labels = np.array([0, 7, 13, 47])  # (colour, shape) = (0,0), (1,1), (2,1), (7,5)
  rng = np.random.default_rng(0)
  features = rng.standard_normal((4, 3))
  shift = np.array([1.0, -2.0, 0.5])
  pred_gen = {'colour': np.array([0, 1, 2, 0]), 'shape': np.array([0, 0, 1, 5]),
              'features': features + shift}
  pred_real = {'colour': np.array([0, 1, 2, 7]), 'shape': np.array([0, 1, 1, 4]),
               'features': features}
  m = generation.judge_metrics(pred_gen, labels, pred_real, labels)
  assert m['judge_colour_accuracy'] == 0.75  # the last sample shows colour 0, not 7
  assert m['judge_shape_accuracy'] == 0.75  # the second shows shape 0, not 1
  assert m['judge_accuracy'] == 0.5  # both right: samples 0 and 2
  assert m['judge_real_colour_accuracy'] == 1.0 and m['judge_real_shape_accuracy'] == 0.75
  # Same covariance, means apart by `shift`: the Frechet distance is |shift|^2.
  assert m['judge_fd'] == pytest.approx(float(shift @ shift), rel=1e-6)


def test_samples_are_class_balanced():
  np.testing.assert_array_equal(generation.sample_labels(7, 3), [0, 1, 2, 0, 1, 2, 0])


def test_judge_reads_64px_shapes_and_is_refused_under_90_percent(tmp_path):
  images, colours, shape_labels = judge.render('validation', 0, 3)
  assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
  assert list(colours * len(shapes.SHAPES) + shape_labels) == [
      shapes.render_example(i, 'validation')['label'] for i in range(3)]
  params = judge._MODEL.init(jax.random.key(0), images[:1])['params']
  pred = judge.predict(params, images, batch_size=4)
  assert pred['features'].shape == (3, judge.FEATURE_DIM) and pred['colour'].shape == (3,)
  with pytest.raises(ValueError, match='uint8'):
    judge.predict(params, images[:, :32, :32])
  judge.save(tmp_path, params, {'colour': 0.99, 'shape': 0.5}, {'steps': 0})
  loaded, info = judge.load(tmp_path)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match='under 0.9'):
    judge.load_or_train(str(tmp_path))
