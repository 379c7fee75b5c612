"""VTP-tiny trained long enough to feed a generator: the tokenizer of the README's generation demo.

The README demo (`configs/vtp_tiny.py`, 600 steps, 4 of 32 images reconstructed a step) learns
colour but reconstructs shapes as blobs: the vtp_shapes judge reads the shape of 28% of its
reconstructions (chance 17%), which bounds what a generator on its latents can draw. This run
reconstructs 16 images a step for 3,000 steps (lr warm-up 200 steps, teacher temperature warm-up
half the run), about 30 minutes on 2 CPU cores. The judge reads the shape of 76% of its
reconstructions; 'The generation demo' in docs/benchmarks.md has what its latents give.
"""

from configs import vtp_tiny


def get_config():
  c = vtp_tiny.get_config()
  c.data.rec_batch_fraction = 0.5
  c.train.update(steps=3000, checkpoint_every=500)
  c.optim.update(warmup_steps=200, freeze_last_layer_steps=200)
  c.loss.teacher_temp_warmup_steps = 1500
  return c
