"""Runs the evaluations named in `config.evals`: the one entry point for the training loop's periodic
hook and for `python -m vtp_jax.eval`.

Every evaluator is deterministic (fixed, evenly spaced examples; fixed probe seed), so in a
multi-process run every process can call `run_evals` on the same tokenizer and get the same numbers,
as SPMD requires when the parameters are sharded; the caller writes them from process 0 only.
"""

from vtp_jax.eval import common

TASKS = ('zero_shot', 'linear_probe', 'reconstruction')


def as_tokenizer(tokenizer_or_params, config):
  """A Tokenizer as given, or one wrapping a raw parameter dict (e.g. the train state's params)."""
  if isinstance(tokenizer_or_params, dict):
    from vtp_jax.inference import Tokenizer
    return Tokenizer(config, tokenizer_or_params)
  return tokenizer_or_params


def run_task(task: str, tokenizer_or_params, config, dataset_spec: str | None = None,
             **kwargs) -> dict:
  """One evaluation's metrics (floats), on dataset_spec or config.evals.dataset."""
  tokenizer = as_tokenizer(tokenizer_or_params, config)
  dataset_spec = dataset_spec or config.evals.dataset
  if task == 'zero_shot':
    from vtp_jax.eval import zero_shot
    return zero_shot.run(tokenizer, config, dataset_spec, **kwargs)
  if task == 'linear_probe':
    from vtp_jax.eval import linear_probe
    return linear_probe.run(tokenizer, config, dataset_spec, **kwargs)
  if task == 'reconstruction':
    from vtp_jax.eval import reconstruction
    return reconstruction.run(tokenizer, config, dataset_spec, **kwargs)
  raise ValueError(f'unknown eval task {task!r}; choose from {TASKS} (config.evals.tasks).')


def run_evals(tokenizer_or_params, config) -> dict:
  """{'{task}/{metric}': float} for every task in config.evals.tasks, on config.evals.dataset."""
  tokenizer = as_tokenizer(tokenizer_or_params, config)
  metrics = {}
  for task in common.parse_list(config.evals.tasks, str, 'evals.tasks'):
    task = task.strip()
    for name, value in run_task(task, tokenizer, config).items():
      metrics[f'{task}/{name}'] = float(value)
  return metrics
