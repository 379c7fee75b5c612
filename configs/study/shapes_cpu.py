"""The scaling study on vtp_shapes for 2 CPU cores (docs/study.md): four objectives x three
tokenizer training lengths on VTP-tiny, each tokenizer's latents feeding a DiT-tiny of fixed budget.

    python -m vtp_jax.study --config=configs/study/shapes_cpu.py --workdir=runs/study_cpu

Every key here is also a `--config.KEY=VALUE` flag. Budgets scale the warm-ups with the steps so
that each budget is a complete run (its own schedules), not a snapshot of a longer one.
"""

import ml_collections


def _steps(n: int) -> list:
  """A tokenizer run of n steps with warm-ups in vtp_tiny's proportions (100/600, 300/600)."""
  return [f'train.steps={n}', f'optim.warmup_steps={max(1, n // 6)}',
          f'optim.freeze_last_layer_steps={max(1, n // 6)}',
          f'loss.teacher_temp_warmup_steps={max(1, n // 2)}',
          f'train.checkpoint_every={max(1, n // 2)}']


def get_config():
  c = ml_collections.ConfigDict()
  # Objective name -> tokenizer config spec (the paper's Fig. 4 ablations and its baseline).
  c.objectives = ml_collections.ConfigDict({
      'vtp': 'configs/vtp_tiny.py',
      'recon_only': 'configs/ae_baseline.py:vtp_tiny',
      'clip_ae': 'configs/clip_ae.py:vtp_tiny',
      'ssl_ae': 'configs/ssl_ae.py:vtp_tiny',
  })
  # Per-objective overrides: the baseline reconstructs as many images a step as VTP does (4 of 32),
  # so each objective's cost differs only by its losses.
  c.objective_overrides = ml_collections.ConfigDict({'recon_only': ['data.rec_batch_fraction=0.125']})
  # Budget name -> overrides that set the tokenizer's training compute.
  c.budgets = ml_collections.ConfigDict({'s150': _steps(150), 's300': _steps(300),
                                         's600': _steps(600)})
  # Applied to every tokenizer: lighter end-of-run evaluations than the README demo's.
  c.tokenizer_overrides = ['evals.max_examples=1000', 'evals.max_train_examples=2500',
                           'evals.probe_steps=500', 'train.image_log_every=0']
  c.data_source = ''  # tokenizers' data.source; '' keeps their config's (vtp_shapes here)
  c.export = ml_collections.ConfigDict()
  c.export.dataset = 'shapes'  # dataset spec the latents are exported from
  c.export.split = 'train'  # its split
  c.export.max_examples = 0  # evenly spaced examples; 0 = all
  c.generator = ml_collections.ConfigDict()
  c.generator.config = 'configs/dit_tiny.py'  # the generator of fixed budget, the same for every cell
  # Its budget. EMA 0.995 (dit_tiny's) averages the last ~200 of the 1,000 steps; at 0.999 the
  # untrained initial weights would hold 37% of the EMA at step 1,000 and the samples are grey.
  c.generator.overrides = ['train.steps=1000', 'train.checkpoint_every=500', 'flow.ema_decay=0.995']
  c.generation_eval = ml_collections.ConfigDict()
  c.generation_eval.dataset = 'shapes:validation'  # real images the samples are compared with
  c.generation_eval.num_images = 1000  # class-balanced samples per cell
  c.generation_eval.cfg_scale = 4.0  # guidance scale; <= 0 keeps the generator config's
  c.generation_eval.seed = 0  # sampling seed
  c.generation_eval.judge = True  # vtp_shapes judge metrics (eval/judge.py)
  c.judge_steps = 1200  # the judge's training steps (trained once per study, into DIR/judge)
  c.fid_weights = ''  # converted FID Inception weights for rFID and gFID; '' skips both
  c.required = ''  # comma list of keys that must be set (non-empty) before the study starts
  return c
