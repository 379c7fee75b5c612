"""A process of a two-process run that dies (SIGKILL, right after a checkpoint save starts): the
survivor exits with status 3 within seconds, its last stderr line naming the dead process and the
step a re-run resumes from (vtp_jax/driver/peers.py); re-running the same command resumes there and
ends bit-identical to an uninterrupted run. Both deaths are covered: process 1, and process 0 (which
hosts the coordination service, so the survivor's agent aborts within milliseconds).

launch/main.py runs as users run it (two CPU processes joined by jax.distributed over localhost,
gloo collectives, a shared compile cache), with the workdir in a bucket of the local GCS server.
The watchdog's judgement of a failed collective is also tested alone, on a fake key-value store.
"""

import pathlib
import re
import subprocess
import sys
import threading
import time

import jax
import ml_collections
import numpy as np
import pytest

import gcs_server
from conftest import driver_subprocess_env
from vtp_jax import checkpoints

REPO = pathlib.Path(__file__).resolve().parents[2]
# Checkpoints at 4, 8 and 12; small steps keep the four two-process runs short.
FLAGS = ['--config.train.steps=12', '--config.train.checkpoint_every=4',
         '--config.train.image_log_every=0', '--config.train.distributed.heartbeat_timeout=10']
LINE = re.compile(r'error: process (\d) of 2 stopped answering \(.+\); re-run the same command on '
                  r'every host to resume from step (\d+)\.')
BOUND_S = 30  # the survivor's exit after the death: seconds (the heartbeat timeout is 10 s)


@pytest.fixture(scope='module')
def run_env(tmp_path_factory):
  return driver_subprocess_env(tmp_path_factory.getbasetemp(), 'dead_peer_micro')


@pytest.fixture(scope='module', params=['gcs'])  # 'local' runs it in a local folder instead
def workdirs(request, tmp_path_factory):
  """The root the runs' workdirs go under: a bucket of the local GCS server, or a local folder."""
  if request.param == 'gcs':
    return request.getfixturevalue('gcs').bucket('vtp-dead-peer')
  return str(tmp_path_factory.mktemp('dead_peer'))


def _two_processes(run_env, work, logs, kill=None, kill_at=None):
  """Both processes of one run; `kill` SIGKILLs itself once its save of step `kill_at` started.
  Returns [(exit status, monotonic time of exit, stderr)] for processes 0 and 1."""
  config_file, env = run_env
  port = gcs_server.free_port()
  procs, files = [], []
  for i in range(2):
    out, err = logs / f'{logs.name}_{i}.out', logs / f'{logs.name}_{i}.err'
    files.append(err)
    extra = {'VTP_TEST_KILL_AFTER_SAVE': str(kill_at)} if i == kill else {}
    procs.append(subprocess.Popen(
        [sys.executable, str(REPO / 'launch' / 'main.py'), f'--config={config_file}',
         f'--workdir={work}', *FLAGS, '--config.train.distributed.mode=on',
         f'--config.train.distributed.coordinator_address=localhost:{port}',
         '--config.train.distributed.num_processes=2',
         f'--config.train.distributed.process_id={i}'],
        env=dict(env, **extra), cwd=REPO, stdout=out.open('w'), stderr=err.open('w')))
  ended = [None, None]
  deadline = time.monotonic() + 600
  try:
    while None in ended and time.monotonic() < deadline:
      for i, p in enumerate(procs):
        if ended[i] is None and p.poll() is not None:
          ended[i] = time.monotonic()
      time.sleep(0.05)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [(p.returncode, t, f.read_text()) for p, t, f in zip(procs, ended, files)]


def _latest(work):
  latest = checkpoints.latest_step_dir(work)
  return None if latest is None else int(latest.name)


def _params(work):
  return jax.tree.map(np.asarray, checkpoints.load_item(work, 'params'))


def _assert_survivor_said_it(runs, dead, work):
  (killed_rc, killed_at, _), (rc, ended_at, stderr) = runs[dead], runs[1 - dead]
  assert killed_rc == -9, runs[dead][2][-3000:]
  assert rc == 3, stderr[-3000:]
  assert ended_at - killed_at < BOUND_S, (ended_at - killed_at, stderr[-3000:])
  last = stderr.strip().splitlines()[-1]
  match = LINE.fullmatch(last)
  assert match, stderr[-3000:]
  assert int(match.group(1)) == dead
  assert int(match.group(2)) == _latest(work)  # the step the re-run resumes from, in fact
  assert 'Traceback' not in stderr, stderr[-3000:]
  return int(match.group(2))


@pytest.mark.heavy
def test_a_dead_peer_ends_the_run_with_one_line_and_the_rerun_resumes_bit_identical(
    run_env, workdirs, tmp_path):
  # The uninterrupted run: one process holding both devices (the same mesh, data and global
  # batches as two processes of one device each, so the same parameters bit for bit).
  reference = f'{workdirs}/reference'
  config_file, env = run_env
  ref = subprocess.run(
      [sys.executable, str(REPO / 'launch' / 'main.py'), f'--config={config_file}',
       f'--workdir={reference}', *FLAGS],
      env=dict(env, XLA_FLAGS=env['XLA_FLAGS'] + ' --xla_force_host_platform_device_count=2'),
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]

  work = f'{workdirs}/killed'
  # Process 1 dies as its save of step 8 starts: 8 cannot complete without it (Orbax commits a
  # step once every process wrote its part), so the line says 4.
  (tmp_path / 'kill1').mkdir()
  runs = _two_processes(run_env, work, tmp_path / 'kill1', kill=1, kill_at=8)
  first = _assert_survivor_said_it(runs, 1, work)
  assert first == 4
  # Process 0, the coordination service's host, dies as its save of step 12 starts: the survivor's
  # agent aborts within milliseconds; the line still comes last, and says 8.
  (tmp_path / 'kill0').mkdir()
  runs = _two_processes(run_env, work, tmp_path / 'kill0', kill=0, kill_at=12)
  assert re.search(rf'Resumed from .*/checkpoints/{first}\.', runs[1][2]), runs[1][2][-3000:]
  second = _assert_survivor_said_it(runs, 0, work)
  assert second == 8
  # The same command again ends as the uninterrupted run did.
  (tmp_path / 'final').mkdir()
  runs = _two_processes(run_env, work, tmp_path / 'final')
  assert [r[0] for r in runs] == [0, 0], runs[0][2][-3000:] + runs[1][2][-3000:]
  assert re.search(rf'Resumed from .*/checkpoints/{second}\.', runs[0][2]), runs[0][2][-3000:]
  assert _latest(work) == 12
  want, got = _params(reference), _params(work)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_the_line_names_the_dead_processes_and_where_a_rerun_starts():
  from vtp_jax.driver import peers
  assert LINE.fullmatch(peers.describe([1], 2, 'why', 20))
  assert peers.describe([0], 2, 'why', None) == (
      'error: process 0 of 2 stopped answering (why); re-run the same command on every host to '
      'start from scratch (no checkpoint was saved).')
  assert peers.describe([1, 3, 4], 8, 'why', 7).startswith(
      'error: processes 1, 3 and 4 of 8 stopped answering (why); ')


class _Service:
  """The key-value store of a coordination service, for a watchdog without processes."""

  def __init__(self):
    self.store = {}

  def key_value_set(self, key, value, allow_overwrite=False):
    del allow_overwrite
    self.store[key] = value

  def key_value_dir_get(self, prefix):
    return sorted((k, v) for k, v in self.store.items() if k.startswith(prefix))


class _Exited(Exception):
  pass


@pytest.fixture
def watchdog_of_two(monkeypatch, tmp_path):
  """A watchdog as process 0 of 2 (heartbeat period 0.5 s), its peer's heartbeat in `service`;
  exiting raises _Exited(status) instead."""
  from vtp_jax.driver import peers
  service = _Service()
  monkeypatch.setattr(peers, '_client', lambda: service)
  monkeypatch.setattr(peers.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(peers.jax, 'process_index', lambda: 0)

  def exit_(status):
    raise _Exited(status)

  monkeypatch.setattr(peers.os, '_exit', exit_)
  config = ml_collections.ConfigDict({'train': {'distributed': {'heartbeat_timeout': 5}}})
  watchdog = peers.Watchdog(config, str(tmp_path), 4)
  yield watchdog, service
  watchdog.close()


def test_a_failed_collective_with_the_peer_beating_is_no_death(watchdog_of_two):
  watchdog, service = watchdog_of_two
  beating = threading.Event()

  def beat():
    n = 0
    while not beating.wait(0.2):
      n += 1
      service.key_value_set('vtp_peers/beat/1', str(n))

  threading.Thread(target=beat, daemon=True).start()
  try:
    t0 = time.monotonic()
    watchdog.failed(jax.errors.JaxRuntimeError('UNKNOWN: Gloo all-reduce failed'))  # returns
    assert time.monotonic() - t0 < 1.5
    watchdog.failed(ValueError('not a collective'))  # returns at once
  finally:
    beating.set()


def test_a_failed_collective_with_the_peer_silent_names_it_and_exits_3(watchdog_of_two, capfd):
  watchdog, service = watchdog_of_two
  service.key_value_set('vtp_peers/beat/1', '7')  # and never again
  watchdog.saved(8)  # in flight: nothing on disk says it completed
  error = RuntimeError('raised while handling the collective\'s error')
  error.__context__ = jax.errors.JaxRuntimeError('UNKNOWN: Connection closed by peer')
  with pytest.raises(_Exited) as exited:
    watchdog.failed(error)
  assert exited.value.args == (3,)
  assert capfd.readouterr().err.strip().splitlines()[-1] == (
      'error: process 1 of 2 stopped answering (a collective failed and it sent no heartbeat for '
      '2 s); re-run the same command on every host to resume from step 4.')
  assert service.store['vtp_peers/dead/0'] == '1'  # for the other survivors, were there any
