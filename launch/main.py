"""Trains VTP: a thin absl shell over `vtp_jax.driver.loop.train_and_evaluate`.

  python launch/main.py --config=configs/vtp_tiny.py --workdir=runs/tiny [--config.KEY=VALUE ...]

Re-running the same command resumes from the workdir's latest complete checkpoint. Every process of
a multi-host job runs this same command (see launch/README.md). Exit status: 0 when trained or
preempted after saving, 2 for a config that cannot run or a workdir whose checkpoints none reads
(docs/checkpoints.md), 1 when the loss diverged (train.nan_policy=stop) or a checkpoint save failed,
3 when another process of a multi-process run died or stopped answering (the last stderr line
names it and the step that re-running the same command on every host resumes from;
vtp_jax/driver/peers.py).
"""

import logging as std_logging
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from anywhere

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vtp_jax import host_malloc  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file, e.g. configs/vtp_tiny.py',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'checkpoints, metrics.jsonl, TensorBoard go here')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietOrbax:
  """Drops Orbax's per-save INFO chatter (dozens of lines a save); its warnings still show."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or '/orbax/' not in record.pathname  # 30: Python's WARNING


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # First, before JAX starts: this may restart the process under glibc malloc tunables.
  malloc_line = host_malloc.apply(host_malloc.mode_of(_CONFIG.value))
  logging.get_absl_logger().addFilter(_QuietOrbax())
  std_logging.getLogger('gcsfs').setLevel(std_logging.WARNING)  # a line per file read in a bucket
  logging.info('%s', malloc_line)
  from vtp_jax.driver import loop  # local: flags parse (and --help) before jax starts
  try:
    summary = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except loop.ConfigError as e:
    logging.error('Config error: %s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except loop.CheckpointUnreadable as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except (loop.NonFiniteLoss, loop.SaveFailed) as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  logging.info('Done: %s', summary)


if __name__ == '__main__':
  from vtp_jax.driver import command_line
  app.run(main, flags_parser=lambda argv: command_line.parse_or_exit(
      argv, flags.FLAGS, lambda: _CONFIG.value.get('train')))  # the config loads lazily
