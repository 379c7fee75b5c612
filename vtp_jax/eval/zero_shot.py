"""Zero-shot classification with the CLIP towers (spec 4.1, VTP's `test_zero_shot_hf.py`).

Each class name goes through every prompt template; the L2-normalised text embeddings of a class
are averaged and the mean renormalised (the OpenAI/OpenCLIP classifier). Images (Resize((S, S)),
no crop) give L2-normalised CLIP image embeddings; logits are `100 * image @ classes.T` with VTP's
fixed 100, not the learned scale (it does not change top-k). Reports top-1 and top-5 accuracy,
and on vtp_shapes the top-1 accuracy of each label factor (colour, shape).
"""

from typing import Callable, Iterable, Sequence

import numpy as np

from vtp_jax.eval import common
from vtp_jax.eval import data as eval_data
from vtp_jax.eval import templates as templates_lib

LOGIT_SCALE = 100.0  # VTP's fixed zero-shot logit scale [C]


def _normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_embeddings(text_features: Callable[[list[str]], np.ndarray],
                     class_names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
  """(C, D) classifier: per class, mean of the normalised embeddings of every prompt, renormalised.

  `text_features` maps a list of strings to (n, D) embeddings (normalised or not: we normalise).
  """
  if not class_names or not templates:
    raise ValueError(f'need class names and templates; got {len(class_names)} names and '
                     f'{len(templates)} templates.')
  prompts = [t.format(name) for name in class_names for t in templates]
  emb = _normalize(text_features(prompts))
  emb = emb.reshape(len(class_names), len(templates), -1)
  return _normalize(emb.mean(axis=1))


def evaluate(image_features: np.ndarray, labels: np.ndarray, classifier: np.ndarray,
             factors: dict | None = None) -> dict:
  """top-1 / top-5 accuracy of `LOGIT_SCALE * norm(image_features) @ classifier.T` vs labels.

  `factors` (eval.data.label_factors) adds '{factor}_top1': how often the top-1 class has the
  right value of that factor (the colour of a 'red star' predicted as 'red heart' is right).
  """
  labels = np.asarray(labels)
  valid = labels >= 0
  if not np.any(valid):
    raise ValueError('no labelled examples (every label is -1): zero-shot needs a labelled dataset.')
  if labels[valid].max() >= classifier.shape[0]:
    raise ValueError(f'label {labels[valid].max()} >= {classifier.shape[0]} class names: the names '
                     'do not match the dataset; fix evals.class_names.')
  logits = LOGIT_SCALE * _normalize(image_features[valid]) @ classifier.T
  metrics = {'top1': common.topk_accuracy(logits, labels[valid], 1),
             'top5': common.topk_accuracy(logits, labels[valid], 5),
             'examples': float(valid.sum())}
  predicted = np.argmax(logits, axis=-1)
  for name, (_, of) in (factors or {}).items():
    metrics[f'{name}_top1'] = float(np.mean(of(predicted) == of(labels[valid])))
  return metrics


def tokenizer_text_features(tokenizer, batch_size: int = 256) -> Callable[[list[str]], np.ndarray]:
  """Strings -> CLIP text embeddings with a Tokenizer, in fixed-size padded chunks."""
  from vtp_jax.data import text  # local: pulls in the BPE package only when prompts are encoded

  def fn(prompts):
    tokens = text.tokenize(prompts, tokenizer.config.model.text.context_length)
    out = [common.padded_call(tokenizer.clip_text_features, tokens[i:i + batch_size], batch_size)
           for i in range(0, len(tokens), batch_size)]
    return np.concatenate(out)
  return fn


def run(tokenizer, config, dataset_spec: str, *, max_examples: int | None = None,
        batches: Iterable | None = None, class_names: Sequence[str] | None = None) -> dict:
  """Zero-shot top-1/top-5 of `tokenizer` on `dataset_spec`.

  `batches` (an iterable of (uint8 images, labels)) and `class_names` replace the dataset reads,
  for tests and callers that hold data in memory.
  """
  ev = config.evals
  max_examples = ev.max_examples if max_examples is None else max_examples
  if class_names is None:
    class_names = eval_data.class_names(config, dataset_spec)
  templates = templates_lib.templates_for(ev.templates, dataset_spec)
  classifier = class_embeddings(tokenizer_text_features(tokenizer), class_names, templates)
  if batches is None:
    batches = eval_data.eval_images(config, dataset_spec, max_examples=max_examples,
                                    mode='squash')
  image_features, labels = common.map_batches(tokenizer.clip_image_features, batches,
                                              ev.batch_size)
  metrics = evaluate(image_features, labels, classifier, eval_data.label_factors(dataset_spec))
  metrics['templates'] = float(len(templates))
  return metrics
