"""The task registry: one function picks the training from the config, and each task describes
its batch by the contract its own code states."""

import numpy as np
import pytest

from configs import dit_tiny, vtp_tiny, vtp_tiny_gan
from vtp_jax import tasks


@pytest.mark.parametrize('make, expected', [
    (vtp_tiny.get_config, tasks.TokenizerTask),
    (vtp_tiny_gan.get_config, tasks.DecoderGanTask),
    (dit_tiny.get_config, tasks.GeneratorTask),
])
def test_for_config_picks_the_training_the_config_names(make, expected):
  assert type(tasks.for_config(make())) is expected


def test_an_unknown_task_is_refused_with_the_names_it_takes():
  config = vtp_tiny.get_config()
  config.task = 'distillation'
  with pytest.raises(ValueError, match="task='distillation' is not one of"):
    tasks.for_config(config)


def test_batch_sizes_follow_the_config():
  config = vtp_tiny.get_config()
  config.data.batch_size = 64
  config.loss.ssl_weight = 0.0  # an absent branch counts 0 rows
  assert tasks.for_config(config).batch_sizes(config) == {'clip': 64, 'ssl': 0, 'rec': 8}
  gen = dit_tiny.get_config()
  gen.data.batch_size = 12
  task = tasks.for_config(gen)
  assert task.batch_sizes(gen) == {'dit': 12}
  batch = task.synthetic_batch(gen, seed=0)
  d = gen.dit
  assert batch['dit']['latent'].shape == (12, d.input_size, d.input_size, d.in_channels)
  assert batch['dit']['label'].dtype == np.int32


def test_the_gan_stage_checks_its_own_config():
  config = vtp_tiny_gan.get_config()
  config.loss.clip_weight = 1.0
  with pytest.raises(ValueError, match='trains the decoder only'):
    tasks.for_config(config).validate(config, process_count=1)


def test_only_tokenizer_trainings_evaluate_and_log_images():
  assert tasks.for_config(vtp_tiny.get_config()).supports_evaluations()
  assert tasks.for_config(vtp_tiny_gan.get_config()).supports_evaluations()
  gen = dit_tiny.get_config()
  assert not tasks.for_config(gen).supports_evaluations()
  assert tasks.for_config(gen).image_log(gen, mesh=None) is None
