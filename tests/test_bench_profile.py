"""`python -m vtp_jax.bench.profile`: the trace bookkeeping on hand-made events, then one real run.

No speed is asserted; the real run checks that the trace is read and its operations are traced back
to model scopes (the step's blocks appear, folded to blocks_N).
"""

import collections
import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import FAST_COMPILE, MICRO_CONFIG
from vtp_jax.bench import profile

REPO = pathlib.Path(__file__).resolve().parents[1]

HLO = '''
  %dot.7 = f32[8,16]{1,0} dot(%a, %b), metadata={op_name="jit(step)/jvp(VTP.encode)/encoder/blocks_3/mlp/fc1/dot_general"}
  %copy_fusion.2 = f32[16,8]{1,0} fusion(%c), kind=kLoop, metadata={op_name="jit(step)/transpose(jvp(VTP.encode))/encoder/blocks_11/norm1/add_any"}
  ROOT %copy_fusion.3 = f32[16,8]{1,0} fusion(%d), kind=kLoop, metadata={op_name="jit(step)/transpose(jvp(VTP.encode))/encoder/blocks_2/norm1/add_any"}
  %tuple.1 = (f32[]) tuple(%e)
'''


def test_op_names_and_scopes_fold_blocks_and_name_the_pass():
  names = profile.op_names(HLO)
  assert set(names) == {'dot.7', 'copy_fusion.2', 'copy_fusion.3'}
  assert profile.scope(names['dot.7']) == 'forward encoder/blocks_N/mlp/fc1/dot_general'
  assert profile.scope(names['copy_fusion.2']) == 'backward encoder/blocks_N/norm1/add_any'


def test_breakdown_sums_durations_by_kind_and_scope():
  events = [
      {'ph': 'X', 'name': 'dot.7', 'dur': 1500.0, 'args': {'hlo_op': 'dot.7'}},
      {'ph': 'X', 'name': 'dot.7', 'dur': 500.0, 'args': {'hlo_op': 'dot.7'}},
      {'ph': 'X', 'name': 'copy_fusion.2', 'dur': 3000.0, 'args': {'hlo_op': 'copy_fusion.2'}},
      {'ph': 'X', 'name': 'copy_fusion.3', 'dur': 1000.0, 'args': {'hlo_op': 'copy_fusion.3'}},
      {'ph': 'X', 'name': 'ThunkExecutor::Execute', 'dur': 9e6, 'args': {}},  # bookkeeping
      {'ph': 'i', 'name': 'dot.7', 'args': {'hlo_op': 'dot.7'}},  # not a complete event
  ]
  durations = profile.op_durations(events)
  assert durations == collections.Counter({'dot.7': 2000.0, 'copy_fusion.2': 3000.0,
                                           'copy_fusion.3': 1000.0})
  report = profile.breakdown(durations, profile.op_names(HLO), top=5)
  assert report['op_time_s'] == 0.006 and report['ops_traced'] == 3
  assert report['by_kind_s'] == [['copy_fusion', 0.004], ['dot', 0.002]]
  assert report['by_scope_s'] == [['backward encoder/blocks_N/norm1/add_any', 0.004],
                                  ['forward encoder/blocks_N/mlp/fc1/dot_general', 0.002]]


@pytest.mark.heavy
def test_profile_command_traces_the_real_step(tmp_path):
  config_file = tmp_path / 'profile_micro.py'
  config_file.write_text(MICRO_CONFIG)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO), XLA_FLAGS=FAST_COMPILE)
  run = subprocess.run(
      [sys.executable, '-m', 'vtp_jax.bench.profile', f'--config={config_file}', '--top=200',
       '--config.precision.scan_layers=False'],
      env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
  assert run.returncode == 0, run.stderr[-4000:]
  report = json.loads(run.stdout)
  assert report['ops_traced'] > 50 and report['op_time_s'] > 0
  scopes = [name for name, _ in report['by_scope_s']]
  assert any(s.startswith('forward encoder/blocks_N/') for s in scopes), scopes[:20]
  assert any(s.startswith('backward ') for s in scopes), scopes[:20]
