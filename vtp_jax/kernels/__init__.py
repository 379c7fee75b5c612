"""Execution backends of attention and of the dense layers, chosen by name in the config.

The model files (models/layers.py) call two small interfaces and never a backend directly:
  attention.py   `precision.attention`: 'auto' (the default: vmem or splash on TPU, cudnn on
                 NVIDIA GPUs where their constraints hold, else xla; resolved at trace time and
                 logged), 'xla' (xla_attention.py), 'cpu' (cpu_attention.py), 'cudnn' / 'jax'
                 (cudnn_attention.py), 'splash' (splash_attention.py, TPU), 'vmem'
                 (vmem_attention.py, TPU, up to 512 tokens)
  dense.py       `precision.dense`: 'xla' (jnp, the default) or 'cpu' (cpu_dense.py)
A backend changes how a product is computed, never the parameters, so a checkpoint trained with one
runs with any other. Backend modules are imported only when chosen: the CPU kernels' build
(cpu_build.py, with the C++ sources beside it) and Pallas stay off the default path.
"""
