"""The downstream generator: LightningDiT trained by flow matching on the tokenizer's latents
(`vtp_jax/generation/`: its batch contract, state, step, FLOPs and latent reader)."""

from vtp_jax.generation import batch as gen_batch
from vtp_jax.generation import flops as gen_flops
from vtp_jax.generation import state as gen_state
from vtp_jax.generation import step as gen_step
from vtp_jax.tasks import base


class GeneratorTask(base.Task):
  name = 'generation'
  checkpoint_holds = ('GenState (step, params, ema, opt_state, rng), the data-iterator state per '
                      'process, the config')

  def validate(self, config, process_count: int) -> None:
    """The per-process batch, no `train.init_from`, and latents.source with its statistics."""
    if int(config.data.batch_size) % process_count:
      raise ValueError(f'data.batch_size = {config.data.batch_size} does not split over '
                       f'{process_count} processes.')
    if config.train.init_from:
      raise ValueError('train.init_from is for tokenizer runs; a generator run resumes from its '
                       'own workdir.')
    if config.latents.source == 'synthetic':
      return
    from vtp_jax.generation import data as gen_data  # local: Grain and the latent reader
    gen_data.load_stats(config)

  def create_state(self, config, mesh, rng_seed=None, *, abstract=False):
    return gen_state.create(config, mesh, rng_seed, abstract=abstract)

  def make_train_step(self, config, mesh, state_shardings, tx):
    return gen_step.make_train_step(config, mesh, state_shardings, tx)

  def step_flops(self, config, mesh=None) -> dict:
    return gen_flops.step_flops(config)

  def batch_shapes(self, config) -> dict:
    return gen_batch.batch_shapes(config)

  def synthetic_batch(self, config, seed=0, n_devices=None) -> dict:
    del n_devices  # no per-device structure in the generator's batch
    return gen_batch.synthetic_batch(config, seed)

  def uses_synthetic_data(self, config) -> bool:
    return config.latents.source == 'synthetic'

  def source_iterator(self, config, process_index, process_count, epoch_seed):
    """The exported latent files (generation/data.py)."""
    from vtp_jax.generation import data as gen_data  # local: Grain and the latent reader
    return gen_data.make_iterator(config, process_index=process_index,
                                  process_count=process_count, epoch_seed=epoch_seed)

  def summary(self, config) -> dict:
    return {'batch': int(config.data.batch_size), 'dit': {k: config.dit[k] for k in (
        'width', 'depth', 'heads', 'input_size', 'in_channels', 'patch_size')}}
