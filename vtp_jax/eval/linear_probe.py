"""Linear probes on frozen, cached features: DINOv2's protocol (spec 4.1) on the full-width encoder
features, and the same on the 64-d bottleneck latents (the paper's scaling-study probe).

Features (computed once, cached on the host):
  * 'n{k}': concat of the CLS tokens of the last k blocks (normed, oldest first) plus the mean of the
    last block's patch tokens, DINOv2's `create_linear_input` with avgpool ((k+1)*D dims).
  * 'latent_mean' / 'latent_flatten': the bottleneck latents (h, w, d) mean-pooled over tokens (d
    dims) or flattened (h*w*d). The paper calls the scaling-study input "reduced-dimensionality
    features from the bottleneck" without saying how tokens are pooled [?]; mean is our default.
Training, as DINOv2's `eval/linear.py`: a Linear layer (weight N(0, 0.01), bias 0), softmax cross
entropy, SGD momentum 0.9 (or AdamW), weight decay 0, cosine decay to 0 over `probe_steps` steps of
`probe_batch_size` examples (reshuffled each pass), one classifier per learning rate of the grid
scaled by batch/256, all trained at once (vmapped, one jit). No augmentation: features are cached
from centre crops, where DINOv2 trains on RandomResizedCrop + flip.
Selection: DINOv2 reports the best classifier *on the evaluation set itself* ('eval', the paper's
protocol, optimistic by the max over the grid); 'holdout' instead picks the lr on 10% of the
training features held out (the probe then trains on the other 90%) and reports eval accuracy there.
"""

import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vtp_jax.eval import common
from vtp_jax.eval import data as eval_data

SELECT = ('eval', 'holdout')
LATENT_POOLS = ('mean', 'flatten')
HOLDOUT_FRACTION = 0.1


def feature_fn(tokenizer, n_blocks: tuple[int, ...], latent_pools: tuple[str, ...]):
  """images -> {'n{k}': (B, (k+1)D), 'latent_{pool}': ...} for every requested probe input."""
  for pool in latent_pools:
    if pool not in LATENT_POOLS:
      raise ValueError(f'probe_latent_pool {pool!r} is not one of {LATENT_POOLS}.')

  def fn(images):
    out = {}
    if n_blocks:
      layers = tokenizer.intermediate_layers(images, max(n_blocks))
      avg = jnp.mean(layers[-1][0], axis=1)
      for k in n_blocks:
        out[f'n{k}'] = jnp.concatenate([cls for _, cls in layers[-k:]] + [avg], axis=-1)
    if latent_pools:
      z = tokenizer.encode(images)
      for pool in latent_pools:
        out[f'latent_{pool}'] = (jnp.mean(z, axis=(1, 2)) if pool == 'mean'
                                 else z.reshape(z.shape[0], -1))
    return out
  return fn


def _batch_order(n: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
  """(steps, batch) example indices: consecutive slices of fresh permutations, as a loader does."""
  rng = np.random.default_rng(seed)
  per_pass = n // batch_size  # the ragged tail of a pass is dropped, as drop_last=True does
  passes = [rng.permutation(n)[:per_pass * batch_size].reshape(per_pass, batch_size)
            for _ in range(-(-steps // per_pass))]
  return np.concatenate(passes)[:steps]


@functools.partial(jax.jit, static_argnames=('num_classes', 'optimizer'))
def _fit(x, y, lrs, order, key, num_classes: int, optimizer: str):
  steps = order.shape[0]
  w0 = 0.01 * jax.random.normal(key, (x.shape[1], num_classes), jnp.float32)
  params0 = {'w': w0, 'b': jnp.zeros((num_classes,), jnp.float32)}

  def loss_fn(params, xb, yb):
    logits = xb @ params['w'] + params['b']
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  def train_one(lr):
    schedule = optax.cosine_decay_schedule(lr, steps)  # torch CosineAnnealingLR(T_max, eta_min=0)
    if optimizer == 'sgd':
      tx = optax.sgd(schedule, momentum=0.9)
    else:
      tx = optax.adamw(schedule, weight_decay=0.0)

    def step(carry, idx):
      params, state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx])
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), loss

    (params, _), losses = jax.lax.scan(step, (params0, tx.init(params0)), order)
    return params, losses[-1]

  return jax.vmap(train_one)(lrs)


def fit_probes(x: np.ndarray, y: np.ndarray, num_classes: int, lrs, *, optimizer: str = 'sgd',
               steps: int = 1000, batch_size: int = 256, seed: int = 0) -> dict:
  """Trains one linear classifier per lr (scaled by batch/256); {'w': (L,F,C), 'b': (L,C), ...}."""
  if optimizer not in ('sgd', 'adamw'):
    raise ValueError(f'probe_optimizer={optimizer!r} is not sgd or adamw.')
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32)
  if x.shape[0] == 0:
    raise ValueError('no labelled training features for the linear probe.')
  batch_size = min(batch_size, x.shape[0])
  scaled = np.asarray(lrs, np.float32) * (batch_size / 256.0)  # DINOv2's lr * B/256
  order = _batch_order(x.shape[0], steps, batch_size, seed)
  params, final_loss = _fit(jnp.asarray(x), jnp.asarray(y), jnp.asarray(scaled), jnp.asarray(order),
                            jax.random.key(seed), num_classes, optimizer)
  return {'w': np.asarray(params['w']), 'b': np.asarray(params['b']),
          'lrs': np.asarray(lrs, np.float64), 'final_loss': np.asarray(final_loss)}


@functools.partial(jax.jit, static_argnames=('k',))
def _topk_accuracy(x, w, b, y, k: int):
  top = jax.lax.top_k(x @ w + b, k)[1]
  return jnp.mean(jnp.any(top == y[:, None], axis=-1))


def accuracies(probes: dict, x: np.ndarray, y: np.ndarray, k: int = 1) -> np.ndarray:
  """Top-k accuracy (L,) of every classifier, one at a time on device (L x N x C logits of a full
  ImageNet evaluation would not fit in host memory at once)."""
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
  k = min(k, probes['w'].shape[-1])
  return np.array([float(_topk_accuracy(x, jnp.asarray(w), jnp.asarray(b), y, k))
                   for w, b in zip(probes['w'], probes['b'])])


def probe(train_x, train_y, eval_x, eval_y, lrs, *, select: str = 'eval', num_classes=None,
          **fit_kwargs) -> dict:
  """Fits the lr grid and reports the selected classifier's eval top-1/top-5 and lr."""
  if select not in SELECT:
    raise ValueError(f'probe_select={select!r} is not one of {SELECT}.')
  train_x, train_y = np.asarray(train_x), np.asarray(train_y)
  eval_x, eval_y = np.asarray(eval_x), np.asarray(eval_y)
  keep = train_y >= 0
  train_x, train_y = train_x[keep], train_y[keep]
  keep = eval_y >= 0
  eval_x, eval_y = eval_x[keep], eval_y[keep]
  if num_classes is None:
    num_classes = int(max(train_y.max(), eval_y.max())) + 1
  if select == 'holdout':
    perm = np.random.default_rng(fit_kwargs.get('seed', 0)).permutation(len(train_y))
    n_hold = max(1, int(round(HOLDOUT_FRACTION * len(train_y))))
    hold, fit = perm[:n_hold], perm[n_hold:]
    probes = fit_probes(train_x[fit], train_y[fit], num_classes, lrs, **fit_kwargs)
    chooser = accuracies(probes, train_x[hold], train_y[hold])
  else:
    probes = fit_probes(train_x, train_y, num_classes, lrs, **fit_kwargs)
    chooser = None
  top1 = accuracies(probes, eval_x, eval_y, 1)
  best = int(np.argmax(top1 if chooser is None else chooser))
  chosen = {'w': probes['w'][best:best + 1], 'b': probes['b'][best:best + 1]}
  top5 = float(accuracies(chosen, eval_x, eval_y, 5)[0])
  return {'top1': float(top1[best]), 'top5': top5, 'best_lr': float(probes['lrs'][best]),
          'per_lr_top1': top1, 'dims': float(train_x.shape[1])}


def run(tokenizer, config, dataset_spec: str, train_dataset_spec: str | None = None, *,
        max_examples: int | None = None, max_train_examples: int | None = None,
        train_batches: Iterable | None = None, eval_batches: Iterable | None = None) -> dict:
  """Linear-probe top-1 of every probe input, fitted on train_dataset_spec, measured on dataset_spec.

  `train_batches` / `eval_batches` (iterables of (uint8 images, labels)) replace the dataset reads.
  Returns flat metrics '{input}/top1', '{input}/top5', '{input}/best_lr', '{input}/dims', and
  with evals.probe_factors on a dataset whose labels have factors (vtp_shapes: colour, shape)
  '{input}/{factor}_top1' from a separate probe fitted on that factor alone.
  """
  ev = config.evals
  n_blocks = common.parse_list(ev.probe_n_blocks, int, 'evals.probe_n_blocks')
  pools = common.parse_list(ev.probe_latent_pool, str, 'evals.probe_latent_pool')
  pools = tuple(p.strip() for p in pools)
  lrs = common.parse_list(ev.probe_lrs, float, 'evals.probe_lrs')
  fn = feature_fn(tokenizer, n_blocks, pools)
  if train_batches is None:
    train_dataset_spec = train_dataset_spec or ev.train_dataset
    train_batches = eval_data.eval_images(
        config, train_dataset_spec,
        max_examples=ev.max_train_examples if max_train_examples is None else max_train_examples)
  if eval_batches is None:
    eval_batches = eval_data.eval_images(
        config, dataset_spec, max_examples=ev.max_examples if max_examples is None else max_examples)
  train_feats, train_y = common.map_batches(fn, train_batches, ev.batch_size)
  eval_feats, eval_y = common.map_batches(fn, eval_batches, ev.batch_size)
  factors = eval_data.label_factors(dataset_spec) if ev.probe_factors else {}
  return probe_inputs(train_feats, train_y, eval_feats, eval_y, lrs, factors,
                      select=ev.probe_select, optimizer=ev.probe_optimizer, steps=ev.probe_steps,
                      batch_size=ev.probe_batch_size, seed=ev.seed)


def probe_inputs(train_feats: dict, train_y, eval_feats: dict, eval_y, lrs, factors: dict,
                 **fit_kwargs) -> dict:
  """`probe` on every feature input (and on each label factor: a probe of its own), flat metrics."""
  metrics = {}
  for name in train_feats:
    result = probe(train_feats[name], train_y, eval_feats[name], eval_y, lrs, **fit_kwargs)
    for key in ('top1', 'top5', 'best_lr', 'dims'):
      metrics[f'{name}/{key}'] = result[key]
    for factor, (values, of) in factors.items():
      result = probe(train_feats[name], of(train_y), eval_feats[name], of(eval_y), lrs,
                     num_classes=values, **fit_kwargs)
      metrics[f'{name}/{factor}_top1'] = result['top1']
  return metrics
