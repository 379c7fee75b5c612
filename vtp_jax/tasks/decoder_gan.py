"""Stage 2: the pixel decoder fine-tuned against a PatchGAN, the encoder frozen (`train/gan_stage.py`).

It reads the tokenizer's data, batch contract, evaluations and image grid (a stage-2 checkpoint is
a whole tokenizer), and has its own state (the discriminator inside), step and FLOPs.
"""

from vtp_jax.tasks import tokenizer
from vtp_jax.train import flops as flops_lib
from vtp_jax.train import gan_stage


class DecoderGanTask(tokenizer.TokenizerTask):
  name = 'decoder_gan'
  checkpoint_holds = ('TrainState (step, params of the whole tokenizer, opt_state of the decoder, '
                      'disc: the discriminator\'s params and opt_state, rng), the data-iterator '
                      'state per process, the config')

  def validate(self, config, process_count: int) -> None:
    gan_stage.check_config(config)
    super().validate(config, process_count)

  def create_state(self, config, mesh, rng_seed=None, *, abstract=False):
    return gan_stage.create(config, mesh, rng_seed, abstract=abstract)

  def make_train_step(self, config, mesh, state_shardings, tx):
    return gan_stage.make_train_step(config, mesh, state_shardings, tx)

  def step_flops(self, config, mesh=None) -> dict:
    return flops_lib.gan_stage_flops(config)
