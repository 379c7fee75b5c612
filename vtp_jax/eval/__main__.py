"""Command line: evaluate a checkpoint and print the metrics as one JSON object.

    python -m vtp_jax.eval --checkpoint=DIR --task=zero_shot|linear_probe|reconstruction \\
        --dataset=shapes:validation [--train_dataset=shapes:train] [--max_examples=N] \\
        [--fid_weights=fid_inception.npz] [--set=evals.probe_steps=500 --set=data.data_dir=/data]

`--checkpoint` is a checkpoint folder or a training workdir (its latest step). Every other evals.*
setting comes from the checkpoint's saved config, overridable with --set KEY=VALUE (any config key,
typed like its current value). `--task=all` runs config.evals.tasks.

A generator (configs/dit_*.py) is evaluated with --task=generation (eval/generation.py):

    python -m vtp_jax.eval --task=generation --checkpoint=runs/dit_tiny --tokenizer=runs/vtp_tiny \\
        --dataset=shapes:validation [--num_images=2000] [--cfg_scale=S] [--steps=K] \\
        [--solver=heun] [--fid_weights=fid_inception.npz] [--judge_dir=DIR]

gFID needs --fid_weights; on vtp_shapes the judge (eval/judge.py, trained on first use) adds
judge_accuracy, its colour and shape parts, judge_fd and its own accuracy on the real images.
--set overrides apply to the tokenizer's config (e.g. data.data_dir).

Every path (--checkpoint, --tokenizer, --fid_weights, --judge_dir, --out, data sources, a class
names file) may be local or in a bucket (`gs://BUCKET/...`). `--out=FILE` also writes the JSON
object there, whole.
"""

import json

from absl import app
from absl import flags

flags.DEFINE_string('checkpoint', None, 'checkpoint folder or training workdir')
flags.DEFINE_string('task', None, "zero_shot, linear_probe, reconstruction, or 'all'")
flags.DEFINE_string('dataset', None, 'dataset spec to measure on (default: config.evals.dataset)')
flags.DEFINE_string('train_dataset', None, 'linear-probe fitting spec (default: evals.train_dataset)')
flags.DEFINE_integer('max_examples', None, 'evaluation examples, 0 = all (default: evals.max_examples)')
flags.DEFINE_integer('max_train_examples', None, 'probe-fitting examples, 0 = all')
flags.DEFINE_string('fid_weights', None, "converted FID Inception weights; '' skips rFID")
flags.DEFINE_string('compute_dtype', 'float32', 'float32 (reference numerics) or bfloat16')
flags.DEFINE_multi_string('set', [], 'KEY=VALUE config override, e.g. evals.probe_steps=500')
# --task=generation only.
flags.DEFINE_string('tokenizer', None, 'generation: tokenizer folder or workdir that decodes')
flags.DEFINE_integer('num_images', 1000, 'generation: samples (class-balanced) and real images')
flags.DEFINE_float('cfg_scale', None, 'generation: guidance scale (default: the generator config)')
flags.DEFINE_integer('steps', None, 'generation: ODE grid points (default: config)')
flags.DEFINE_string('solver', None, "generation: 'euler' or 'heun' (default: config)")
flags.DEFINE_integer('seed', 0, 'generation: sampling seed')
flags.DEFINE_string('judge_dir', None, 'generation: vtp_shapes judge folder (default: by the data)')
flags.DEFINE_bool('judge', True, 'generation: the vtp_shapes judge metrics (false skips them)')
flags.DEFINE_string('out', None, 'also write the JSON result to this file (local or gs://...)')
flags.mark_flags_as_required(['checkpoint', 'task'])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from vtp_jax import checkpoints  # local: keeps --help fast
  with checkpoints.report_unreadable():  # a damaged checkpoint: one line, exit status 2
    _evaluate()


def _evaluate():
  import jax  # local: keeps --help fast
  from vtp_jax.eval import common
  from vtp_jax.eval import runner
  from vtp_jax.inference import Tokenizer
  if FLAGS.task == 'generation':
    return _generation()
  if FLAGS.task != 'all' and FLAGS.task not in runner.TASKS:
    raise app.UsageError(f'--task={FLAGS.task} is not one of {runner.TASKS}, generation or all.')
  tokenizer = Tokenizer.load(FLAGS.checkpoint, compute_dtype=FLAGS.compute_dtype)
  config = tokenizer.config
  for assignment in FLAGS.set:
    common.apply_override(config, assignment)
  ev = config.evals
  if FLAGS.dataset:
    ev.dataset = FLAGS.dataset
  if FLAGS.train_dataset:
    ev.train_dataset = FLAGS.train_dataset
  if FLAGS.max_examples is not None:
    ev.max_examples = FLAGS.max_examples
  if FLAGS.max_train_examples is not None:
    ev.max_train_examples = FLAGS.max_train_examples
  if FLAGS.fid_weights is not None:
    ev.fid_weights = FLAGS.fid_weights
  if FLAGS.task != 'all':
    ev.tasks = FLAGS.task
  metrics = runner.run_evals(tokenizer, config)
  if jax.process_index() == 0:
    _report({'checkpoint': str(FLAGS.checkpoint), 'tasks': ev.tasks, 'dataset': ev.dataset,
             'metrics': metrics})


def _report(result: dict) -> None:
  """Prints the result as one JSON line and, with --out, writes it there whole."""
  text = json.dumps(result, sort_keys=True)
  print(text)
  if FLAGS.out:
    from vtp_jax import paths
    paths.write_whole(FLAGS.out, text + '\n')


def _generation():
  import jax  # local: keeps --help fast
  from vtp_jax.eval import common
  from vtp_jax.eval import fid_weights
  from vtp_jax.eval import generation
  from vtp_jax.generation.generator import Generator
  from vtp_jax.inference import Tokenizer
  if not FLAGS.tokenizer or not FLAGS.dataset:
    raise app.UsageError('--task=generation needs --tokenizer and --dataset.')
  gen = Generator.load(FLAGS.checkpoint)
  tokenizer = Tokenizer.load(FLAGS.tokenizer, compute_dtype=FLAGS.compute_dtype)
  for assignment in FLAGS.set:
    common.apply_override(tokenizer.config, assignment)
  fid_params = fid_weights.load_params(FLAGS.fid_weights) if FLAGS.fid_weights else None
  metrics = generation.run(
      gen, tokenizer, FLAGS.dataset, num_images=FLAGS.num_images,
      max_real=FLAGS.max_examples or 0, fid_params=fid_params, judge_dir=FLAGS.judge_dir,
      judge=FLAGS.judge, seed=FLAGS.seed, cfg_scale=FLAGS.cfg_scale, steps=FLAGS.steps, solver=FLAGS.solver)
  if jax.process_index() == 0:
    _report({'checkpoint': str(FLAGS.checkpoint), 'tokenizer': str(FLAGS.tokenizer),
             'tasks': 'generation', 'dataset': FLAGS.dataset, 'metrics': metrics})


if __name__ == '__main__':
  app.run(main)
