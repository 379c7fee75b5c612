"""Evaluation of a trained generator: gFID against a dataset's images (Inception weights supplied by
the user, as rFID), and on vtp_shapes the offline judge (eval/judge.py):

  judge_accuracy         fraction of samples whose main colour and shape both match their label
  judge_colour_accuracy, judge_shape_accuracy   each factor alone
  judge_fd               Frechet distance between samples and real images in the judge's 256-d
                         feature space (an FID whose network knows this dataset)
  judge_real_colour_accuracy, judge_real_shape_accuracy   the judge on the real images used, so a
                         reader sees how far to trust it (>= 0.9 each, or it is refused)

Samples are class-balanced: label i % num_classes for i < num_images, one seed.
"""

import numpy as np

from vtp_jax.eval import data as eval_data
from vtp_jax.eval import fid


def sample_labels(num_images: int, num_classes: int) -> np.ndarray:
  return (np.arange(num_images) % num_classes).astype(np.int32)


def judge_metrics(pred_gen: dict, labels, pred_real: dict, real_labels) -> dict:
  """The judge's scores from its predictions ({'colour', 'shape', 'features'}) on generated images
  with their conditioning labels and on real images with theirs."""
  from vtp_jax.data import shapes
  factors = shapes.label_factors()
  colour, shape = (factors[k][1](labels) for k in ('colour', 'shape'))
  real_colour, real_shape = (factors[k][1](real_labels) for k in ('colour', 'shape'))
  ok_colour, ok_shape = pred_gen['colour'] == colour, pred_gen['shape'] == shape
  stats = []
  for feats in (pred_gen['features'], pred_real['features']):
    acc = fid.RunningStats(feats.shape[1])
    acc.update(feats)
    stats.append(acc.mean_cov())
  return {'judge_accuracy': float(np.mean(ok_colour & ok_shape)),
          'judge_colour_accuracy': float(np.mean(ok_colour)),
          'judge_shape_accuracy': float(np.mean(ok_shape)),
          'judge_fd': fid.frechet_distance(*stats[0], *stats[1]),
          'judge_real_colour_accuracy': float(np.mean(pred_real['colour'] == real_colour)),
          'judge_real_shape_accuracy': float(np.mean(pred_real['shape'] == real_shape))}


def real_images(config, dataset_spec: str, max_examples: int) -> tuple[np.ndarray, np.ndarray]:
  batches = list(eval_data.eval_images(config, dataset_spec, max_examples=max_examples))
  if not batches:
    raise ValueError(f'{dataset_spec} gave no images.')
  return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def run(generator, tokenizer, dataset_spec: str, *, num_images: int, max_real: int = 0,
        fid_params=None, judge_dir: str | None = None, judge: bool = True, seed: int = 0,
        **overrides) -> dict:
  """Metrics of `generator` (a generation.generator.Generator) decoded by `tokenizer` against
  `dataset_spec` (read with the tokenizer's data config, centre-cropped to its image size)."""
  config = tokenizer.config
  labels = sample_labels(num_images, int(generator.config.dit.num_classes))
  images, labels = generator.generate(tokenizer, labels, seed=seed, **overrides)
  real, real_labels = real_images(config, dataset_spec, max_real or num_images)
  if images.shape[1:] != real.shape[1:]:
    raise ValueError(f'generated images {images.shape[1:]} and {dataset_spec} images '
                     f'{real.shape[1:]} differ; the generator and tokenizer must match the data.')
  metrics = {'examples': float(images.shape[0]), 'real_examples': float(real.shape[0])}
  if fid_params is not None:
    acts = [fid.activations(fid_params, x) for x in (images, real)]
    stats = []
    for a in acts:
      s = fid.RunningStats(a.shape[1])
      s.update(a)
      stats.append(s.mean_cov())
    metrics['gfid'] = fid.frechet_distance(*stats[0], *stats[1])
  if judge and dataset_spec.split(':')[0] == 'shapes':
    from vtp_jax.eval import judge as judge_lib
    params, _ = judge_lib.load_or_train(str(judge_dir or judge_lib.default_dir(config)))
    if images.shape[1] != judge_lib.IMAGE_SIZE:
      raise ValueError(f'the judge reads {judge_lib.IMAGE_SIZE} px vtp_shapes images; these are '
                       f'{images.shape[1]} px.')
    metrics.update(judge_metrics(judge_lib.predict(params, images), labels,
                                 judge_lib.predict(params, real), real_labels))
  return metrics
