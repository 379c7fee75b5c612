"""DiT-tiny: a generator that trains in minutes on 2 CPU cores (the README's generation demo).

D 128, 4 blocks, 4 heads over the 4x4x64 latents of `configs/vtp_tiny_long.py` on vtp_shapes (64 px
images, 48 classes), batch 64, 10,000 steps, EMA 0.995 (it averages the last ~200 steps; at 0.999
the untrained initial weights would still hold 0.999^2000 = 13.5% of the EMA after 2,000 steps),
Heun with 30 grid points for sampling. One step takes 0.09 s on 2 CPU cores shared with a second
run (`python -m vtp_jax.bench.step --config=configs/dit_tiny.py`: 5.2 GFLOP analytic, 5.4 XLA), so
the 10,000 steps take about 15 minutes. At 2,000 steps the samples have the right colour but the
judge reads their shape at chance (19%); at 10,000, 39% ('The generation demo' in
docs/benchmarks.md).
"""

from configs import dit_base


def get_config():
  c = dit_base.get_config()
  c.dit.update(input_size=4, width=128, depth=4, heads=4, num_classes=48)
  c.data.batch_size = 64
  c.optim.update(lr=1e-3, warmup_steps=100)
  c.flow.ema_decay = 0.995
  c.sample.update(solver='heun', steps=30, batch_size=64)
  c.train.update(steps=10000, log_every=50, checkpoint_every=2500)
  c.precision.compute_dtype = 'float32'
  return c
