"""Downstream generation on the tokenizer's latents: LightningDiT, flow matching, ODE sampling."""


def is_generation(config) -> bool:
  """Whether `config` trains the generator (config.task == 'generation') rather than VTP."""
  return config.get('task', 'tokenizer') == 'generation'
