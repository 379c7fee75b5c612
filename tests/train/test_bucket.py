"""A training workdir in a bucket (`--workdir=gs://...`), against a real GCS-protocol server on
localhost (tests/gcs_server.py): a run killed after a checkpoint resumes bit-identically with every
step logged once; a damaged newest step is set aside by copy and delete, a kill at either point of
that leaves a state the next run reads; a missing bucket, a read-only bucket and a workdir the
processes do not share each stop with one line before anything compiles.

Every run is launch/main.py on the micro config in a subprocess (one CPU device, a shared compile
cache), as a user runs it.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import gcs_server
from conftest import driver_subprocess_env
from test_checkpoint_damage import DAMAGE, _file_hash, _run_jobs
from vtp_jax import checkpoints
from vtp_jax import paths

REPO = pathlib.Path(__file__).resolve().parents[2]
# One worker runs this module: its reference run and re-runs are module fixtures, computed once
# (pyproject.toml: --dist loadgroup).
pytestmark = pytest.mark.xdist_group('bucket')
STEPS = ['--config.train.steps=8', '--config.train.checkpoint_every=2',
         '--config.train.image_log_every=4']


@pytest.fixture(scope='module')
def run_env(tmp_path_factory):
  return driver_subprocess_env(tmp_path_factory.getbasetemp(), 'damage_micro')


def _main(run_env, workdir, *flags, env=None, timeout=600):
  config_file, base_env = run_env
  return subprocess.run([sys.executable, str(REPO / 'launch' / 'main.py'),
                         f'--config={config_file}', f'--workdir={workdir}', *STEPS, *flags],
                        env=dict(base_env, **(env or {})), capture_output=True, text=True,
                        cwd=REPO, timeout=timeout)


def _params(workdir):
  return jax.tree.map(np.asarray, checkpoints.load_item(workdir, 'params'))


def _assert_bit_identical(a, b):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def _latest(workdir):
  latest = checkpoints.latest_step_dir(workdir)
  return None if latest is None else int(latest.name)


@pytest.fixture(scope='module')
def bucket(gcs):
  return gcs.bucket('vtp-runs')


@pytest.fixture(scope='module')
def reference(run_env, bucket):
  """The uninterrupted run in the bucket: steps 4, 6 and 8 kept."""
  work = f'{bucket}/reference'
  results, _ = _run_jobs(run_env, [{'name': 'reference', 'workdir': work}])
  assert results['reference']['summary']['step'] == 8
  assert paths.child_names(f'{work}/checkpoints') == ['4', '6', '8']
  return work


@pytest.mark.heavy
def test_a_run_killed_after_a_checkpoint_resumes_bit_identical_and_logs_each_step_once(
    run_env, bucket, reference):
  work = f'{bucket}/killed'
  killed = _main(run_env, work, env={'VTP_TEST_KILL_AFTER_SAVE': '6'})
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert _latest(work) in (4, 6)  # 6 only if its write finished before the kill
  resumed_from = _latest(work)
  final = _main(run_env, work)
  assert final.returncode == 0, final.stderr[-3000:]
  assert re.search(rf'Resumed from {re.escape(work)}/checkpoints/{resumed_from}\.', final.stderr)
  assert _latest(work) == 8
  _assert_bit_identical(_params(reference), _params(work))
  rows = [json.loads(line) for line in paths.path(f'{work}/metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == list(range(1, 9))
  events = paths.child_names(f'{work}/tensorboard')
  assert len(events) == 2 and all(e.startswith('events.out.tfevents.') for e in events), events
  # No file of the run landed in a local folder named after the bucket.
  assert not (REPO / 'gs:').exists()


def test_metrics_of_a_resumed_run_hold_each_step_once(gcs):
  from vtp_jax.train import metrics
  work = gcs.bucket('vtp-metrics')
  first = metrics.Writer(work, enabled=True, start_step=0)
  for step in range(1, 7):  # the killed run logged up to 6; its last checkpoint was 4
    first.scalars(step, {'loss': float(step)})
  first.close()
  second = metrics.Writer(work, enabled=True, start_step=4)
  for step in range(5, 9):
    second.scalars(step, {'loss': 10.0 + step})
  second.close()
  rows = [json.loads(line) for line in paths.path(f'{work}/metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['loss']) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0),
                                                    (5, 15.0), (6, 16.0), (7, 17.0), (8, 18.0)]


def _damaged_copy(reference, work, case):
  paths.copy_tree(reference, work)
  damage, _ = DAMAGE[case]
  f = damage(f'{work}/checkpoints/8')
  return os.path.relpath(os.fspath(f), f'{work}/checkpoints/8'), _file_hash(f)


@pytest.fixture(scope='module')
def damaged_reruns(run_env, bucket, reference):
  """Each damage of the newest step applied to a copy of the reference in the bucket, and every
  copy re-run, in one process (tests/train/test_checkpoint_damage.py's jobs)."""
  damaged, jobs = {}, []
  for case in DAMAGE:
    work = f'{bucket}/damaged-{case}'
    damaged[case] = _damaged_copy(reference, work, case)
    jobs.append({'name': case, 'workdir': work})
  results, logs = _run_jobs(run_env, jobs)
  return damaged, results, logs


@pytest.mark.heavy
@pytest.mark.parametrize('case', list(DAMAGE))
def test_a_damaged_newest_step_in_the_bucket_is_set_aside_and_the_run_resumes(
    damaged_reruns, bucket, reference, case):
  damaged, results, logs = damaged_reruns
  work, log = f'{bucket}/damaged-{case}', logs[case]
  lines = re.findall(r'Checkpoint step (\d+) is unreadable \((.*)\); moved to (\S+); resuming '
                     r'from step (\d+)\.', log)
  assert len(lines) == 1, log[-3000:]
  step, cause, aside, resumed = lines[0]
  assert (step, resumed, aside) == ('8', '6', f'{work}/checkpoints/8.unreadable'), lines[0]
  assert re.fullmatch(DAMAGE[case][1], cause), cause
  assert 'Traceback' not in log, log[-3000:]
  assert {k: v for k, v in results[case]['summary'].items() if k != 'wall_time'} == {
      'start_step': 6, 'preempted': False, 'step': 8,
      'last_checkpoint': 8}
  assert paths.child_names(f'{work}/checkpoints') == ['4', '6', '8', '8.unreadable']
  relative, digest = damaged[case]
  assert _file_hash(f'{aside}/{relative}') == digest  # kept as it was
  _assert_bit_identical(_params(reference), _params(work))


@pytest.mark.heavy
def test_a_kill_at_either_point_of_the_set_aside_leaves_a_state_the_next_run_reads(
    run_env, bucket, reference):
  work = f'{bucket}/set-aside-killed'
  relative, digest = _damaged_copy(reference, work, 'random_bytes')
  root = f'{work}/checkpoints'
  # Killed after the copy: step 8 is still a step, its copy is complete beside it.
  first = _main(run_env, work, env={'VTP_TEST_KILL_DURING_SET_ASIDE': 'copied'})
  assert first.returncode == -9, first.stderr[-3000:]
  assert _latest(work) == 8 and paths.path(f'{root}/8.unreadable/commit_success.txt').exists()
  # Killed after the step's marker went: 8 is no step any more (a leftover the next start deletes).
  second = _main(run_env, work, env={'VTP_TEST_KILL_DURING_SET_ASIDE': 'unmarked'})
  assert second.returncode == -9, second.stderr[-3000:]
  assert _latest(work) == 6
  # The same command again resumes from 6 and ends as the uninterrupted run.
  final = _main(run_env, work)
  assert final.returncode == 0, final.stderr[-3000:]
  assert re.search(rf'Resumed from {re.escape(root)}/6\.', final.stderr), final.stderr[-3000:]
  assert paths.child_names(root) == ['4', '6', '8', '8.unreadable']
  assert _file_hash(f'{root}/8.unreadable/{relative}') == digest
  _assert_bit_identical(_params(reference), _params(work))


def _one_error_line(run):
  errors = [line for line in run.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and run.stderr.strip().splitlines()[-1] == errors[0], run.stderr[-3000:]
  assert 'Compiled the train step' not in run.stderr and 'Traceback' not in run.stderr
  return errors[0]


def test_a_missing_bucket_stops_with_one_line_before_compiling(run_env, gcs):
  run = _main(run_env, 'gs://no-such-bucket-here/run', timeout=300)
  assert run.returncode == 2, run.stderr[-3000:]
  assert re.fullmatch(r'error: gs://no-such-bucket-here/run: the bucket gs://no-such-bucket-here '
                      r'does not exist .*; create it \(gcloud storage buckets create '
                      r'gs://no-such-bucket-here\) or fix --workdir\.', _one_error_line(run))


def test_a_read_only_bucket_stops_with_one_line_before_compiling(run_env, gcs):
  work = gcs.bucket('vtp-read-only') + '/run'
  view = gcs_server.ReadOnlyView(gcs)
  try:
    run = _main(run_env, work, env=view.environment(), timeout=300)
  finally:
    view.stop()
  assert run.returncode == 2, run.stderr[-3000:]
  line = _one_error_line(run)
  assert re.fullmatch(rf'error: {re.escape(work)}: this account may not write there \(.*Forbidden.*'
                      r'\); grant it write access .* or choose another --workdir\.', line), line


def _free_port() -> int:
  return gcs_server.free_port()


@pytest.mark.heavy
def test_two_processes_with_unshared_workdirs_stop_with_one_line_at_start_up(run_env, tmp_path):
  config_file, env = run_env
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, str(REPO / 'launch' / 'main.py'), f'--config={config_file}',
       f'--workdir={tmp_path / f"host{i}" / "run"}', *STEPS,
       '--config.train.distributed.mode=on',
       f'--config.train.distributed.coordinator_address=localhost:{port}',
       '--config.train.distributed.num_processes=2', f'--config.train.distributed.process_id={i}'],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
      for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for i, (p, (_, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 2, (i, err[-3000:])
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r'error: \S+/host\d/run is not shared by the processes of this run: '
                        r'process\(es\) \[0, 1\] do not see the files of process\(es\) \[0, 1\]; '
                        r'use a bucket \(gs://\.\.\.\) or a filesystem every host mounts\.', last), (
                            i, last)
    assert 'Compiled the train step' not in err
