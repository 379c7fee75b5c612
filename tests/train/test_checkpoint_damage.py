"""Damaged checkpoints and failed saves, end to end on the micro model (one CPU device, in
subprocesses sharing a compile cache).

The newest step's largest state file filled with random bytes, one byte of it flipped (which
Orbax itself restores without a word), truncated, deleted, or the iterator state edited into
another valid one: each re-run says which step it set aside and why, resumes from the step before
and ends bit-identical to the uninterrupted run. Every kept step damaged: exit status 2, one line,
nothing moved. A save into a volume that fills (a small tmpfs where this process may mount one,
else a digest writer that raises ENOSPC): one line, the step before stays readable, the re-run
resumes. The tools and train.init_from name a damaged folder in one line.

One uninterrupted run (8 steps, saved at 2, 4, 6, 8; the newest three kept) is the reference for
every case; each case damages a copy of it, and one process re-runs them all.
"""

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import driver_subprocess_env
from vtp_jax import checkpoints
from vtp_jax import paths

REPO = pathlib.Path(__file__).resolve().parents[2]
# One worker runs this module: its reference run and re-runs are module fixtures, computed once
# (pyproject.toml: --dist loadgroup).
pytestmark = pytest.mark.xdist_group('checkpoint_damage')

# Runs the driver on each job of a JSON list, in order, in one process: {'name', 'workdir'} trains
# to step 8 (optionally 'init_from'; 'fail_save_at': that step's digest file write raises ENOSPC),
# {'name', 'copy': [src, dst]} copies a workdir. Prints 'JOB name' to stderr before each job.
RUN_SCRIPT = '''
import errno, json, os, re, shutil, sys
sys.path[:0] = [{repo!r}, {config_dir!r}]
import damage_micro
from vtp_jax.checkpoints import digest as checkpoint_digest
from vtp_jax.driver import loop

write = checkpoint_digest._write_text
out = {{}}
for job in json.loads(sys.argv[1]):
  print('JOB ' + job['name'], file=sys.stderr, flush=True)
  if 'copy' in job:
    shutil.copytree(*job['copy'])
    continue

  def failing_write(path, text, at=job.get('fail_save_at')):
    if at is not None and re.search(rf'/{{at}}\\.orbax-checkpoint-tmp', str(path)):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    write(path, text)

  checkpoint_digest._write_text = failing_write
  c = damage_micro.get_config()
  c.train.update(steps=8, checkpoint_every=2, image_log_every=0,
                 init_from=job.get('init_from', ''))
  try:
    out[job['name']] = {{'summary': loop.train_and_evaluate(c, job['workdir'])}}
  except Exception as e:
    out[job['name']] = {{'error': str(e), 'type': type(e).__name__}}
print('RESULT ' + json.dumps(out))
'''


@pytest.fixture(scope='module')
def run_env(tmp_path_factory):
  """(config file, environment) for the driver subprocesses: 1 CPU device, a shared cache."""
  return driver_subprocess_env(tmp_path_factory.getbasetemp(), 'damage_micro')


def _run_jobs(run_env, jobs):
  """(results by job name, stderr by job name) of RUN_SCRIPT over `jobs`."""
  config_file, env = run_env
  script = RUN_SCRIPT.format(repo=str(REPO), config_dir=str(config_file.parent))
  run = subprocess.run([sys.executable, '-c', script, json.dumps(jobs)], env=env,
                       capture_output=True, text=True, cwd=REPO)
  assert run.returncode == 0, run.stderr[-4000:]
  logs = dict(re.findall(r'^JOB (\S+)\n(.*?)(?=^JOB |\Z)', run.stderr, re.S | re.M))
  return json.loads(run.stdout.split('RESULT ', 1)[1]), logs


@pytest.fixture(scope='module')
def reference(run_env, tmp_path_factory):
  """The uninterrupted run's workdir: steps 4, 6 and 8 kept."""
  work = tmp_path_factory.mktemp('reference') / 'work'
  results, _ = _run_jobs(run_env, [{'name': 'reference', 'workdir': str(work)}])
  assert results['reference']['summary']['step'] == 8
  assert sorted(int(d.name) for d in (work / 'checkpoints').iterdir()) == [4, 6, 8]
  return work


# The damages work on a local folder and in a bucket alike (tests/train/test_bucket.py reuses them).

def _largest_state_file(step_dir):
  return max(paths.files_under(paths.path(step_dir) / 'state'), key=lambda f: f.stat().length)


def _random_bytes(step_dir):
  f = _largest_state_file(step_dir)
  f.write_bytes(np.random.default_rng(0).bytes(f.stat().length))
  return f


def _flip_a_byte(step_dir):
  f = _largest_state_file(step_dir)
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x10
  f.write_bytes(bytes(data))
  return f


def _truncate(step_dir):
  f = _largest_state_file(step_dir)
  data = f.read_bytes()
  f.write_bytes(data[:len(data) // 2])
  return f


def _delete(step_dir):
  f = _largest_state_file(step_dir)
  f.unlink()
  return f


def _edit_iterator_state(step_dir):
  """Another valid state (one batch back): only its digest tells it from the saved one."""
  f = paths.path(step_dir) / 'data_iter' / 'process_0-of-1.json'
  state = json.loads(f.read_text())
  assert state == {'next_index': 8}
  f.write_text(json.dumps({'next_index': 7}, indent=4))
  return f


DAMAGE = {  # case: (damage, what the log line's cause must say)
    'random_bytes': (_random_bytes, r'state: .+'),
    'flipped_byte': (_flip_a_byte, r'state: \S+ digest mismatch'),
    'truncated': (_truncate, r'state: .+'),
    'deleted': (_delete, r'state: .+'),
    'iterator_state': (_edit_iterator_state, r'data_iter/process_0-of-1\.json: digest mismatch'),
}


def _file_hash(f):
  f = paths.path(f)
  return hashlib.sha256(f.read_bytes()).hexdigest() if f.exists() else None


def _small_volume(path, size: int) -> bool:
  """Mounts a tmpfs of `size` bytes at `path`; False where this process may not mount one."""
  path.mkdir(parents=True)
  if os.geteuid() != 0 or shutil.which('mount') is None:
    return False
  return subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                        capture_output=True).returncode == 0


def _bytes_on_tmpfs(folder) -> int:
  return sum(-(-f.stat().st_size // 4096) * 4096 + 4096 for f in folder.rglob('*'))


@pytest.fixture(scope='module')
def reruns(run_env, reference, tmp_path_factory):
  """Every damaged copy re-run to step 8, the full-volume run and its re-run elsewhere, and an
  init_from of a damaged workdir, all in one process."""
  root = tmp_path_factory.mktemp('damaged')
  jobs, damaged = [], {}
  for case, (damage, _) in DAMAGE.items():
    shutil.copytree(reference, root / case)
    f = damage(root / case / 'checkpoints' / '8')
    damaged[case] = (os.path.relpath(f, root / case / 'checkpoints' / '8'), _file_hash(f))
    jobs.append({'name': case, 'workdir': str(root / case)})
  # A fresh run from the damaged step (a copy: its own workdir's re-run moves it aside first).
  shutil.copytree(root / 'random_bytes' / 'checkpoints' / '8',
                  root / 'init_source' / 'checkpoints' / '8')
  jobs.append({'name': 'init_from', 'workdir': str(root / 'init_from'),
               'init_from': str(root / 'init_source')})

  # The full volume: step 4 and half a step's room; the run resumes at 4 and saves 6 into it.
  full = root / 'full'
  step_bytes = _bytes_on_tmpfs(reference / 'checkpoints' / '4')
  mounted = _small_volume(full / 'checkpoints', step_bytes + step_bytes // 2)
  shutil.copytree(reference / 'checkpoints' / '4', full / 'checkpoints' / '4')
  jobs += [{'name': 'full', 'workdir': str(full), **({} if mounted else {'fail_save_at': 6})},
           {'name': 'copy', 'copy': [str(full), str(root / 'freed')]},  # room again, elsewhere
           {'name': 'freed', 'workdir': str(root / 'freed')}]
  try:
    results, logs = _run_jobs(run_env, jobs)
    yield root, results, logs, damaged, mounted
  finally:
    if mounted:
      subprocess.run(['umount', str(full / 'checkpoints')], check=False)


def _params(path):
  return jax.tree.map(np.asarray, checkpoints.load_item(path, 'params'))


def _assert_bit_identical(a, b):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.mark.heavy
@pytest.mark.parametrize('case', list(DAMAGE))
def test_a_damaged_newest_step_is_set_aside_and_the_run_resumes_from_the_one_before(
    reruns, reference, case):
  root, results, logs, damaged, _ = reruns
  work, log = root / case, logs[case]
  lines = re.findall(r'Checkpoint step (\d+) is unreadable \((.*)\); moved to (\S+); resuming '
                     r'from step (\d+)\.', log)
  assert len(lines) == 1, log[-3000:]
  step, cause, aside, resumed = lines[0]
  assert (step, resumed) == ('8', '6') and re.fullmatch(DAMAGE[case][1], cause), lines[0]
  assert 'TensorStore' not in log and 'Traceback' not in log, log[-3000:]
  assert {k: v for k, v in results[case]['summary'].items() if k != 'wall_time'} == {
      'start_step': 6, 'preempted': False, 'step': 8,
      'last_checkpoint': 8}
  # The damaged folder is kept as it was, beside the steps.
  assert pathlib.Path(aside) == work / 'checkpoints' / '8.unreadable'
  relative, digest = damaged[case]
  assert _file_hash(pathlib.Path(aside) / relative) == digest
  assert sorted(d.name for d in (work / 'checkpoints').iterdir()) == ['4', '6', '8',
                                                                      '8.unreadable']
  _assert_bit_identical(_params(reference), _params(work))


@pytest.mark.heavy
def test_the_flipped_byte_is_restored_by_orbax_without_a_word(reruns, reference):
  """What the digests add: Orbax reads the flipped step back without an error, values changed."""
  root = reruns[0]
  state_dir = (root / 'flipped_byte' / 'checkpoints' / '8.unreadable' / 'state').absolute()
  checkpointer = ocp.PyTreeCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params_md = checkpointer.metadata(state_dir).item_metadata.tree['params']
  target = {'params': jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                                  sharding=device), params_md)}
  restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  want = _params(reference)
  got = jax.tree.map(np.asarray, restored['params'])
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(want),
                                                       jax.tree.leaves(got)))


@pytest.mark.heavy
def test_every_step_damaged_is_one_error_exit_2_and_nothing_moved(run_env, reference, tmp_path):
  config_file, env = run_env
  work = tmp_path / 'work'
  shutil.copytree(reference, work)
  for step in (4, 6, 8):
    _random_bytes(work / 'checkpoints' / str(step))
  before = {str(f.relative_to(work)): _file_hash(f) for f in work.rglob('*') if f.is_file()}
  run = subprocess.run([sys.executable, str(REPO / 'launch' / 'main.py'), f'--config={config_file}',
                        f'--workdir={work}', '--config.train.steps=8',
                        '--config.train.checkpoint_every=2', '--config.train.image_log_every=0'],
                       env=env, capture_output=True, text=True, cwd=REPO)
  assert run.returncode == 2, run.stderr[-3000:]
  last = run.stderr.strip().splitlines()[-1]
  assert re.fullmatch(r'error: \S+/checkpoints: steps 8, 6, 4 cannot be read \(step 8: state: .+; '
                      r'step 6: state: .+; step 4: state: .+\); nothing was moved or deleted: .+\.',
                      last), last
  assert 'TensorStore' not in run.stderr and 'Compiled the train step' not in run.stderr
  after = {str(f.relative_to(work)): _file_hash(f) for f in work.rglob('*') if f.is_file()}
  assert after == before


@pytest.mark.heavy
def test_a_save_into_a_full_volume_is_one_line_keeps_the_step_before_and_the_rerun_resumes(
    reruns, reference):
  root, results, logs, _, mounted = reruns
  failed = results['full']
  assert failed['type'] == 'SaveFailed' and '\n' not in failed['error'], failed
  assert re.fullmatch(r'Saving checkpoint step 6 failed \(.*(No space left on device|Errno 28).*'
                      r'\); \S+/checkpoints keeps step 4 intact; .* resume from step 4\.',
                      failed['error']), failed['error']
  assert 'Traceback' not in logs['full'], logs['full'][-3000:]
  full = root / 'full' / 'checkpoints'
  assert checkpoints.latest_step_dir(root / 'full') == full / '4'  # 6 never became a step
  _assert_bit_identical(_params(reference / 'checkpoints' / '4'), _params(full / '4'))
  assert results['freed']['summary']['start_step'] == 4, (mounted, logs['freed'][-3000:])
  assert results['freed']['summary']['step'] == 8
  _assert_bit_identical(_params(reference), _params(root / 'freed'))


@pytest.mark.heavy
def test_init_from_and_the_tools_name_a_damaged_folder_in_one_line(reruns, tmp_path, capsys):
  from vtp_jax.inference import Tokenizer
  from vtp_jax.tools import export_reference
  root, results, _, _, _ = reruns
  source = root / 'random_bytes' / 'checkpoints' / '8.unreadable'
  assert results['init_from']['type'] == 'ConfigError'
  assert re.fullmatch(r'train\.init_from=\S+: \S+: state/params cannot be read \(.+\); .+\.',
                      results['init_from']['error']), results['init_from']['error']
  work = tmp_path / 'work'  # a workdir whose newest step is the damaged one
  shutil.copytree(root / 'random_bytes' / 'checkpoints' / '6', work / 'checkpoints' / '6')
  shutil.copytree(source, work / 'checkpoints' / '8')
  for load in (lambda: checkpoints.load_item(work, 'params'), lambda: Tokenizer.load(work),
               lambda: export_reference.export_reference(work, tmp_path / 'exported')):
    with pytest.raises(checkpoints.CheckpointUnreadable) as error:
      load()
    message = str(error.value)
    assert re.fullmatch(rf'{re.escape(str(work))}/checkpoints/8: state/params cannot be read '
                        rf'\(.+\); restore it from a copy, or read another step: '
                        rf'{re.escape(str(work))}/checkpoints/6\.', message), message
    assert 'TensorStore' not in message and len(message) < 600
  with pytest.raises(SystemExit) as exit_:
    with checkpoints.report_unreadable():
      Tokenizer.load(work)
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith(f'error: {work}/checkpoints/8: state/params cannot be read (')
