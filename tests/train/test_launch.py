"""launch/: two CPU processes joined by jax.distributed (gloo) train and checkpoint into a bucket
through launch/local_processes.sh, then one process resumes the run; main.py's exit codes; the recipes
parse as shell."""

import json
import os
import pathlib
import platform
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import FAST_COMPILE, MICRO_CONFIG
from vtp_jax import checkpoints
from vtp_jax import paths

REPO = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = REPO / 'launch'
# Both runs of the two-process test: 8 steps, saved at 4 and 8.
STEPS = ['--config.train.steps=8', '--config.train.checkpoint_every=4']



@pytest.fixture(scope='module')
def launch_env(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  config_file = base / 'launch_micro.py'
  config_file.write_text(MICRO_CONFIG)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO), PYTHON=sys.executable,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')  # the run's cache (conftest.py)
  env['XLA_FLAGS'] = FAST_COMPILE  # local_processes.sh appends the device count
  return config_file, env


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.heavy
def test_two_processes_train_and_checkpoint_then_one_process_resumes(launch_env, gcs):
  """In a bucket (a local GCS server), as a pod run keeps its work."""
  config_file, env = launch_env
  work = paths.path(gcs.bucket('vtp-two-processes')) / 'work'
  two = subprocess.run(
      [str(LAUNCH / 'local_processes.sh'), '2', f'--config={config_file}', f'--workdir={work}',
       *STEPS, '--config.train.stop_after_steps=4'],
      env=dict(env, PORT=str(_free_port())), capture_output=True, text=True, cwd=REPO,
      timeout=900)
  assert two.returncode == 0, (two.stdout + two.stderr)[-4000:]
  assert '[0] ' in two.stdout and '[1] ' in two.stdout
  assert re.search(r'\[1\] .*Process 1 of 2; 1 local / 2 global devices', two.stdout)
  assert re.search(r"Mesh \{'data': 2, 'fsdp': 1, 'tensor': 1\}", two.stdout)
  step_dir = checkpoints.checkpoint_root(work) / '4'
  assert checkpoints.latest_step_dir(work) == step_dir
  # The Grain iterator state of each process is saved beside the (collectively written) state.
  assert paths.child_names(step_dir / 'data_iter') == [
      'commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json']
  saved = jax.tree.map(np.asarray, checkpoints.load_item(step_dir, 'params'))

  one = subprocess.run(
      [sys.executable, str(LAUNCH / 'main.py'), f'--config={config_file}', f'--workdir={work}',
       *STEPS],
      env=dict(env, XLA_FLAGS=FAST_COMPILE + ' --xla_force_host_platform_device_count=1'),
      capture_output=True, text=True, cwd=REPO, timeout=900)
  assert one.returncode == 0, one.stderr[-4000:]
  assert re.search(r'Process 0 of 1; 1 local / 1 global devices', one.stderr)
  if platform.libc_ver()[0] == 'glibc':  # main.py restarted itself under train.host_malloc='retain'
    assert "host malloc: GLIBC_TUNABLES='glibc.malloc.arena_max=1:" in one.stderr, one.stderr[-4000:]
  assert re.search(r'Resumed from .*/checkpoints/4\.', one.stderr), one.stderr[-4000:]
  assert 'no data-iterator state for 1 process' in one.stderr  # re-positioned, not restarted
  assert checkpoints.latest_step_dir(work).name == '8'
  final = jax.tree.map(np.asarray, checkpoints.load_item(work, 'params'))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(final))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(saved),
                                                       jax.tree.leaves(final)))
  rows = [json.loads(r) for r in (work / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == list(range(1, 9))  # process 0 of the pair, then the single


def test_main_exits_2_with_one_line_for_a_bad_config(launch_env, tmp_path):
  config_file, env = launch_env
  run = subprocess.run(
      [sys.executable, str(LAUNCH / 'main.py'), f'--config={config_file}',
       f'--workdir={tmp_path}', '--config.mesh.data=3'],
      env=dict(env, XLA_FLAGS=FAST_COMPILE + ' --xla_force_host_platform_device_count=1'),
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert run.returncode == 2
  errors = [line for line in run.stderr.splitlines() if line.startswith('error: ')]
  assert errors == ["error: mesh {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices but 1 are "
                    "present; set mesh.data=-1 or fix the sizes."]


@pytest.mark.parametrize('flags, line', [
    (['--config.train.no_such_key=1'],
     r"error: --config\.train\.no_such_key: the config has no key 'train\.no_such_key'; did you "
     r"mean train\.\w+(, train\.\w+)*\? configs/base\.py lists every key with a comment\."),
    (['--config.train.stepz=3'], r"error: --config\.train\.stepz: .*did you mean train\.steps.*"),
    (['--config.train.steps=abc'], r"error: --config\.train\.steps=abc: .*invalid literal for int"
     r"\(\).*; give a value of the key's type\."),
    (['--config.optim.warmup_steps=100000'],
     r'error: optim\.warmup_steps=100000 must lie in \[0, train\.steps=40\]; lower it \(or raise '
     r'train\.steps\)\.'),
    ('missing_file', r'error: --config=configs/vtp_tny\.py: no such config file; did you mean '
     r'configs/vtp_tiny\.py.*'),
])
def test_a_config_mistake_is_one_line_on_stderr_and_exit_2(launch_env, tmp_path, flags, line):
  config_file, env = launch_env
  config = ['--config=configs/vtp_tny.py'] if flags == 'missing_file' else [
      f'--config={config_file}', *flags]
  run = subprocess.run([sys.executable, str(LAUNCH / 'main.py'), *config, f'--workdir={tmp_path}'],
                       env=dict(env, XLA_FLAGS=FAST_COMPILE), capture_output=True, text=True,
                       cwd=REPO, timeout=300)
  assert run.returncode == 2, run.stderr[-3000:]
  errors = [x for x in run.stderr.splitlines() if x.startswith('error: ')]
  assert len(errors) == 1 and run.stderr.strip().splitlines()[-1] == errors[0], run.stderr[-3000:]
  assert re.fullmatch(line, errors[0]), errors[0]
  assert 'Traceback' not in run.stderr


@pytest.mark.parametrize('recipe', ['local_processes.sh', 'tpu_pod.sh', 'slurm_gpu.sbatch'])
def test_recipes_are_valid_shell_and_show_usage(recipe):
  subprocess.run(['bash', '-n', str(LAUNCH / recipe)], check=True)
  if recipe.endswith('.sh'):  # without arguments they print their usage and exit 2
    run = subprocess.run(['bash', str(LAUNCH / recipe)], capture_output=True, text=True)
    assert run.returncode == 2 and 'usage:' in run.stderr
