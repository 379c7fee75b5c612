"""Command line: run (or continue) a scaling study and write its table and figures.

    python -m vtp_jax.study --config=configs/study/shapes_cpu.py --workdir=DIR [--parallel=N]
        [--config.KEY=VALUE ...] [--dry_run] [--redo_changed]

Re-running the same command continues where the last run stopped: finished stages are never redone
and a half-trained tokenizer or generator resumes from its checkpoint. `--parallel=N` runs N cells
at once as separate processes. A cell whose commands the config has changed since is refused;
`--redo_changed` redoes its changed stages and those after them. DIR/results.csv, DIR/results.json and the PNG figures are rewritten
at the end of every run (also when some cells failed; their state says which stage). Exit status 0
when every cell is done, 1 otherwise.
"""

import json
import shlex
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'study config, e.g. configs/study/shapes_cpu.py',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'study folder: cells/, judge/, results, figures '
                                '(local or gs://BUCKET/...)')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'cells run at once, each as its own processes')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'print every cell\'s commands and exit')
_REDO_CHANGED = flags.DEFINE_bool(
    'redo_changed', False, 'where the config changed a cell\'s command, redo that stage and the '
    'ones after it (their outputs are deleted) instead of refusing the cell')
flags.mark_flags_as_required(['config', 'workdir'])


def _log(message: str) -> None:
  # One write per line: cells log from parallel threads, and print's separate newline interleaves.
  sys.stdout.write(message + '\n')
  sys.stdout.flush()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from vtp_jax.study import figures, results, runner
  try:
    study = runner.Study(_CONFIG.value, _WORKDIR.value, parallel=_PARALLEL.value,
                         log=_log, redo_changed=_REDO_CHANGED.value)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if _DRY_RUN.value:
    for name, commands in study.plan().items():
      for stage, argv_ in commands.items():
        print(f'{name} {stage}: {shlex.join(argv_)}')
    return
  try:
    states = study.run()
  except (ValueError, RuntimeError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  table = results.rows(study)
  results.write(table, study.dir)
  written = figures.write(table, study.dir)
  print(json.dumps({'workdir': str(study.dir), 'cells': states,
                    'results': str(study.dir / 'results.csv'),
                    'figures': [str(p) for p in written]}, indent=1))
  sys.exit(0 if all(s == 'done' for s in states.values()) else 1)


if __name__ == '__main__':
  app.run(main)
