"""The scaling study: the grid and its commands, the table and figures, and a real micro study
(configs/study/shapes_smoke.py) killed mid-run and re-run to completion without redoing anything
that had finished, with a broken cell that fails alone."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import FAST_COMPILE
from vtp_jax.study import cells as cells_lib
from vtp_jax.study import figures
from vtp_jax.study import results
from vtp_jax.study import runner

REPO = pathlib.Path(__file__).resolve().parents[2]


def _cpu_config():
  from configs.study import shapes_cpu
  return shapes_cpu.get_config()


def test_grid_has_every_objective_at_every_budget_with_overrides_in_order():
  study = _cpu_config()
  grid = cells_lib.grid(study)
  assert [c.name for c in grid] == [f'{o}-{b}' for o in ('clip_ae', 'recon_only', 'ssl_ae', 'vtp')
                                    for b in ('s150', 's300', 's600')]
  recon = next(c for c in grid if c.name == 'recon_only-s300')
  assert recon.tokenizer_config == 'configs/ae_baseline.py:vtp_tiny'
  # Common overrides first, then the objective's, then the budget's (the last one wins).
  o = list(recon.tokenizer_overrides)
  assert o.index('evals.probe_steps=500') < o.index('data.rec_batch_fraction=0.125') < \
      o.index('train.steps=300')
  cmds = cells_lib.commands(recon, study, pathlib.Path('/d/c'), pathlib.Path('/d/judge'))
  assert cmds['tokenizer'][1:4] == ['launch/main.py', '--config=configs/ae_baseline.py:vtp_tiny',
                                    '--workdir=/d/c/tokenizer']
  assert '--config.train.steps=300' in cmds['tokenizer']
  assert '--checkpoint=/d/c/tokenizer' in cmds['export']
  assert '--config.latents.source=arrayrecord:/d/c/latents/latents-*.array_record' in \
      cmds['generator']
  assert '--judge_dir=/d/judge' in cmds['generation_eval']
  study.objectives = {'b': 'y.py', 'a': 'x.py'}
  study.budgets = {'n': []}
  study.objective_overrides = {}
  assert [c.name for c in cells_lib.grid(study)] == ['a-n', 'b-n']


def test_a_changed_command_is_refused_or_redone_from_the_first_changed_stage(tmp_path):
  study = _cpu_config()
  cell = runner.Study(study, tmp_path).cells[0]
  cell_dir = tmp_path / 'cells' / cell.name
  runner.Study(study, tmp_path)._reconcile(cell)  # a new cell records its commands
  # A finished cell: every stage's record and output folder.
  (cell_dir / 'done').mkdir()
  for stage in cells_lib.STAGES:
    runner.write_json(cell_dir / 'done' / f'{stage}.json', {'wall_s': 1.0})
    if cells_lib.STAGE_OUTPUTS[stage]:
      (cell_dir / cells_lib.STAGE_OUTPUTS[stage]).mkdir()
  runner.Study(study, tmp_path)._reconcile(cell)  # same commands: nothing happens
  assert len(list((cell_dir / 'done').iterdir())) == 4

  study.generator.overrides = ['train.steps=5']  # a new generator budget
  with pytest.raises(ValueError, match=r"other commands \(stages \['generator'\]\)"):
    runner.Study(study, tmp_path)._reconcile(cell)
  assert len(list((cell_dir / 'done').iterdir())) == 4  # refused: nothing removed

  runner.Study(study, tmp_path, redo_changed=True)._reconcile(cell)  # ... and every stage after
  assert sorted(p.name for p in (cell_dir / 'done').iterdir()) == ['export.json', 'tokenizer.json']
  assert (cell_dir / 'tokenizer').exists() and (cell_dir / 'latents').exists()
  assert not (cell_dir / 'generator').exists()  # else the old run's checkpoints would resume
  recorded = json.loads((cell_dir / 'cell.json').read_text())['commands']['generator']
  assert '--config.train.steps=5' in recorded
  runner.Study(study, tmp_path)._reconcile(cell)  # the new commands now stand


def test_a_tokenizer_without_its_end_of_run_evaluation_is_not_recorded_as_done(tmp_path):
  """A tokenizer whose config asks for end-of-run evaluations but whose metrics.jsonl has none
  (its run was stopped while evaluating) fails the stage, so the next run of the study retries
  it, instead of recording a row without metrics."""
  from configs import vtp_tiny
  study = runner.Study(_cpu_config(), tmp_path)
  cell = study.cells[0]
  workdir = study.cell_dir(cell) / 'tokenizer'
  workdir.mkdir(parents=True)
  config = vtp_tiny.get_config()
  (workdir / 'config.json').write_text(config.to_json())
  (workdir / 'metrics.jsonl').write_text(json.dumps({'step': 600, 'loss': 1.0}) + '\n')
  with pytest.raises(RuntimeError, match='end-of-run evaluation is not in its metrics.jsonl'):
    study._stage_result(cell, 'tokenizer', '')
  with open(workdir / 'metrics.jsonl', 'a') as f:
    f.write(json.dumps({'step': 600, 'eval/linear_probe/n1/top1': 0.5}) + '\n')
  result = study._stage_result(cell, 'tokenizer', '')
  assert result['metrics'] == {'linear_probe/n1/top1': 0.5} and result['tokenizer_steps'] == 600
  config.evals.at_end = False  # no evaluation asked for: an empty row is the right record
  (workdir / 'config.json').write_text(config.to_json())
  (workdir / 'metrics.jsonl').write_text(json.dumps({'step': 600, 'loss': 1.0}) + '\n')
  assert study._stage_result(cell, 'tokenizer', '')['metrics'] == {}


def test_pearson_matches_numpy_and_skips_missing_values():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=9), rng.normal(size=9)
  assert results.pearson(list(x), list(y)) == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
  assert results.pearson([1.0, 2.0, None, 3.0, float('nan')], [2.0, 4.0, 1.0, 6.5, 0.0]) == \
      pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 6.5])[0, 1], rel=1e-12)
  assert np.isnan(results.pearson([1.0, 2.0], [1.0, 2.0]))


def test_figures_for_a_table_with_generation_and_probe_metrics(tmp_path):
  table = [{'cell': f'{o}-{i}', 'objective': o, 'state': 'done', 'tokenizer_flops': 10.0 ** i,
            'generation/judge_accuracy': 0.1 * i, 'generation/judge_fd': 100.0 / i,
            'reconstruction/psnr': 20.0 + i, 'linear_probe/n1/top1': 0.2 * i}
           for o in ('vtp', 'recon_only') for i in (1, 2, 3)]
  table.append({'cell': 'x', 'objective': 'vtp', 'state': 'failed: export'})
  written = figures.write(table, tmp_path)
  assert sorted(p.name for p in written) == ['generation_vs_flops.png', 'generation_vs_probe.png',
                                             'reconstruction_vs_flops.png']
  assert all(len(p.read_bytes()) > 10_000 for p in written)
  results.write(table, tmp_path)
  header = (tmp_path / 'results.csv').read_text().splitlines()[0].split(',')
  assert header[:5] == ['cell', 'objective', 'state', 'tokenizer_flops',
                        'generation/judge_accuracy']
  assert len(json.loads((tmp_path / 'results.json').read_text())) == 7


def _alive_under(path: pathlib.Path) -> list:
  """Processes whose command line names `path` (the study's children)."""
  found = []
  for pid in os.listdir('/proc'):
    if not pid.isdigit():
      continue
    try:
      cmdline = pathlib.Path(f'/proc/{pid}/cmdline').read_bytes().decode(errors='ignore')
    except OSError:
      continue
    if str(path) in cmdline and int(pid) != os.getpid():
      found.append(int(pid))
  return found


def _markers(cell_dir: pathlib.Path) -> dict:
  """{finished stage record: its modification time}."""
  return {p.name: p.stat().st_mtime_ns for p in (cell_dir / 'done').glob('*.json')}


def _dollar_lines(log: pathlib.Path) -> int:
  return sum(line.startswith('$ ') for line in log.read_text().splitlines())


@pytest.mark.heavy
def test_micro_study_killed_mid_run_completes_on_rerun_without_redoing_finished_stages(tmp_path):
  # The smoke preset plus a cell that cannot start (its data source matches no file).
  config_file = tmp_path / 'study_config.py'
  config_file.write_text(
      'from configs.study import shapes_smoke\n'
      'def get_config():\n'
      '  c = shapes_smoke.get_config()\n'
      "  c.objectives = {'vtp': 'configs/vtp_tiny.py', 'broken': 'configs/vtp_tiny.py'}\n"
      "  c.objective_overrides = {'broken': ['data.source=tar:/nonexistent/*.tar']}\n"
      '  return c\n')
  workdir = tmp_path / 'study'
  # One CPU device (vtp_tiny's 4 reconstruction images do not split over the suite's 8), the
  # suite's fast LLVM settings and its compilation cache.
  env = dict(os.environ, PYTHONPATH=f'{REPO}{os.pathsep}{tmp_path}', XLA_FLAGS=FAST_COMPILE)
  argv = [sys.executable, '-m', 'vtp_jax.study', f'--config={config_file}',
          f'--workdir={workdir}']
  finished, killed = workdir / 'cells' / 'vtp-s2', workdir / 'cells' / 'vtp-s3'
  # Kill the study (SIGKILL: no cleanup of its own) while the last cell exports its latents: the
  # cells run one at a time in name order, so by then vtp-s2 is finished.
  proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 900
  while not (killed / 'logs' / 'export.log').exists():
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() < deadline, 'the last cell never reached its export'
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  finished_before, killed_before = _markers(finished), _markers(killed)
  assert len(finished_before) == 4 and killed_before.keys() == {'tokenizer.json'}
  # Its running command got SIGTERM from the kernel (guard.py) and is gone.
  deadline = time.time() + 60
  while _alive_under(workdir):
    assert time.time() < deadline, 'a stage outlived the killed study'
    time.sleep(0.5)

  # The same command again, two cells at a time, runs to the end.
  done = subprocess.run(argv + ['--parallel=2'], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=1200)
  assert done.returncode == 1, done.stdout + done.stderr  # 1: the broken cells failed
  summary = json.loads(done.stdout[done.stdout.index('{\n'):])
  assert summary['cells'] == {'vtp-s2': 'done', 'vtp-s3': 'done',
                              'broken-s2': 'failed: tokenizer', 'broken-s3': 'failed: tokenizer'}
  # The finished cell and the killed cell's finished stage were not redone; the killed stage ran
  # again from scratch.
  assert _markers(finished) == finished_before
  assert _markers(killed)['tokenizer.json'] == killed_before['tokenizer.json']
  for stage in cells_lib.STAGES:
    assert _dollar_lines(finished / 'logs' / f'{stage}.log') == 1, stage
  assert _dollar_lines(killed / 'logs' / 'tokenizer.log') == 1
  assert _dollar_lines(killed / 'logs' / 'export.log') == 2
  failure = json.loads((workdir / 'cells' / 'broken-s2' / 'failed.json').read_text())
  assert failure['stage'] == 'tokenizer' and 'exit status 2' in failure['error']

  rows = {r['cell']: r for r in json.loads((workdir / 'results.json').read_text())}
  assert set(rows) == {'vtp-s2', 'vtp-s3', 'broken-s2', 'broken-s3'}
  for name in ('vtp-s2', 'vtp-s3'):
    row = rows[name]
    assert row['state'] == 'done'
    assert 0 < row['reconstruction/psnr'] < 60 and 0 <= row['linear_probe/n1/top1'] <= 1
    assert row['generation/examples'] == 48
    assert row['tokenizer_steps'] == int(name[-1])
  # Analytic FLOPs are per step x steps: 3 steps cost 1.5x 2 steps of the same model.
  assert rows['vtp-s3']['tokenizer_flops'] == pytest.approx(1.5 * rows['vtp-s2']['tokenizer_flops'])
  assert rows['broken-s2']['state'] == 'failed: tokenizer'
  assert (workdir / 'results.csv').read_text().count('\n') == 5
  assert (workdir / 'reconstruction_vs_flops.png').exists()
