"""The generator through the training machinery: sharded and abstract state, the step's EMA, the
latent pipeline's normalisation, and launch/main.py's driver end to end (resume included)."""

import json
import pathlib

import jax
import numpy as np
import pytest

from conftest import assert_abstract_state_describes
from gen_util import micro_config, write_latents
from vtp_jax import tasks
from vtp_jax import batch as batch_lib
from vtp_jax import checkpoints
from vtp_jax import sharding
from vtp_jax.generation import data as gen_data
from vtp_jax.driver import loop


@pytest.fixture(scope='module')
def latents(tmp_path_factory):
  folder = tmp_path_factory.mktemp('latents')
  return folder, write_latents(folder)


def test_state_is_sharded_abstract_twin_matches_and_step_updates_the_ema():
  config = micro_config()
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(config.mesh)
  state, shardings, tx = tasks.for_config(config).create_state(config, mesh)
  assert_abstract_state_describes(state, config, mesh)
  adaln = state.params['blocks_0']['modulation']['adaLN']['kernel']  # (D, 6, D)
  assert adaln.sharding.spec == jax.sharding.PartitionSpec('fsdp', None, 'tensor')
  before = jax.tree.map(np.asarray, state.params)
  step = tasks.for_config(config).make_train_step(config, mesh, shardings, tx)
  task = tasks.for_config(config)
  batch = jax.device_put(task.synthetic_batch(config), task.batch_shardings(config, mesh))
  state, metrics = step(state, batch, {})
  assert np.isfinite(float(metrics['loss']))
  # EMA started as a copy of the params: ema_1 = d * p_0 + (1 - d) * p_1 (d = 0.9 here).
  for path, p0 in jax.tree_util.tree_leaves_with_path(before):
    p1 = np.asarray(_at(state.params, path))
    np.testing.assert_allclose(np.asarray(_at(state.ema, path)), 0.9 * p0 + 0.1 * p1,
                               rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
  counted = tasks.for_config(config).step_flops(config)
  assert counted['total'] > 0 and set(counted) == {'dit', 'total'}


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_pipeline_normalises_by_the_exported_statistics_and_draws_flips(latents):
  folder, truth = latents
  config = micro_config()
  config.latents.source = f'arrayrecord:{folder}/latents-*.array_record'
  it = gen_data.make_iterator(config, process_index=0, process_count=1)
  seen_flip = seen_plain = 0
  for _ in range(3):
    batch = next(it)['dit']
    assert batch['latent'].shape == (8, 2, 2, 8) and batch['latent'].dtype == np.float32
    assert batch['label'].dtype == np.int32
    raw = batch['latent'] * truth['std'] + truth['mean']  # undo (z - mean) / std by hand
    for z, label in zip(raw, batch['label']):
      plain = np.abs(truth['latent'] - z).max(axis=(1, 2, 3))
      flip = np.abs(truth['latent_flip'] - z).max(axis=(1, 2, 3))
      i = int(np.argmin(np.minimum(plain, flip)))
      assert min(plain[i], flip[i]) < 1e-5 and truth['label'][i] == label
      seen_flip += flip[i] < 1e-5 and plain[i] > 1e-5
      seen_plain += plain[i] < 1e-5
  assert seen_flip and seen_plain


def test_pipeline_errors_name_the_key_to_fix(tmp_path, latents):
  folder, _ = latents
  config = micro_config()
  with pytest.raises(ValueError, match='latents.source'):
    gen_data.make_iterator(config)
  config.latents.source = f'arrayrecord:{tmp_path}/none-*.array_record'
  with pytest.raises(ValueError, match='no file matches'):
    gen_data.make_iterator(config)
  config.latents.source = f'arrayrecord:{folder}/latents-*.array_record'
  config.dit.in_channels = 4
  with pytest.raises(ValueError, match='dit.in_channels'):
    gen_data.make_iterator(config)


@pytest.mark.heavy
def test_driver_trains_checkpoints_and_resumes_to_the_same_weights(latents, tmp_path):
  """launch/main.py's train_and_evaluate on config.task='generation': 6 steps straight, and 3 steps
  then a second invocation to 6 (Orbax state and Grain iterator restored) end identical."""
  folder, _ = latents
  config = micro_config()
  config.latents.source = f'arrayrecord:{folder}/latents-*.array_record'
  straight = tmp_path / 'straight'
  assert loop.train_and_evaluate(config, straight)['step'] == 6
  resumed = tmp_path / 'resumed'
  config.train.stop_after_steps = 3
  assert loop.train_and_evaluate(config, resumed)['step'] == 3
  summary = loop.train_and_evaluate(config, resumed)
  assert summary['start_step'] == 3 and summary['step'] == 6
  rows = [json.loads(line) for line in (straight / 'metrics.jsonl').read_text().splitlines()]
  assert {'loss', 'mse', 'cos_loss', 'grad_norm'} <= set(rows[-1])
  a = checkpoints.load_item(straight, 'ema')
  b = checkpoints.load_item(resumed, 'ema')
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.heavy
def test_a_run_stopped_in_its_final_evaluation_evaluates_the_saved_step_when_run_again(
    latents, tmp_path):
  """A run killed during its end-of-run evaluation has saved its last step; the next invocation
  has no step left to train, evaluates that checkpoint and records it, once."""
  folder, _ = latents
  config = micro_config()
  config.latents.source = f'arrayrecord:{folder}/latents-*.array_record'
  config.evals.update(tasks='stub', at_end=True, every_steps=0)
  work = tmp_path / 'w'

  def killed(config, step_dir, step):
    raise KeyboardInterrupt  # stands for the process dying mid-evaluation

  with pytest.raises(KeyboardInterrupt):
    loop.train_and_evaluate(config, work, evaluate=killed)
  calls = []

  def stub(config, step_dir, step):
    calls.append((pathlib.Path(step_dir).name, step))
    return {'probe': 0.25}

  summary = loop.train_and_evaluate(config, work, evaluate=stub)
  assert summary['start_step'] == 6 and summary['step'] == 6
  assert calls == [('6', 6)]
  rows = [json.loads(line) for line in (work / 'metrics.jsonl').read_text().splitlines()]
  assert [r['eval/probe'] for r in rows if 'eval/probe' in r and r['step'] == 6] == [0.25]
  loop.train_and_evaluate(config, work, evaluate=stub)
  assert len(calls) == 1  # recorded: not evaluated again


def test_driver_rejects_a_generation_config_without_latents_before_compiling(tmp_path):
  config = micro_config()
  with pytest.raises(loop.ConfigError, match='latents.source'):
    loop.train_and_evaluate(config, tmp_path / 'w')


def test_dit_xl_lowers_from_abstract_state_and_batch_as_the_aot_tool_does():
  """state.create(abstract=True) -> make_train_step -> jitted.lower on ShapeDtypeStructs from
  batch.py: nothing is allocated or run (a 675M-parameter state on the test's 8 CPU devices)."""
  from configs import dit_xl
  config = dit_xl.get_config()
  config.data.batch_size = 8
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(config.mesh)
  state, shardings, tx = tasks.for_config(config).create_state(config, mesh, abstract=True)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  assert n_params / 1e6 == pytest.approx(675.0, abs=0.5)
  step = tasks.for_config(config).make_train_step(config, mesh, shardings, tx)
  batch = tasks.for_config(config).abstract_batch(config, mesh)
  with jax.set_mesh(mesh):
    lowered = step.jitted.lower(state, batch, tasks.for_config(config).frozen_inputs_abstract(config))
  assert 'dit' in batch and lowered.as_text()  # a program exists; compiling it is bench/aot's job
