"""A minutes-long study that runs every stage of every cell on micro budgets: a VTP-tiny shrunk
to width 32 (still 64 px images, so DiT-tiny's 4x4x64 latents fit), two and three steps, L1 alone
as the reconstruction loss (LPIPS's VGG backward is a third of the step's compile), linear probe and
reconstruction evaluations only. The harness's own check (tests/study/test_study.py),
not a measurement.

    python -m vtp_jax.study --config=configs/study/shapes_smoke.py --workdir=/tmp/study_smoke
"""

from configs.study import shapes_cpu


def _steps(n: int) -> list:
  return [f'train.steps={n}', 'optim.warmup_steps=1', 'optim.freeze_last_layer_steps=1',
          'loss.teacher_temp_warmup_steps=1', f'train.checkpoint_every={n}', 'train.log_every=1']


def get_config():
  c = shapes_cpu.get_config()
  c.objectives = {'vtp': 'configs/vtp_tiny.py'}
  c.objective_overrides = {}
  c.budgets = {'s2': _steps(2), 's3': _steps(3)}
  c.tokenizer_overrides = [
      'model.encoder.width=32', 'model.encoder.depth=1', 'model.encoder.heads=2',
      'model.decoder.width=32', 'model.decoder.depth=1', 'model.decoder.heads=2',
      'model.text.width=32', 'model.text.depth=1', 'model.text.heads=2', 'model.clip_dim=16',
      'model.dino_head.hidden=32', 'model.dino_head.bottleneck=16',
      'model.dino_head.prototypes=64', 'loss.lpips_weight=0',
      'evals.tasks=linear_probe,reconstruction', 'evals.probe_n_blocks=1',
      'evals.max_examples=64', 'evals.max_train_examples=128', 'evals.probe_steps=5',
      'evals.probe_lrs=0.1', 'evals.batch_size=64', 'train.image_log_every=0']
  c.export.max_examples = 128
  c.generator.overrides = ['train.steps=2', 'train.checkpoint_every=2', 'train.log_every=1',
                           'optim.warmup_steps=1', 'sample.steps=2', 'data.batch_size=16']
  c.generation_eval.num_images = 48
  c.generation_eval.judge = False  # the judge takes minutes to train; the CPU preset has it
  return c
