"""What the step benchmarks share: the real train step on a synthetic batch, built from a config.

No flags and no module-level jax import, so `bench.step` and `bench.profile` can both use it and
still run where only jax, flax and optax are installed.
"""


def build_step(config):
  """(mesh, state, step, batch, frozen): the real train step and state for `config`, with a
  synthetic batch already placed on the mesh."""
  import jax

  from vtp_jax import sharding
  from vtp_jax import tasks

  task = tasks.for_config(config)
  mesh = sharding.make_mesh(config.mesh)
  state, shardings, tx = task.create_state(config, mesh)
  step = task.make_train_step(config, mesh, shardings, tx)
  frozen = jax.device_put(task.frozen_inputs(config), sharding.replicated(mesh))
  batch = jax.device_put(task.synthetic_batch(config), task.batch_shardings(config, mesh))
  return mesh, state, step, batch, frozen


def compile_step(mesh, step, state, batch, frozen):
  """(compiled, run): the step compiled once ahead of time, and `run(state) -> (state, metrics)`
  executing that same executable, so what is timed or traced is what `compiled` describes (its
  cost analysis, memory analysis, HLO op names) and nothing compiles twice."""
  import jax

  with jax.set_mesh(mesh):
    compiled = step.jitted.lower(state, batch, frozen).compile()

  def run(state):
    with jax.set_mesh(mesh):
      return compiled(state, batch, frozen)

  return compiled, run


def warmed_up_step(config):
  """(mesh, compiled, run, state): `compile_step` for `config`'s real step, run once so that
  first-run costs stay outside whatever is timed or traced next."""
  import jax

  mesh, state, step, batch, frozen = build_step(config)
  compiled, run = compile_step(mesh, step, state, batch, frozen)
  state, metrics = run(state)
  jax.block_until_ready(metrics)
  return mesh, compiled, run, state
