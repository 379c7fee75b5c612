"""Command line: evaluate a checkpoint and print the metrics as one JSON object.

    python -m vtp_jax.eval --checkpoint=DIR --task=zero_shot|linear_probe|reconstruction \\
        --dataset=shapes:validation [--train_dataset=shapes:train] [--max_examples=N] \\
        [--fid_weights=fid_inception.npz] [--set=evals.probe_steps=500 --set=data.data_dir=/data]

`--checkpoint` is a checkpoint folder or a training workdir (its latest step). Every other evals.*
setting comes from the checkpoint's saved config, overridable with --set KEY=VALUE (any config key,
typed like its current value). `--task=all` runs config.evals.tasks.
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
flags.mark_flags_as_required(['checkpoint', 'task'])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax  # local: keeps --help fast
  from vtp_jax.eval import common
  from vtp_jax.eval import runner
  from vtp_jax.inference import Tokenizer
  if FLAGS.task != 'all' and FLAGS.task not in runner.TASKS:
    raise app.UsageError(f'--task={FLAGS.task} is not one of {runner.TASKS} or all.')
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
    print(json.dumps({'checkpoint': str(FLAGS.checkpoint), 'tasks': ev.tasks,
                      'dataset': ev.dataset, 'metrics': metrics}, sort_keys=True))


if __name__ == '__main__':
  app.run(main)
