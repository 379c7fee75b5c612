"""VTP-tiny: a few-minute model for 2 CPU cores (the README demo and the test suite).

Encoder 128/4/4, decoder 128/2/4, text 128/2/4 over 32 tokens, d=64, a small DINO head, 64 px images,
batch 32 (SSL 8 with 2x64 px + 4x32 px crops, reconstruction 4), 600 steps on vtp_shapes (the README
demo: about 7 minutes of training on 2 CPU cores), then zero-shot, linear-probe and reconstruction
evaluations on the vtp_shapes validation split.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.encoder.update(width=128, depth=4, heads=4)
  c.model.decoder.update(width=128, depth=2, heads=4)
  c.model.text.update(width=128, depth=2, heads=4, context_length=32)
  c.model.clip_dim = 128
  c.model.dino_head.update(hidden=256, bottleneck=64, prototypes=1024)
  c.data.update(image_size=64, batch_size=32, global_crop_size=64, local_crop_size=32,
                n_local_crops=4)
  c.train.update(steps=600, log_every=25, checkpoint_every=300, image_log_every=300)
  c.evals.update(dataset='shapes:validation', train_dataset='shapes:train', at_end=True,
                 max_examples=2000, max_train_examples=5000)
  c.optim.update(warmup_steps=100, freeze_last_layer_steps=100)
  c.loss.teacher_temp_warmup_steps = 300
  c.precision.compute_dtype = 'float32'
  return c
