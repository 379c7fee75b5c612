"""What the driver trains: the one place a config's training is chosen.

`for_config(config)` reads `config.task` and `config.gan.enabled` once and returns the task:

- `tokenizer.TokenizerTask`: stage 1, the whole VTP tokenizer with CLIP, DINO/iBOT and
  reconstruction (`train/state.py`, `train/step.py`);
- `decoder_gan.DecoderGanTask`: stage 2, the pixel decoder against a PatchGAN with the encoder
  frozen (`train/gan_stage.py`);
- `generator.GeneratorTask`: the downstream LightningDiT on the tokenizer's latents
  (`vtp_jax/generation/`).

The driver (`driver/loop.py`), `bench.step`, `bench.profile`, `bench.aot` and the study ask the task
for everything that differs between trainings (`base.Task` lists it) and know no task by name.
A fourth training is one more file here and one more line in `for_config`.
"""

from vtp_jax.tasks.base import Task
from vtp_jax.tasks.decoder_gan import DecoderGanTask
from vtp_jax.tasks.generator import GeneratorTask
from vtp_jax.tasks.tokenizer import TokenizerTask

NAMES = ('tokenizer', 'generation')  # the values config.task takes


def for_config(config) -> Task:
  """The task `config` trains. `task='tokenizer'` (the default) is stage 1, or stage 2 where
  `gan.enabled`; `task='generation'` is the generator."""
  name = config.get('task', 'tokenizer')
  if name not in NAMES:
    raise ValueError(f'task={name!r} is not one of {NAMES}: use tokenizer (configs/vtp_*.py) or '
                     'generation (configs/dit_*.py).')
  if name == 'generation':
    return GeneratorTask()
  gan = config.get('gan')
  return DecoderGanTask() if gan is not None and gan.get('enabled', False) else TokenizerTask()


__all__ = ['Task', 'TokenizerTask', 'DecoderGanTask', 'GeneratorTask', 'for_config', 'NAMES']
