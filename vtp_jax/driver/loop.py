"""The training program: `train_and_evaluate(config, workdir)` (launch/main.py is a thin shell).

In order: jax.distributed start-up when several processes run; config checks that fail before
anything compiles (one clear line each); the mesh; the data iterator; the state (resumed from the
workdir's newest complete checkpoint that reads and matches its digests, else fresh, optionally
over `train.init_from`); the step, compiled ahead of time so its memory use is logged before the
first batch; then the loop with async checkpoints (a failed save stops it at the next step),
metrics, image grids, the NaN policy, SIGTERM handling and the evals hook. What differs between
trainings (tokenizer, decoder GAN stage, generator) comes from the task
`vtp_jax.tasks.for_config(config)` picks; this file names none of them.
"""

import json
import os
import signal
import time
import types

import jax
import numpy as np
from absl import logging

from vtp_jax import paths
from vtp_jax import sharding
from vtp_jax import tasks
from vtp_jax.checkpoints import init_from as init_from_lib
from vtp_jax.checkpoints import manager
from vtp_jax.checkpoints import preemption as preemption_lib
from vtp_jax.checkpoints import saved
from vtp_jax.checkpoints import workdir as workdir_lib
from vtp_jax.data import device
from vtp_jax.train import in_flight
from vtp_jax.train import metrics as metrics_lib
from vtp_jax.train import wall_time
from vtp_jax.driver import peers
# Raised from the loop; callers (launch/main.py, tests) catch them as loop.NonFiniteLoss,
# loop.CheckpointUnreadable (no checkpoint of the workdir reads) and loop.SaveFailed.
from vtp_jax.checkpoints.errors import CheckpointUnreadable  # noqa: F401
from vtp_jax.checkpoints.manager import SaveFailed  # noqa: F401
from vtp_jax.train.in_flight import NonFiniteLoss  # noqa: F401


class ConfigError(ValueError):
  """A config that cannot run, found before compiling; the message is the one line users see."""


# -- start-up ------------------------------------------------------------------------------------

def _cluster_env() -> bool:
  """A multi-process launch jax.distributed can detect on its own (SLURM, Open MPI, JAX_* env)."""
  env = os.environ
  for key in ('SLURM_STEP_NUM_TASKS', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'JAX_NUM_PROCESSES'):
    if env.get(key, '').isdigit() and int(env[key]) > 1:
      return key != 'SLURM_NTASKS' or 'SLURM_JOB_ID' in env
  return bool(env.get('JAX_COORDINATOR_ADDRESS')) or ',' in env.get('TPU_WORKER_HOSTNAMES', '')


def init_distributed(config) -> bool:
  """Calls jax.distributed.initialize when this is one of several processes; True if it did.

  'auto' starts it when the config names a coordinator / process count, or the environment is a
  multi-process SLURM / MPI / TPU-pod launch; 'on' always (JAX then detects the cluster itself:
  use it on TPU pods where the environment does not say); 'off' never.
  """
  d = config.train.distributed
  if d.mode not in ('auto', 'on', 'off'):
    raise ConfigError(f"train.distributed.mode={d.mode!r}; use 'auto', 'on' or 'off'.")
  explicit = bool(d.coordinator_address) or int(d.num_processes) > 0 or int(d.process_id) >= 0
  if d.mode == 'off' or (d.mode == 'auto' and not explicit and not _cluster_env()):
    return False
  if jax.distributed.is_initialized():
    return True
  # Only the CPU client reads this; GPU/TPU collectives are NCCL/ICI whatever it says.
  jax.config.update('jax_cpu_collectives_implementation', d.cpu_collectives)
  kwargs = {}
  if d.coordinator_address:
    kwargs['coordinator_address'] = d.coordinator_address
  if int(d.num_processes) > 0:
    kwargs['num_processes'] = int(d.num_processes)
  if int(d.process_id) >= 0:
    kwargs['process_id'] = int(d.process_id)
  jax.distributed.initialize(initialization_timeout=int(d.initialization_timeout),
                             heartbeat_timeout_seconds=int(d.heartbeat_timeout), **kwargs)
  return True


def validate(config, n_devices: int, process_count: int) -> tuple:
  """Every check that needs no compilation (the driver's, then the task's); returns the
  (data, fsdp, tensor) mesh shape."""
  t = config.train
  for key in ('steps', 'checkpoint_every', 'keep_checkpoints', 'log_every'):
    if int(t[key]) < 1:
      raise ConfigError(f'train.{key}={t[key]} must be at least 1.')
  if int(t.max_steps_ahead) < 0:
    raise ConfigError(f'train.max_steps_ahead={t.max_steps_ahead} must be 0 (unbounded) or more.')
  if t.nan_policy not in ('stop', 'skip'):
    raise ConfigError(f"train.nan_policy={t.nan_policy!r}; use 'stop' or 'skip'.")
  warmup = int(config.optim.warmup_steps) if 'warmup_steps' in config.get('optim', {}) else 0
  if not 0 <= warmup <= int(t.steps):
    raise ConfigError(f'optim.warmup_steps={warmup} must lie in [0, train.steps={t.steps}]; '
                      'lower it (or raise train.steps).')
  try:
    shape = sharding.mesh_shape(config.mesh, n_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  fake_mesh = types.SimpleNamespace(shape=dict(zip(sharding.MESH_AXES, shape)))
  task = tasks.for_config(config)
  try:
    task.batch_shapes(config)
    task.check_divisible(config, fake_mesh)
    task.validate(config, process_count)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return shape


def compile_step(step_fn, state, batch, mesh, frozen):
  """The step compiled ahead of time for the abstract `batch` (so memory is known before the
  first batch is read)."""
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = step_fn.jitted.lower(state, batch, frozen).compile()
  logging.info('Compiled the train step in %.1f s.', time.perf_counter() - t0)
  try:
    m = compiled.memory_analysis()
    if m is not None:
      logging.info('Step memory per device: arguments %.1f MiB, outputs %.1f MiB (aliased %.1f), '
                   'temporaries %.1f MiB, code %.1f MiB.', *(x / 2**20 for x in (
                       m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                       m.temp_size_in_bytes, m.generated_code_size_in_bytes)))
  except (AttributeError, NotImplementedError):  # some backends have no memory analysis
    pass
  return compiled


# -- the loop --------------------------------------------------------------------------------------

def _default_evaluate(task):
  """The evals hook: the task's evaluations of the checkpoint just saved; None where the task has
  none."""
  if not task.supports_evaluations():
    return None

  def evaluate(config, step_dir, step):
    return task.evaluate(config, step_dir, step)

  return evaluate


def _eval_recorded(workdir, step: int, process_index: int, process_count: int) -> bool:
  """Whether metrics.jsonl holds evaluation results at `step`; process 0 reads, all agree."""
  recorded = False
  if process_index == 0:
    recorded = any(s == step for s, _ in metrics_lib.evaluations(workdir))
  if process_count > 1:
    from jax.experimental import multihost_utils  # local: multi-process runs only
    recorded = bool(multihost_utils.broadcast_one_to_all(np.asarray(recorded)))
  return recorded


EVALUATION_FILE = 'evaluation.json'


def _evaluate_and_record(evaluate, config, writer, workdir, step_dir, step: int) -> None:
  """Runs the evals hook on a saved step, appends its numeric results to the metrics files, writes
  them to workdir/evaluation.json and prints them as a marked block (process 0)."""
  results = evaluate(config, step_dir, step) or {}
  writer.scalars(step, {f'eval/{k}': v for k, v in results.items() if isinstance(v, (int, float))})
  if jax.process_index() == 0:
    text = json.dumps({'step': step, **results}, indent=2, sort_keys=True)
    paths.write_whole(workdir / EVALUATION_FILE, text + '\n')
    title = f' evaluation of step {step} ({workdir / EVALUATION_FILE}) '
    print(f'\n{title:=^100}\n{text}\n{"":=^100}', flush=True)


def _workers(config, process_count: int) -> str:
  """The input pipeline's worker processes, as the line about an input-bound run names them."""
  from vtp_jax.data import pipeline  # local: only when a run is found input-bound
  workers = config.data.get('worker_count', 0)
  if workers == -1:
    try:
      return f'-1: {pipeline.resolve_worker_count(config, process_count=process_count)} workers'
    except (KeyError, ValueError, AttributeError):  # a task whose batch is not the tokenizer's
      return '-1: auto'
  return f'now {workers}'


def train_and_evaluate(config, workdir, evaluate=None) -> dict:
  """Trains to `train.steps` (or until SIGTERM), checkpointing into `workdir`; returns a summary.

  Raises ConfigError before compiling when the config cannot run, NonFiniteLoss when the loss
  diverges under nan_policy='stop' (the last good checkpoint stays the newest one),
  CheckpointUnreadable when the workdir holds checkpoints and none reads, SaveFailed when a save
  did not complete (the steps before it stay).
  """
  clock = wall_time.WallTime()  # where the wall time goes, from here to the end
  init_distributed(config)
  workdir = paths.path(workdir)
  pi, pc = jax.process_index(), jax.process_count()
  logging.info('Process %d of %d; %d local / %d global devices (%s); workdir %s.', pi, pc,
               jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind, workdir)
  validate(config, jax.device_count(), pc)
  try:
    workdir_lib.check(workdir, pi, pc)
  except workdir_lib.WorkdirError as e:
    raise ConfigError(str(e)) from None
  task = tasks.for_config(config)
  evaluate = evaluate or _default_evaluate(task)
  mesh = sharding.make_mesh(config.mesh)
  logging.info('Mesh %s.', dict(mesh.shape))
  t = config.train
  ckpts = manager.Checkpoints(workdir, int(t.keep_checkpoints))
  latest = ckpts.latest_step()
  if latest is None and t.init_from:
    try:
      saved.resolve(t.init_from)
    except FileNotFoundError as e:
      raise ConfigError(f'train.init_from={t.init_from}: {e}') from None
  data_iter = task.make_data_iterator(config, pi, pc)

  if latest is not None:
    # Shapes and shardings only: no random state is initialised just to be overwritten.
    target, shardings, tx = task.create_state(config, mesh, abstract=True)
    # The newest step that reads and matches its digests; newer ones are moved aside.
    with clock.part('checkpoint'):
      latest, state, fits = ckpts.restore_newest_readable(target, data_iter)
    if not fits:
      logging.warning('Checkpoint %d holds no data-iterator state for %d process(es): the data '
                      'restarts from a fresh iterator positioned at step %d.', latest, pc, latest)
      data_iter = task.make_data_iterator(config, pi, pc, start_step=latest)
    logging.info('Resumed from %s/%d.', ckpts.root, latest)
  else:
    state, shardings, tx = task.create_state(config, mesh)
    if t.init_from:
      try:
        state = init_from_lib.init_from(t.init_from, state, shardings, config)
      except CheckpointUnreadable as e:
        raise ConfigError(f'train.init_from={t.init_from}: {e}') from None
  start = int(jax.device_get(state.step))
  if start >= int(t.steps):
    summary = {'start_step': start, 'step': start, 'preempted': False, 'last_checkpoint': latest}
    if (evaluate is not None and metrics_lib.evals_due(config, start, final=True)
        and not _eval_recorded(workdir, start, pi, pc)):
      # The run that reached the last step was stopped during its end-of-run evaluation (SIGTERM
      # saves at a step boundary, and there is none left): evaluate the saved step now.
      logging.info('Step %d reached train.steps=%d; its end-of-run evaluation is not in '
                   'metrics.jsonl: evaluating it.', start, int(t.steps))
      writer = metrics_lib.Writer(workdir, enabled=pi == 0, start_step=start)
      _evaluate_and_record(evaluate, config, writer, workdir, ckpts.root / str(start), start)
      writer.close()
    else:
      logging.info('Step %d already reached train.steps=%d: nothing to do.', start, int(t.steps))
    ckpts.close()
    return summary
  if pi == 0:
    from clu import parameter_overview  # local: start-up only
    logging.info('Parameters:\n%s', parameter_overview.get_parameter_overview(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params),
        include_stats=False))

  logging.info('A %s checkpoint holds: %s.', task.name, task.checkpoint_holds)
  step_fn = task.make_train_step(config, mesh, shardings, tx)
  frozen = jax.device_put(task.frozen_inputs(config), sharding.replicated(mesh))
  with clock.part('compile'):
    compiled = compile_step(step_fn, state, task.abstract_batch(config, mesh), mesh, frozen)

  preemption = preemption_lib.Preemption()
  acc, skips = metrics_lib.Accumulator(), metrics_lib.SkipCounter()
  writer = metrics_lib.Writer(workdir, enabled=pi == 0, start_step=start)
  step_flops = task.step_flops(config, mesh)['total']
  batch_shapes = task.batch_shapes(config)  # the contract every host batch is placed by
  image_log = task.image_log(config, mesh) if t.image_log_every else None
  grid_images = None
  total, step, last_saved = int(t.steps), start, latest
  # This invocation may stop early (train.stop_after_steps, e.g. a job time limit); it saves there.
  end = min(total, start + int(t.stop_after_steps)) if int(t.stop_after_steps) > 0 else total
  dispatched, skipped_updates = in_flight.InFlight(t.max_steps_ahead), 0
  kill_after = preemption_lib.kill_switch_for_tests()
  summary = {'start_step': start, 'preempted': False}
  window_start, window_step = time.perf_counter(), step
  clock.startup_done()

  def drain():
    """Checks the steps since the last check: stop on a non-finite one, or count skipped ones."""
    nonlocal skipped_updates
    skipped_updates += dispatched.check(t.nan_policy, last_saved, ckpts.root)

  def save(at):
    nonlocal last_saved
    with clock.part('step'):
      drain()  # never save a state that saw a non-finite step
    t0 = time.perf_counter()
    with clock.part('checkpoint'):
      ckpts.save(at, state, data_iter, config)
    logging.info('Checkpoint %d started (%.2f s blocking).', at, time.perf_counter() - t0)
    last_saved = at
    watchdog.saved(at)
    if kill_after == at:
      os.kill(os.getpid(), signal.SIGKILL)

  watchdog = peers.Watchdog(config, workdir, latest)  # a dead peer process: one line, exit 3
  try:
    while step < end:
      with clock.part('checkpoint'):
        ckpts.check_save()  # a failed async save stops the run here, at the next step
      if preemption.reached(step):
        if last_saved != step:
          save(step)
        logging.warning('Preempted: saved step %d; exiting so the next run resumes there.', step)
        summary['preempted'] = True
        break
      with clock.part('data'):
        batch = next(data_iter)
      skips.add(batch.pop('skipped', None))
      batch.pop('labels', None)
      if image_log is not None and grid_images is None:
        grid_images = image_log.take(batch, int(t.image_log_count))
        if pc > 1:  # every process must feed the same images to the (collective) reconstruction
          from jax.experimental import multihost_utils
          grid_images = np.asarray(multihost_utils.broadcast_one_to_all(grid_images))
      with clock.part('data'):
        placed = device.to_global(batch, mesh, batch_shapes)
      with clock.part('step'):
        state, metrics = compiled(state, placed, frozen)
        step += 1
        acc.update(metrics)
        dispatched.add(step, metrics)  # waits for step - max_steps_ahead

      if step % int(t.log_every) == 0 or step == end:
        with clock.part('step'):
          drain()
          values = acc.compute()
        elapsed = time.perf_counter() - window_start
        values.update(metrics_lib.throughput(step - window_step, elapsed, config.data.batch_size,
                                             step_flops, float(t.peak_flops)))
        values.update(skips.global_totals())
        if t.nan_policy == 'skip':
          values['skipped_updates'] = float(skipped_updates)
        values.update(clock.interval())
        clock.check_input_bound(values, lambda: _workers(config, pc))
        writer.scalars(step, values)
        metrics_lib.log_line(metrics_lib.progress_line(step, total, values))
        window_start, window_step = time.perf_counter(), step

      if image_log is not None and step % int(t.image_log_every) == 0:
        writer.image(step, 'reconstruction', image_log.render(state.params, grid_images))

      final = step == total
      evals_due = evaluate is not None and metrics_lib.evals_due(config, step, final)
      if step % int(t.checkpoint_every) == 0 or step == end or evals_due:
        save(step)
      if evals_due:
        with clock.part('checkpoint'):
          ckpts.wait()
        with clock.part('evaluation'):
          _evaluate_and_record(evaluate, config, writer, workdir, ckpts.root / str(step), step)
    summary['step'] = step
    summary['last_checkpoint'] = last_saved
    with clock.part('checkpoint'):
      ckpts.wait()  # the last save commits inside the run's wall time
    summary['wall_time'] = clock.totals()
    metrics_lib.log_line(clock.summary_line(summary['wall_time']))
    return summary
  except Exception as e:
    watchdog.failed(e)  # exits (status 3) when a peer process is gone; else re-raise
    raise
  finally:
    preemption.restore_handler()
    ckpts.close()
    writer.close()
    watchdog.close()

