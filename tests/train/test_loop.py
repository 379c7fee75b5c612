"""The training driver end to end: bad configs fail before compiling (in-process), and in
subprocesses on one CPU device: SIGKILL (also right after an async save starts) and SIGTERM, then
re-running the same command, ends bit-identical to an uninterrupted run; the NaN policies; the
bound on how far the host runs ahead of the device.

Subprocesses share a persistent compilation cache, so only the first run of a program compiles.
The driver runs the CLIP and reconstruction branches of a micro model (the SSL branch would only
add compile time: the driver does not depend on which branches run).
"""

import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import driver_subprocess_env, micro_config
from vtp_jax import checkpoints
from vtp_jax import tasks
from vtp_jax.driver import loop
from vtp_jax.train import wall_time

REPO = pathlib.Path(__file__).resolve().parents[2]



@pytest.fixture(scope='session')
def driver_env(tmp_path_factory):
  """(config file, environment) for driver subprocesses: 1 CPU device, a shared compile cache."""
  return driver_subprocess_env(tmp_path_factory.getbasetemp(), 'driver_micro')


def _command(config_file, workdir):
  return [sys.executable, str(REPO / 'launch' / 'main.py'), f'--config={config_file}',
          f'--workdir={workdir}']


def _start(config_file, workdir, env):
  return subprocess.Popen(_command(config_file, workdir), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, cwd=REPO)


def _wait_for(proc, pattern, timeout=300):
  """Reads the process's output until a line matches; returns (match, text so far)."""
  seen = []
  deadline = time.time() + timeout
  while time.time() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    seen.append(line)
    if m := re.search(pattern, line):
      return m, ''.join(seen)
  raise AssertionError(f'{pattern!r} never appeared; output:\n{"".join(seen)[-3000:]}')


def _params(workdir):
  return jax.tree.map(np.asarray, checkpoints.load_item(workdir, 'params'))


def _latest(workdir):
  latest = checkpoints.latest_step_dir(workdir)
  return None if latest is None else int(latest.name)


@pytest.mark.heavy
def test_sigkill_and_sigterm_then_rerun_is_bit_identical_to_an_uninterrupted_run(
    driver_env, tmp_path):
  config_file, env = driver_env
  ref = subprocess.run(_command(config_file, tmp_path / 'ref'), env=env, capture_output=True,
                       text=True, cwd=REPO)
  assert ref.returncode == 0, ref.stderr[-3000:]
  assert _latest(tmp_path / 'ref') == 40

  work = tmp_path / 'interrupted'
  # 1. SIGKILL right after the save of step 20 starts, its asynchronous write still in flight.
  killed = subprocess.run(_command(config_file, work), capture_output=True, text=True, cwd=REPO,
                          env=dict(env, VTP_TEST_KILL_AFTER_SAVE='20'))
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert _latest(work) in (10, 20)  # 20 only if its write happened to finish before the kill

  # 2. SIGTERM mid-training: saves at the next step boundary and exits 0.
  proc = _start(config_file, work, env)
  _wait_for(proc, rf'Resumed from .*/{_latest(work)}\.')
  _wait_for(proc, r'step (\d+)/40')
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  saved = int(re.search(r'Preempted: saved step (\d+)', out).group(1))
  assert _latest(work) == saved

  # 3. SIGKILL at a random moment of the resumed run (training or saving).
  proc = _start(config_file, work, env)
  _wait_for(proc, rf'Resumed from .*/{saved}\.')  # the SIGTERM save is where the next run starts
  _wait_for(proc, r'step (\d+)/40')
  delay = random.Random(os.getpid()).uniform(0.0, 0.6)
  time.sleep(delay)
  proc.kill()
  proc.communicate()

  # 4. The same command again finishes the run.
  resume_from = _latest(work)
  final = subprocess.run(_command(config_file, work), env=env, capture_output=True, text=True,
                         cwd=REPO)
  assert final.returncode == 0, final.stderr[-3000:]
  assert re.search(rf'Resumed from .*/{resume_from}\.', final.stderr), final.stderr[-3000:]
  assert _latest(work) == 40
  reference, resumed = _params(tmp_path / 'ref'), _params(work)
  for path, a in jax.tree_util.tree_flatten_with_path(reference)[0]:
    b = resumed
    for key in path:
      b = b[key.key]
    np.testing.assert_array_equal(a, b, err_msg=f'{path} (last kill after {delay:.2f} s)')
  # Metrics and the image grid went to the workdir; every step 1..12 logged at least once.
  steps = {json.loads(line)['step'] for line in (work / 'metrics.jsonl').read_text().splitlines()}
  assert steps == set(range(1, 41))
  assert list((work / 'tensorboard').glob('events.out.tfevents.*'))


def _run_script(driver_env, script: str, **paths):
  """Runs a driver script (its `{repo}` and `{config_dir}` filled, and `paths`) in a subprocess;
  returns the finished process and the JSON it printed after 'RESULT '."""
  config_file, env = driver_env
  code = script.format(repo=str(REPO), config_dir=str(config_file.parent), **paths)
  run = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       cwd=REPO)
  assert run.returncode == 0, run.stderr[-3000:]
  return run, json.loads(run.stdout.split('RESULT ', 1)[1])


NAN_SCRIPT = '''
import json, sys
sys.path[:0] = [{repo!r}, {config_dir!r}]
import driver_micro
from vtp_jax.data import synthetic
from vtp_jax import tasks
from vtp_jax.driver import loop
from vtp_jax.train import wall_time

clean = synthetic.global_batch

def poisoned(config, index, *make_batch):
  batch = clean(config, index, *make_batch)
  if index == 4:  # consumed by step 5: out-of-vocabulary tokens embed as NaN (jnp.take fills)
    batch['clip']['tokens'][:] = 10 ** 6
  return batch

synthetic.global_batch = poisoned
out = {{}}
c = driver_micro.get_config()
c.train.update(steps=8, checkpoint_every=2, image_log_every=0)
try:
  loop.train_and_evaluate(c, {stop!r})
  out['stop'] = 'finished'
except loop.NonFiniteLoss as e:
  out['stop'] = str(e)
c.train.update(nan_policy='skip', checkpoint_every=1, keep_checkpoints=20)
out['skip'] = loop.train_and_evaluate(c, {skip!r})
print('RESULT ' + json.dumps(out))
'''


@pytest.mark.heavy
def test_nan_policies_stop_keeps_the_last_good_checkpoint_and_skip_drops_the_update(
    driver_env, tmp_path):
  _, out = _run_script(driver_env, NAN_SCRIPT, stop=str(tmp_path / 'stop'),
                       skip=str(tmp_path / 'skip'))

  assert re.search(r'Non-finite values at step 5 .*last good checkpoint is step 4', out['stop'])
  assert _latest(tmp_path / 'stop') == 4  # nothing saved after the NaN
  good = _params(tmp_path / 'stop')
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(good))

  assert out['skip']['step'] == 8
  by_step = {s: _params(checkpoints.checkpoint_root(tmp_path / 'skip') / str(s))
             for s in (4, 5, 6)}
  for a, b in zip(jax.tree.leaves(by_step[4]), jax.tree.leaves(by_step[5])):
    np.testing.assert_array_equal(a, b)  # step 5's update was dropped
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(by_step[5]),
                                                       jax.tree.leaves(by_step[6])))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(_params(tmp_path / 'skip')))
  rows = [json.loads(r) for r in (tmp_path / 'skip' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['skipped_updates'] for r in rows if r['step'] in (4, 5, 8)] == [0.0, 1.0, 1.0]


AHEAD_SCRIPT = '''
import json, sys
sys.path[:0] = [{repo!r}, {config_dir!r}]
import driver_micro
from vtp_jax.train import in_flight
from vtp_jax.driver import loop
from vtp_jax.train import wall_time

events = []
real_add, real_wait = in_flight.InFlight.add, in_flight.wait_for_device

def traced_add(self, step, metrics):
  events.append(('dispatched', step))
  real_add(self, step, metrics)

def traced_wait(step, guards):
  real_wait(step, guards)
  events.append(('finished', step))

in_flight.InFlight.add, in_flight.wait_for_device = traced_add, traced_wait
out = {{}}
c = driver_micro.get_config()
for ahead in (2, 0):
  events.clear()
  c.train.update(steps=8, log_every=100, checkpoint_every=100, image_log_every=0,
                 max_steps_ahead=ahead)
  loop.train_and_evaluate(c, {work!r} + str(ahead))
  out[ahead] = list(events)
print('RESULT ' + json.dumps(out))
'''


@pytest.mark.heavy
def test_the_host_waits_for_step_n_minus_k_after_dispatching_step_n(driver_env, tmp_path):
  """With log_every and checkpoint_every beyond the run, only train.max_steps_ahead stops the host
  from queueing every step (which delays a SIGTERM save by up to log_every steps)."""
  _, out = _run_script(driver_env, AHEAD_SCRIPT, work=str(tmp_path / 'run'))
  expected = [['dispatched', 1], ['dispatched', 2]]
  for n in range(3, 9):  # after dispatching step n the host waits for step n - 2
    expected += [['dispatched', n], ['finished', n - 2]]
  assert out['2'] == expected
  assert out['0'] == [['dispatched', n] for n in range(1, 9)]  # 0: unbounded, no waits


# -- bad configs: one clear error each, before anything compiles -------------------------------

def _bad(**changes):
  c = micro_config()
  c.data.update(source='synthetic', batch_size=64)  # valid on 8 devices: SSL 16, rec 8
  c.optim.update(warmup_steps=2, freeze_last_layer_steps=1)
  c.train.steps = 4
  for key, value in changes.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.mark.parametrize('changes, message', [
    ({'data.batch_size': 12}, r"data.batch_size = 12 does not divide over the 8 devices"),
    ({'mesh.data': 3}, r"needs 3 devices but 8 are present"),
    ({'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 3}, r"needs 12 devices but 8 are present"),
    ({'data.source': 'tar:/nonexistent/shards-*.tar'}, r"no file matches '/nonexistent/shards"),
    ({'data.source': 'arrayrecord:'}, r"names no path"),
    ({'data.source': ''}, r"data.source is empty"),
    ({'train.nan_policy': 'ignore'}, r"train.nan_policy='ignore'"),
    ({'train.checkpoint_every': 0}, r"train.checkpoint_every=0 must be at least 1"),
    ({'train.max_steps_ahead': -1}, r"train.max_steps_ahead=-1 must be 0 \(unbounded\) or more"),
    ({'train.init_from': '/nonexistent/ckpt'}, r"train.init_from=/nonexistent/ckpt: .*no vtp-jax"),
])
def test_bad_config_fails_before_compiling_with_one_clear_line(changes, message, tmp_path,
                                                               monkeypatch):
  def must_not_run(*args, **kwargs):
    raise AssertionError('compiled or initialised before the config was checked')

  monkeypatch.setattr(loop, 'compile_step', must_not_run)
  monkeypatch.setattr(tasks.TokenizerTask, 'create_state', must_not_run)
  with pytest.raises(loop.ConfigError, match=message) as error:
    loop.train_and_evaluate(_bad(**changes), tmp_path / 'work')
  assert '\n' not in str(error.value)


def test_empty_data_folder_is_a_config_error(tmp_path, monkeypatch):
  (tmp_path / 'images').mkdir()
  monkeypatch.setattr(tasks.TokenizerTask, 'create_state', lambda *a, **k: pytest.fail('initialised'))
  with pytest.raises(loop.ConfigError, match='holds no files'):
    loop.train_and_evaluate(_bad(**{'data.source': f'folder:{tmp_path / "images"}'}),
                            tmp_path / 'work')


WALL_SCRIPT = '''
import json, sys, time
sys.path[:0] = [{repo!r}, {config_dir!r}]
import driver_micro
from absl import logging
from vtp_jax.data import synthetic
from vtp_jax.driver import loop

logging.set_verbosity('info')  # as launch/main.py runs: the summary line is an INFO line
out = {{}}
c = driver_micro.get_config()
c.train.update(steps=12, log_every=4, checkpoint_every=6, image_log_every=0)
for name in ('normal', 'slowed'):
  if name == 'slowed':  # every batch of the source takes 0.3 s to read, far longer than a step
    fast = synthetic.global_batch
    synthetic.global_batch = lambda *a: (time.sleep(0.3), fast(*a))[1]
  print('JOB ' + name, file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  summary = loop.train_and_evaluate(c, {work!r} + name)
  out[name] = {{'measured_s': time.perf_counter() - t0, 'wall_time': summary['wall_time']}}
print('RESULT ' + json.dumps(out))
'''


@pytest.mark.heavy
def test_the_wall_time_breakdown_sums_to_the_run_and_names_an_input_bound_one(driver_env,
                                                                            tmp_path):
  run, out = _run_script(driver_env, WALL_SCRIPT, work=str(tmp_path / 'work_'))
  logs = dict(re.findall(r'^JOB (\S+)\n(.*?)(?=^JOB |\Z)', run.stderr, re.S | re.M))
  for name in ('normal', 'slowed'):
    totals = out[name]['wall_time']
    # The parts cover the run as a clock outside it measured it.
    assert abs(sum(totals['seconds'].values()) - out[name]['measured_s']) <= (
        0.05 * out[name]['measured_s']), (name, totals, out[name]['measured_s'])
    rows = [json.loads(r) for r in (tmp_path / f'work_{name}' / 'metrics.jsonl').read_text()
            .splitlines()]
    assert [r['step'] for r in rows] == [4, 8, 12]
    for r in rows:  # each interval's shares add up to its time
      assert abs(sum(r[f'time/{p}_share'] for p in wall_time.PARTS) - 1.0) < 1e-6, r
    assert re.search(r'Wall time [\d.]+ s: step [\d.]+%, data [\d.]+%, checkpoint [\d.]+%, '
                     r'evaluation [\d.]+%, compile [\d.]+%, startup [\d.]+%, other [\d.]+%; '
                     r'goodput', logs[name])
  slowed = out['slowed']['wall_time']
  # 12 batches of 0.3 s each: the source's prefetch reads a few ahead during the compilation, the
  # training thread waits for the rest.
  assert slowed['seconds']['data'] >= 0.8 * 8 * 0.3, slowed
  last = {name: json.loads((tmp_path / f'work_{name}' / 'metrics.jsonl').read_text()
                           .splitlines()[-1]) for name in ('normal', 'slowed')}
  assert last['slowed']['time/data_share'] > 0.5, last['slowed']
  assert last['normal']['time/data_share'] < last['slowed']['time/data_share'] / 2, last
  lines = re.findall(r'Input-bound: the training thread waited for its batches (\d+)% of the last '
                     r'interval', logs['slowed'])
  assert len(lines) == 1 and int(lines[0]) > 10, logs['slowed'][-3000:]
