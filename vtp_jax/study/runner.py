"""Runs the study's cells: each stage once, resumable, independent cells in parallel.

A stage counts as finished only when its `done/<stage>.json` exists, written atomically after the
command exits 0; a re-run skips finished stages and re-runs the rest. A training stage that was
killed resumes from its own latest checkpoint (launch/main.py does that); the stages that write
plain files (latent export, evaluation) start over. When the study process dies, each running
command receives SIGTERM (guard.py), which a training run answers by saving a checkpoint, so
nothing that was checkpointed is lost. A failed stage writes `failed.json` in its cell and the
cell stops there; the other cells go on, and the next run of the study retries it.

A cell records the commands it was made with (`cell.json`). When the study config changes a stage's
command, that cell is refused, finished or not, unless `redo_changed`: then the first changed stage
and every stage after it are redone (their records and output folders removed) and the earlier
stages are kept, so a new generator budget retrains only the generators.

The study folder may be local or in a bucket (`gs://BUCKET/...`, vtp_jax/paths.py); its commands
then write their own outputs there too. Records are written whole either way. A bucket has no
append, so there a stage's log is written to a local temporary file while its command runs and
uploaded (after the log's earlier runs) when it ends. A bucket has no lock either: the lock that
keeps a second study out of the folder is then a local file, named after the folder, so it keeps
out a second study on this machine only.
"""

import concurrent.futures
import fcntl
import hashlib
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import threading
import time

from vtp_jax import paths
from vtp_jax.study import cells as cells_lib

_GUARD = pathlib.Path(__file__).with_name('guard.py')  # part of the package: local by nature


def write_json(path, value) -> None:
  """Whole (paths.write_whole): a reader (or a re-run after a kill) sees the old file or the new,
  never half."""
  paths.write_whole(path, json.dumps(value, indent=1, sort_keys=True))


def last_json_line(text: str):
  for line in reversed(text.splitlines()):
    line = line.strip()
    if line.startswith('{'):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        continue
  return None


def tokenizer_metrics(workdir) -> dict:
  """The end-of-run evaluations the training loop appended to metrics.jsonl (last eval row)."""
  from vtp_jax.train import metrics as metrics_lib
  evals = metrics_lib.evaluations(workdir)
  return evals[-1][1] if evals else {}


def tokenizer_flops(config) -> dict:
  """Analytic training FLOPs of a tokenizer config (train/flops.py per step x train.steps)."""
  from vtp_jax import tasks
  per_step = float(tasks.for_config(config).step_flops(config)['total'])
  steps = int(config.train.steps)
  return {'tokenizer_flops': per_step * steps, 'tokenizer_step_flops': per_step,
          'tokenizer_steps': steps, 'encoder_width': int(config.model.encoder.width),
          'encoder_depth': int(config.model.encoder.depth)}


class Study:
  """One study folder: `run()` brings every cell as far as it goes and returns their states."""

  def __init__(self, study, workdir, parallel: int = 1, log=print, redo_changed: bool = False):
    missing = [k for k in str(study.get('required', '')).split(',') if k and not study[k]]
    if missing:
      raise ValueError('this study config needs ' + ', '.join(f'--config.{k}=...' for k in missing)
                       + ' (see the config file\'s docstring).')
    self.study = study
    self.dir = paths.path(workdir)
    self.parallel = max(1, int(parallel))
    self.redo_changed = redo_changed
    self.log = log
    self.cells = cells_lib.grid(study)
    self.judge_dir = self.dir / 'judge'
    self._judge_done = threading.Event()
    self._judge_ok = False
    self._lock_file = None

  def cell_dir(self, cell) -> paths.Path:
    return self.dir / 'cells' / cell.name

  def plan(self) -> dict:
    return {c.name: cells_lib.commands(c, self.study, self.cell_dir(c), self.judge_dir)
            for c in self.cells}

  # -- one command ---------------------------------------------------------------------------

  def _run(self, argv, log_path) -> tuple:
    log_path = paths.path(log_path)
    in_bucket = paths.is_bucket(log_path)
    if in_bucket:  # no append in a bucket: a local file while the command runs, uploaded after
      fd, local = tempfile.mkstemp(prefix='vtp_study_', suffix='.log')
      os.close(fd)
    else:
      log_path.parent.mkdir(parents=True, exist_ok=True)
      local = log_path
    start = time.time()
    try:
      # Append mode: the command's stderr and this process write through one file, each at its
      # end.
      with paths.path(local).open('a') as log:
        log.write(f'\n$ {shlex.join(argv)}\n')
        log.flush()
        proc = subprocess.run([sys.executable, str(_GUARD), str(os.getpid()), *argv],
                              cwd=cells_lib.REPO, stdout=subprocess.PIPE, stderr=log, text=True)
        log.write(proc.stdout)
      if in_bucket:
        earlier = log_path.read_text() if log_path.exists() else ''
        paths.write_whole(log_path, earlier + paths.path(local).read_text())
    finally:
      if in_bucket:
        os.remove(local)
    return proc.returncode, proc.stdout, time.time() - start

  def _reconcile(self, cell) -> None:
    """Makes `cell.json` match the current commands: a new cell records them; a cell whose
    commands changed is refused, or with `redo_changed` loses the changed stages and those after
    them (their done records and output folders), keeping the stages before."""
    cell_dir = self.cell_dir(cell)
    commands = cells_lib.commands(cell, self.study, cell_dir, self.judge_dir)
    path = cell_dir / 'cell.json'
    # Compared without the interpreter's path, so a re-run from another virtualenv still matches.
    record = {'objective': cell.objective, 'budget': cell.budget,
              'commands': {s: shlex.join(a[1:]) for s, a in commands.items()}}
    if path.exists():
      old = json.loads(path.read_text()).get('commands', {})
      changed = [s for s in cells_lib.STAGES if old.get(s) != record['commands'][s]]
      if not changed:
        return
      if not self.redo_changed:
        raise ValueError(f'{cell_dir} was made by other commands (stages {changed}); the study '
                         'config changed since. Run with --redo_changed to redo those stages and '
                         'the ones after them, delete that folder, or use a new --workdir.')
      redo = cells_lib.STAGES[cells_lib.STAGES.index(changed[0]):]
      self.log(f'study: {cell.name}: commands changed; redoing {", ".join(redo)}')
      for stage in redo:
        (cell_dir / 'done' / f'{stage}.json').unlink(missing_ok=True)
        if cells_lib.STAGE_OUTPUTS[stage]:
          paths.remove_tree(cell_dir / cells_lib.STAGE_OUTPUTS[stage])
      (cell_dir / 'failed.json').unlink(missing_ok=True)
    write_json(path, record)

  # -- stages --------------------------------------------------------------------------------

  def _judge(self) -> None:
    try:
      done = self.judge_dir / 'done.json'
      if done.exists():
        self._judge_ok = True
        return
      self.log(f'study: training the judge into {self.judge_dir}')
      rc, out, wall = self._run(cells_lib.judge_command(self.study, self.judge_dir),
                                self.dir / 'logs' / 'judge.log')
      if rc == 0:
        write_json(done, {'wall_s': wall, 'result': last_json_line(out)})
        self._judge_ok = True
      else:
        self.log(f'study: the judge failed (exit {rc}); see {self.dir / "logs" / "judge.log"}')
    finally:
      self._judge_done.set()

  def _stage_result(self, cell, stage, out: str) -> dict:
    cell_dir = self.cell_dir(cell)
    if stage == 'tokenizer':
      from vtp_jax import checkpoints
      config = checkpoints.load_config(cell_dir / 'tokenizer')  # read once for both
      from vtp_jax.train import metrics as metrics_lib
      metrics = tokenizer_metrics(cell_dir / 'tokenizer')
      if not metrics and metrics_lib.evals_due(config, int(config.train.steps), final=True):
        raise RuntimeError("the tokenizer's end-of-run evaluation is not in its metrics.jsonl "
                           '(the next run of the study evaluates its last checkpoint)')
      return {'metrics': metrics, **tokenizer_flops(config)}
    if stage == 'generation_eval':
      parsed = last_json_line(out)
      if not parsed or 'metrics' not in parsed:
        raise RuntimeError('the generation evaluation printed no JSON metrics')
      return {'metrics': parsed['metrics']}
    return {}

  def run_cell(self, cell) -> str:
    """'done' or 'failed: <stage>'; finished stages are skipped."""
    cell_dir = self.cell_dir(cell)
    commands = cells_lib.commands(cell, self.study, cell_dir, self.judge_dir)
    (cell_dir / 'done').mkdir(parents=True, exist_ok=True)
    failed = cell_dir / 'failed.json'
    for stage in cells_lib.STAGES:
      marker = cell_dir / 'done' / f'{stage}.json'
      if marker.exists():
        continue
      if stage == 'export':  # a half-written export is redone from scratch
        paths.remove_tree(cell_dir / 'latents')
      if stage == 'generation_eval' and self.study.generation_eval.judge:
        self._judge_done.wait()
        if not self._judge_ok:
          write_json(failed, {'stage': stage, 'error': 'the judge failed to train',
                              'log': str(self.dir / 'logs' / 'judge.log')})
          return f'failed: {stage}'
      self.log(f'study: {cell.name}: {stage}')
      log_path = cell_dir / 'logs' / f'{stage}.log'
      rc, out, wall = self._run(commands[stage], log_path)
      try:
        if rc != 0:
          raise RuntimeError(f'exit status {rc}')
        result = self._stage_result(cell, stage, out)
      except Exception as e:  # noqa: BLE001  (recorded; the other cells go on)
        tail = log_path.read_text().splitlines()[-20:]
        write_json(failed, {'stage': stage, 'error': str(e), 'log': str(log_path), 'tail': tail})
        self.log(f'study: {cell.name}: {stage} failed ({e}); see {log_path}')
        return f'failed: {stage}'
      write_json(marker, {'wall_s': wall, 'command': shlex.join(commands[stage]), **result})
    failed.unlink(missing_ok=True)
    return 'done'

  # -- the whole grid ------------------------------------------------------------------------

  def lock_path(self) -> pathlib.Path:
    """The file locked while a study runs: in the study folder, or for a bucket (which has no
    locks) a local file named after the folder's address."""
    if not paths.is_bucket(self.dir):
      return pathlib.Path(self.dir) / '.lock'
    digest = hashlib.sha1(os.fspath(self.dir).encode()).hexdigest()[:16]
    return pathlib.Path(tempfile.gettempdir()) / 'vtp_jax_study_locks' / f'{digest}.lock'

  def _acquire(self) -> None:
    self.dir.mkdir(parents=True, exist_ok=True)
    lock = self.lock_path()
    lock.parent.mkdir(parents=True, exist_ok=True)
    self._lock_file = open(lock, 'w')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise RuntimeError(f'another study is running in {self.dir}; wait for it or stop it.')

  def run(self) -> dict:
    self._acquire()
    try:
      states = {}
      for c in self.cells:  # finished cells too: a changed command invalidates their results
        try:
          self._reconcile(c)
        except ValueError as e:
          states[c.name] = f'failed: {e}'
          self.log(f'study: {c.name}: {e}')
      pending = [c for c in self.cells if c.name not in states and not all(
          (self.cell_dir(c) / 'done' / f'{s}.json').exists() for s in cells_lib.STAGES)]
      finished = [c for c in self.cells if c.name not in states and c not in pending]
      states.update({c.name: 'done' for c in finished})
      self.log(f'study: {len(self.cells)} cells, {len(finished)} finished, '
               f'{self.parallel} at a time')
      needs_judge = bool(self.study.generation_eval.judge) and bool(pending)
      with concurrent.futures.ThreadPoolExecutor(self.parallel) as pool:
        if needs_judge:
          pool.submit(self._judge)
        else:
          self._judge_done.set()
        futures = {pool.submit(self.run_cell, c): c for c in pending}
        for future in concurrent.futures.as_completed(futures):
          cell = futures[future]
          try:
            states[cell.name] = future.result()
          except Exception as e:  # noqa: BLE001  (a cell that cannot start)
            states[cell.name] = f'failed: {e}'
            self.log(f'study: {cell.name}: {e}')
      return {c.name: states[c.name] for c in self.cells}
    finally:
      self._lock_file.close()
