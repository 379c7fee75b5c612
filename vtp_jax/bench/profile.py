"""Profile the train step and print where its time goes, as JSON.

  python -m vtp_jax.bench.profile --config=configs/vtp_s.py [--steps=1] [--top=25]
      [--trace_dir=DIR] [--config.data.batch_size=8 ...]

Runs the real step (`vtp_jax.bench.common.build_step`, synthetic batch) once to warm up, traces
`--steps` more with `jax.profiler`, and sums the duration of every XLA operation in the trace:
  - by kind: the operation's name without its number (`ynn_fusion`, `copy_bitcast_fusion`, ...);
  - by model scope: the source op_name XLA kept in the compiled HLO, with block indices folded
    (`text/blocks_N/mlp/fc1/dot_general`) and the pass named (`forward`, `backward`).
Operations may overlap (XLA:CPU runs independent ones concurrently), so `op_time_s` can exceed the
step time; the shares still say which operations to look at. This is how the LayerNorm backward
chain (docs/benchmarks.md, 'LayerNorm backward') was found. Imports stay inside main(), as in
step.py.
"""

import collections
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file', lock_config=False)
flags.DEFINE_integer('steps', 1, 'steps traced after the warm-up step')
flags.register_validator('steps', lambda n: n >= 1,
                         message='--steps must be at least 1: the steps traced after the warm-up.')
flags.DEFINE_integer('top', 25, 'entries listed per breakdown')
flags.DEFINE_string('trace_dir', '', 'where the trace is written (kept); empty: a temporary folder')
FLAGS = flags.FLAGS

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (.*)$', re.M)
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def op_names(hlo_text: str) -> dict:
  """HLO instruction name -> the source op_name of its metadata (first definition wins)."""
  names = {}
  for match in _INSTRUCTION.finditer(hlo_text):
    op = _OP_NAME.search(match.group(2))
    if op:
      names.setdefault(match.group(1), op.group(1))
  return names


def scope(op_name: str) -> str:
  """'jit(f)/transpose(jvp(VTP.m))/text/blocks_3/mlp/fc1/dot_general' ->
  'backward text/blocks_N/mlp/fc1/dot_general': the pass, then the module path, indices folded."""
  direction = 'backward' if 'transpose(' in op_name else 'forward'
  path = [part for part in op_name.split('/') if not part.startswith(('jit(', 'jvp(', 'transpose('))
          and not part.startswith('VTP')]
  return direction + ' ' + re.sub(r'blocks_\d+', 'blocks_N', '/'.join(path))


def op_durations(trace_events) -> collections.Counter:
  """XLA operation name -> total microseconds, from Chrome-trace complete ('X') events that name
  an HLO op (the executor's own bookkeeping events carry no `hlo_op` and are left out)."""
  total = collections.Counter()
  for event in trace_events:
    if event.get('ph') == 'X' and 'hlo_op' in event.get('args', {}):
      total[event['args']['hlo_op']] += float(event['dur'])
  return total


def breakdown(durations: collections.Counter, names: dict, top: int) -> dict:
  """The JSON body: totals by operation kind and by model scope, largest first, in seconds
  (per step when `durations` are)."""
  by_kind, by_scope = collections.Counter(), collections.Counter()
  for op, micros in durations.items():
    by_kind[re.sub(r'\.\d+$', '', op)] += micros
    by_scope[scope(names[op]) if op in names else '(no source op)'] += micros

  def listed(counter):
    return [[key, round(micros / 1e6, 4)] for key, micros in counter.most_common(top)]

  return {'op_time_s': round(sum(durations.values()) / 1e6, 4), 'ops_traced': len(durations),
          'by_kind_s': listed(by_kind), 'by_scope_s': listed(by_scope)}


def _read_trace(trace_dir: pathlib.Path) -> list:
  files = sorted(trace_dir.glob('**/*.trace.json.gz'), key=lambda f: f.stat().st_mtime)
  if not files:
    raise FileNotFoundError(f'jax.profiler wrote no *.trace.json.gz under {trace_dir}; is the '
                            'profiler plugin of this jaxlib working?')
  with gzip.open(files[-1]) as f:
    data = json.load(f)
  return data['traceEvents'] if isinstance(data, dict) else data


def main(argv):
  del argv
  from vtp_jax import host_malloc  # first, before JAX starts: it may restart the process
  malloc_line = host_malloc.apply(host_malloc.mode_of(_CONFIG.value))
  import jax

  from vtp_jax.bench import common

  _, compiled, run, state = common.warmed_up_step(_CONFIG.value)

  from vtp_jax import paths

  with tempfile.TemporaryDirectory() as scratch:
    # jax.profiler writes through the local filesystem: a bucket gets a copy of the trace after.
    local = not FLAGS.trace_dir or paths.is_bucket(FLAGS.trace_dir)
    trace_dir = pathlib.Path(scratch if local else FLAGS.trace_dir)
    jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True)
    t0 = time.perf_counter()
    for _ in range(FLAGS.steps):
      state, metrics = run(state)
    jax.block_until_ready((state.step, metrics))
    traced_s = time.perf_counter() - t0
    jax.profiler.stop_trace()
    events = _read_trace(trace_dir)
    if FLAGS.trace_dir and local:
      paths.copy_tree(trace_dir, FLAGS.trace_dir)

  per_step = collections.Counter({op: micros / FLAGS.steps
                                  for op, micros in op_durations(events).items()})
  report = {'steps_traced': FLAGS.steps, 'step_time_s_traced': traced_s / FLAGS.steps,
            **breakdown(per_step, op_names(compiled.as_text()), FLAGS.top),
            'host_malloc': malloc_line, 'jax': jax.__version__}
  print(json.dumps(report, indent=1))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
  sys.exit(0)
