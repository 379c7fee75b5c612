"""Small pieces every evaluator shares: comma-list config values and KEY=VALUE overrides,
fixed-shape batched calls, running a tokenizer method over (images, labels) batches, top-k.
"""

from typing import Callable, Iterable

import jax
import numpy as np

from vtp_jax import pixels


def parse_list(text, cast=float, name: str = 'value') -> tuple:
  """'1,4' -> (1, 4); a tuple/list or a single number passes through."""
  if isinstance(text, (list, tuple)):
    return tuple(cast(t) for t in text)
  if isinstance(text, (int, float)):
    return (cast(text),)
  try:
    return tuple(cast(t) for t in str(text).split(',') if t.strip())
  except ValueError:
    raise ValueError(f'{name}={text!r} is not a comma-separated list of {cast.__name__}.') from None


def apply_override(config, assignment: str) -> None:
  """'a.b=value' -> config.a.b = value, converted to the type of the current value."""
  if '=' not in assignment:
    raise ValueError(f'--set {assignment!r}: expected KEY=VALUE.')
  key, value = assignment.split('=', 1)
  *parents, leaf = key.strip().split('.')
  node = config
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise ValueError(f'--set {key}: no such config key.')
  old = node[leaf]
  if isinstance(old, bool):
    if value.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(f'--set {key}={value}: expected true or false.')
    node[leaf] = value.lower() in ('true', '1')
  elif isinstance(old, (int, float, str)):
    node[leaf] = type(old)(value)
  else:
    node[leaf] = value


def padded_call(fn: Callable, images: np.ndarray, batch_size: int):
  """fn(images) with the batch padded to `batch_size`, so jit compiles once; outputs sliced back."""
  n = images.shape[0]
  if n > batch_size:
    raise ValueError(f'batch of {n} exceeds batch_size {batch_size}.')
  if n < batch_size:
    images = np.concatenate([images, np.zeros((batch_size - n,) + images.shape[1:], images.dtype)])
  return jax.tree.map(lambda y: np.asarray(y)[:n], fn(images))


def map_batches(fn: Callable, batches: Iterable, batch_size: int, model_space: bool = True):
  """Runs fn over every (uint8 images, labels) batch; returns (stacked outputs, labels).

  `fn` takes model-space float32 images (or the uint8 batch when model_space is False) and returns
  an array or a pytree of arrays; outputs are concatenated on the host along axis 0.
  """
  outputs, labels = [], []
  for images, batch_labels in batches:
    for start in range(0, images.shape[0], batch_size):
      chunk = images[start:start + batch_size]
      x = pixels.to_model_space(chunk) if model_space else chunk
      outputs.append(padded_call(fn, x, batch_size))
      labels.append(np.asarray(batch_labels[start:start + batch_size]))
  if not outputs:
    raise ValueError('the evaluation dataset yielded no images (empty, or every record skipped).')
  stacked = jax.tree.map(lambda *ys: np.concatenate(ys), *outputs)
  return stacked, np.concatenate(labels).astype(np.int64)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of rows whose label is among the k largest logits (k capped at the class count)."""
  logits = np.asarray(logits)
  k = min(k, logits.shape[-1])
  # argsort of the negated logits: ties keep the lower class index first, like torch.topk on CPU.
  top = np.argsort(-logits, axis=-1, kind='stable')[:, :k]
  return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=-1)))
