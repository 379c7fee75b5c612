"""The study's grid: which cells exist and the ordinary commands that make each one.

A cell is one tokenizer (an objective at one compute budget) and everything downstream of it: its
latents, a generator of fixed budget trained on them, and that generator's evaluation. Every stage
is a command a user could type (`launch/main.py`, `vtp_jax.tools.export_latents`, `vtp_jax.eval`),
run in the cell's folder, so a cell can be inspected or redone by hand:

  DIR/cells/<objective>-<budget>/
    tokenizer/     launch/main.py workdir (checkpoints, metrics.jsonl with the end-of-run evals)
    latents/       export_latents output
    generator/     launch/main.py workdir of the generator
    logs/          one log per stage (command line, then its stdout and stderr)
    done/          <stage>.json once a stage succeeded: its wall time and what it measured
    cell.json      the commands this cell is made of
"""

import dataclasses
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]  # the commands' working folder: local
STAGES = ('tokenizer', 'export', 'generator', 'generation_eval')
# The folder each stage writes inside its cell (the evaluation only prints its JSON).
STAGE_OUTPUTS = {'tokenizer': 'tokenizer', 'export': 'latents', 'generator': 'generator',
                 'generation_eval': None}


@dataclasses.dataclass(frozen=True)
class Cell:
  objective: str
  budget: str
  tokenizer_config: str  # config spec for launch/main.py, e.g. 'configs/ae_baseline.py:vtp_tiny'
  tokenizer_overrides: tuple  # 'KEY=VALUE' config overrides, the objective's then the budget's

  @property
  def name(self) -> str:
    return f'{self.objective}-{self.budget}'


def _overrides(value) -> tuple:
  return tuple(str(v) for v in (value or ()))


def grid(study) -> list:
  """Every cell of the study config: objectives outermost, each sorted by name (ConfigDict keeps
  no insertion order)."""
  if not study.objectives or not study.budgets:
    raise ValueError('the study config needs at least one entry in objectives and in budgets.')
  cells = []
  for objective, spec in sorted(study.objectives.items()):
    for budget, budget_overrides in sorted(study.budgets.items()):
      extra = study.objective_overrides.get(objective, ()) if study.objective_overrides else ()
      cells.append(Cell(objective, budget, str(spec),
                        _overrides(study.tokenizer_overrides) + _overrides(extra) +
                        _overrides(budget_overrides)))
  names = [c.name for c in cells]
  if len(set(names)) != len(names):
    raise ValueError(f'cell names repeat: {names}; objective and budget names must be unique.')
  return cells


def _config_flags(overrides) -> list:
  return [f'--config.{o}' for o in overrides]


def commands(cell: Cell, study, cell_dir, judge_dir) -> dict:
  """{stage: argv} for `cell`, run from the repository root; the folders may be local or in a
  bucket (every command takes gs:// paths)."""
  py = sys.executable
  tok, lat, gen = (cell_dir / STAGE_OUTPUTS[s] for s in ('tokenizer', 'export', 'generator'))
  fid = str(study.fid_weights or '')
  tokenizer = [py, 'launch/main.py', f'--config={cell.tokenizer_config}', f'--workdir={tok}',
               *_config_flags(cell.tokenizer_overrides)]
  if study.data_source:
    tokenizer.append(f'--config.data.source={study.data_source}')
  if fid:
    tokenizer.append(f'--config.evals.fid_weights={fid}')
  ex = study.export
  export = [py, '-m', 'vtp_jax.tools.export_latents', f'--checkpoint={tok}',
            f'--dataset={ex.dataset}', f'--split={ex.split}', f'--out={lat}',
            f'--max_examples={int(ex.max_examples)}']
  g = study.generator
  generator = [py, 'launch/main.py', f'--config={g.config}', f'--workdir={gen}',
               f'--config.latents.source=arrayrecord:{lat}/latents-*.array_record',
               *_config_flags(_overrides(g.overrides))]
  ge = study.generation_eval
  generation_eval = [py, '-m', 'vtp_jax.eval', '--task=generation', f'--checkpoint={gen}',
                     f'--tokenizer={tok}', f'--dataset={ge.dataset}',
                     f'--num_images={int(ge.num_images)}', f'--seed={int(ge.seed)}',
                     f'--judge={bool(ge.judge)}']
  if ge.judge:
    generation_eval.append(f'--judge_dir={judge_dir}')
  if float(ge.cfg_scale) > 0:
    generation_eval.append(f'--cfg_scale={float(ge.cfg_scale)}')
  if fid:
    generation_eval.append(f'--fid_weights={fid}')
  return {'tokenizer': tokenizer, 'export': export, 'generator': generator,
          'generation_eval': generation_eval}


def judge_command(study, judge_dir) -> list:
  """Trains the vtp_shapes judge once for the whole study (eval/judge.py)."""
  return [sys.executable, '-m', 'vtp_jax.eval.judge', f'--steps={int(study.judge_steps)}',
          f'--out={judge_dir}']
