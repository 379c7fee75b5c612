"""The task interface: what the driver, the benchmarks, the AOT tool and the study need from a
training, with the parts every task shares written once."""

import abc

from vtp_jax import batch as batch_lib


class Task(abc.ABC):
  """One training the driver can run. Subclasses set `name` and `checkpoint_holds` and implement
  the abstract methods; the rest derive from `batch_shapes`."""

  name = ''
  checkpoint_holds = ''  # what a step folder of this task holds, for logs and docs

  # -- config -------------------------------------------------------------------------------------

  @abc.abstractmethod
  def validate(self, config, process_count: int) -> None:
    """Checks that need no compilation beyond the batch's (raise ValueError with one line)."""

  # -- state and step -----------------------------------------------------------------------------

  @abc.abstractmethod
  def create_state(self, config, mesh, rng_seed: int | None = None, *, abstract: bool = False):
    """(state, state_shardings, optimizer); `abstract=True`: ShapeDtypeStructs with shardings."""

  @abc.abstractmethod
  def make_train_step(self, config, mesh, state_shardings, tx):
    """The jitted step `(state, batch, frozen) -> (state, metrics)` (train/step.py `jit_step`)."""

  def frozen_inputs(self, config) -> dict:
    """Constant, untrained inputs of the step (e.g. LPIPS weights)."""
    return {}

  def frozen_inputs_abstract(self, config) -> dict:
    return {}

  @abc.abstractmethod
  def step_flops(self, config, mesh=None) -> dict:
    """Analytic FLOPs of one step over the global batch, per part and 'total'."""

  # -- batch ----------------------------------------------------------------------------------------

  @abc.abstractmethod
  def batch_shapes(self, config) -> dict:
    """{branch: {field: (shape, dtype)}} of the global batch."""

  def branches(self, config) -> tuple:
    """The batch's branches, in order."""
    return tuple(self.batch_shapes(config))

  def batch_sizes(self, config) -> dict:
    """{branch: global rows}: what reports print as the batch."""
    return {branch: next(iter(fields.values()))[0][0]
            for branch, fields in self.batch_shapes(config).items()}

  def check_divisible(self, config, mesh) -> None:
    batch_lib.check_rows_divide(self.batch_shapes(config), mesh)

  def batch_shardings(self, config, mesh) -> dict:
    return batch_lib.shardings_of(self.batch_shapes(config), mesh)

  def abstract_batch(self, config, mesh) -> dict:
    return batch_lib.abstract_of(self.batch_shapes(config), mesh)

  @abc.abstractmethod
  def synthetic_batch(self, config, seed: int = 0, n_devices: int | None = None) -> dict:
    """A random batch of `batch_shapes`, for benchmarks, tests and `data.source='synthetic'`."""

  @abc.abstractmethod
  def uses_synthetic_data(self, config) -> bool:
    """Whether the config's data source is 'synthetic' (`synthetic_batch` through Grain)."""

  @abc.abstractmethod
  def source_iterator(self, config, process_index: int, process_count: int, epoch_seed):
    """The Grain iterator over the config's real data source."""

  def make_data_iterator(self, config, process_index: int, process_count: int,
                         start_step: int = 0):
    """Host-local batches. `start_step` positions a fresh iterator where no saved state fits
    (a resume with another process count): synthetic data resumes exactly; a real source
    reshuffles with data.seed + start_step as its epoch seed (a Grain state cannot be split over a
    new host count)."""
    if self.uses_synthetic_data(config):
      from vtp_jax.data import synthetic  # local: the real pipeline is not needed for it
      return synthetic.make_iterator(
          config, process_index=process_index, process_count=process_count,
          start_step=start_step, make_batch=lambda c, seed: self.synthetic_batch(c, seed))
    epoch_seed = int(config.data.seed) + start_step if start_step else None
    return self.source_iterator(config, process_index, process_count, epoch_seed)

  # -- what the loop may do beside training --------------------------------------------------------

  def evaluate(self, config, step_dir, step: int) -> dict | None:
    """Runs `config.evals` on a saved step; None where the task has no evaluations."""
    return None

  def supports_evaluations(self) -> bool:
    return False

  def image_log(self, config, mesh):
    """An object with `take(batch, n)` and `render(params, images)` for the reconstruction grid,
    or None where the task logs no images."""
    return None

  def summary(self, config) -> dict:
    """The sizes `bench.step` prints for this task's config."""
    return {'batch': self.batch_sizes(config)}
