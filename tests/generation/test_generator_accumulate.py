"""The generator under `train.accum_steps = 2` against the whole-batch step on the faked devices."""

import jax
import numpy as np

from gen_util import micro_config
from vtp_jax import sharding
from vtp_jax import tasks


def _run(config, batches):
  config.mesh.update(data=1, fsdp=2, tensor=4)
  mesh = sharding.make_mesh(config.mesh)
  task = tasks.for_config(config)
  state, shardings, tx = task.create_state(config, mesh)
  before = jax.device_get(state)
  step = task.make_train_step(config, mesh, shardings, tx)
  history = []
  for batch in batches:
    state, metrics = step(state, batch, {})
    history.append(jax.device_get(metrics))
  return before, jax.device_get(state), history


def test_generator_accumulated_step_equals_whole_batch_step():
  whole, accum = micro_config(), micro_config()
  for c in (whole, accum):
    c.optim.eps = 1.0  # update near-linear in the gradient (tests/train/test_accumulate.py)
  accum.train.accum_steps = 2
  task = tasks.for_config(whole)
  batches = [task.synthetic_batch(whole, seed=i) for i in range(3)]
  before, a1, h1 = _run(whole, batches)
  _, a2, h2 = _run(accum, batches)
  for step, (m1, m2) in enumerate(zip(h1, h2)):
    for name, value in m1.items():
      np.testing.assert_allclose(m2[name], value, rtol=1e-5, atol=1e-7, err_msg=f'{step} {name}')

  def close(path, a, b, b0):
    moved = float(np.max(np.abs(b - b0)))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(moved, 1e-12),
                               err_msg=jax.tree_util.keystr(path))

  jax.tree_util.tree_map_with_path(close, a2.params, a1.params, before.params)
  jax.tree_util.tree_map_with_path(close, a2.ema, a1.ema, before.ema)
