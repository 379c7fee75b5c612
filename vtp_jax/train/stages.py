"""Which training stage a config runs, and that stage's train state.

Stage 1 (`train/state.py`) trains the whole tokenizer; stage 2 (`train/gan_stage.py`,
`config.gan.enabled`) trains the pixel decoder against a PatchGAN; `config.task='generation'`
trains the downstream generator (`generation/state.py`). gan_stage and the generator's state build
on state.py, so the choice between them lives here, above all three, and none imports another back.
"""

from vtp_jax.generation import is_generation
from vtp_jax.generation import state as gen_state
from vtp_jax.train import gan_stage
from vtp_jax.train import state as state_lib


def create_state(config, mesh, rng_seed: int | None = None, *, abstract: bool = False):
  """(state, state_shardings, optimizer) of the stage `config` runs; see `state.create` for
  `rng_seed` and `abstract`."""
  if is_generation(config):
    stage = gen_state
  else:
    stage = gan_stage if config.gan.enabled else state_lib
  return stage.create(config, mesh, rng_seed, abstract=abstract)
