"""Test-wide setup: eight fake CPU devices, so sharding is exercised for real, LLVM at -O0, and one
persistent compilation cache per pytest run.

XLA reads the device count once, when jax first initialises its CPU backend; this file is imported by
pytest before any test module, so setting the flag here (before `import jax`) is early enough.
"""

import atexit
import importlib.metadata
import os
import pathlib
import shutil
import tempfile

import gcs_server

# LLVM at -O0 for every program the tests compile, in process and in the launch/main.py
# subprocesses: the suite is compile-bound (micro models whose steps take milliseconds), and -O0
# compiles the train step about 40% faster (it took a quarter off the whole suite; see
# docs/benchmarks.md, 'Test suite time'). XLA's own HLO passes (fusion, sharding,
# simplification) run as in production; what changes is that LLVM does not contract a multiply
# and an add into one FMA, so a program's float32 arithmetic is NumPy's, rounding for rounding
# (test_step.py relies on it). Where jaxlib still has them (0.10; 0.12 knows no such flag and
# would abort on it), XLA:CPU's older loop emitters instead of its MLIR fusion emitters take
# another third off a micro step's compile: the fused computations are the same HLO, only how the
# CPU backend writes their loops changes (docs/benchmarks.md, 'Test suite time').
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
if tuple(int(v) for v in importlib.metadata.version('jaxlib').split('.')[:2]) < (0, 11):
  FAST_COMPILE += ' --xla_cpu_use_fusion_emitters=false'

# Appended after the caller's XLA_FLAGS, so these win over a repeated flag.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8 ' + FAST_COMPILE).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The AOT tests load libtpu in each pytest-xdist worker; it takes a lock file unless told not to.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

# Every GCS client this process and its subprocesses start talks to a local server only
# (tests/gcs_server.py): set before anything imports fsspec, which reads its settings at import.
# Each pytest-xdist worker picks its own port; the server starts on first use (the `gcs` fixture).
os.environ.update(gcs_server.environment(gcs_server.free_port()))

# One persistent XLA compilation cache per pytest run, which the pytest-xdist workers and the
# launch/main.py subprocesses inherit through the environment (the controller process imports this
# file first). Workers writing at once are safe enough: JAX reads an unreadable entry as a miss.
# Many tests compile the same micro-model programs (the state init, the train step) from fresh
# closures, which jit's in-memory cache cannot match; the persistent cache keys on the program
# itself (HLO, compile options, devices, versions). A fresh folder per pytest run keeps one
# run independent of the last. JAX_COMPILATION_CACHE_DIR set by the caller is left alone.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _xla_cache = tempfile.mkdtemp(prefix='vtp_jax_tests_xla_cache_')
  atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _xla_cache
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

# The 'cpu' attention and dense kernels are compiled into a cache on first use: a fresh cache per
# pytest run, so every run builds them from the source it tests.
if 'VTP_JAX_KERNEL_CACHE' not in os.environ:
  _kernel_cache = tempfile.mkdtemp(prefix='vtp_jax_tests_kernels_')
  atexit.register(shutil.rmtree, _kernel_cache, ignore_errors=True)
  os.environ['VTP_JAX_KERNEL_CACHE'] = _kernel_cache

import jax  # noqa: E402  (must come after the flag)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

from vtp_jax.kernels import cpu_build  # noqa: E402

# For tests of precision.attention='cpu' and precision.dense='cpu', whose kernels are built with the
# system's C++ compiler.
needs_cpp_compiler = pytest.mark.skipif(
    cpu_build.compiler() is None,
    reason="the 'cpu' kernels are compiled on first use and no C++ compiler was found")

def pytest_collection_modifyitems(config, items):
  """Tests marked `heavy` go first. pytest-xdist hands tests to its workers in collection order,
  so heavy tests collected last (the TPU compiles, the training drivers) would leave one worker
  running them alone at the end; first, they overlap and the short tests fill the gaps."""
  del config
  items.sort(key=lambda item: item.get_closest_marker('heavy') is None)  # stable sort


@pytest.fixture(scope='session')
def gcs():
  """The local GCS server of this test process (tests/gcs_server.py); `gcs.bucket(name)` makes a
  bucket and returns 'gs://name'."""
  server = gcs_server.Server(gcs_server.port_from_environment()).start()
  yield server
  server.stop()


SHARED = pathlib.Path(__file__).resolve().parents[1].parent / 'shared'
FIXTURE = SHARED / 'fixtures' / 'vtp_reference_tiny'


@pytest.fixture(scope="session")
def reference_fixture() -> pathlib.Path:
  """The tiny reference-implementation fixture; skips where ../shared is absent (a user's clone)."""
  if not (FIXTURE / 'io.npz').exists():
    pytest.skip(f'reference fixture not found at {FIXTURE} (it ships beside the repo in CI only)')
  return FIXTURE


@pytest.fixture(scope='session')
def imported_fixture(reference_fixture, tmp_path_factory):
  """The reference fixture imported into a vtp-jax checkpoint folder (scanned layout)."""
  from vtp_jax.tools import import_reference
  dst = tmp_path_factory.mktemp('imported')
  import_reference.import_reference(reference_fixture, dst, scan_layers=True)
  return dst


def shrink_model(config):
  """The micro model's towers and heads on any config (its data and losses unchanged): compile
  time, which grows with the unrolled depth, not arithmetic, dominates a CPU test."""
  config.model.encoder.update(width=32, depth=2, heads=2)
  config.model.decoder.update(width=32, depth=1, heads=2)
  config.model.text.update(width=32, depth=1, heads=2, context_length=8)
  config.model.clip_dim = 16
  config.model.bottleneck_dim = 8
  config.model.dino_head.update(hidden=32, bottleneck=16, prototypes=64)
  return config


def micro_config(**precision):
  """vtp_tiny shrunk further for unit tests: compile time, not arithmetic, dominates on CPU."""
  from configs import vtp_tiny
  config = shrink_model(vtp_tiny.get_config())
  config.data.image_size = 32
  config.evals.at_end = False  # vtp_tiny's README-demo evals read vtp_shapes
  config.data.worker_count = 0  # no worker processes, whatever the machine's cores (auto is -1)
  config.precision.update(precision)
  return config


def adamw_config(**overrides):
  """A c.optim section for optimizer tests: plain AdamW at a constant lr, no decay, no groups, no
  clipping; tests switch features on through `overrides`."""
  import ml_collections
  c = ml_collections.ConfigDict(dict(
      optimizer='adamw', lr=1e-2, lr_scaling='none', lr_reference_batch=1024, warmup_steps=0,
      schedule='constant', final_lr=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      weight_decay_end=0.0, layer_decay=1.0, patch_embed_lr_mult=1.0, clip_grad_norm=0.0,
      clip_grad_scope='global', freeze_last_layer_steps=0, momentum=0.992, momentum_end=1.0))
  c.update(overrides)
  return c


# micro_config as a config file for launch/main.py subprocesses (test_loop.py, test_launch.py):
# a subprocess must not import this file, which forces 8 devices. CLIP and reconstruction only.
MICRO_CONFIG = '''
from configs import vtp_tiny

def get_config():
  c = vtp_tiny.get_config()
  c.model.encoder.update(width=32, depth=2, heads=2)
  c.model.decoder.update(width=32, depth=1, heads=2)
  c.model.text.update(width=32, depth=1, heads=2, context_length=8)
  c.model.clip_dim = 16
  c.model.bottleneck_dim = 8
  c.model.dino_head.update(hidden=32, bottleneck=16, prototypes=64)
  c.data.update(image_size=32, batch_size=4, rec_batch_fraction=0.5, source='synthetic',
                worker_count=0)
  c.loss.update(ssl_weight=0.0, lpips_weight=0.0)
  c.optim.update(warmup_steps=2, freeze_last_layer_steps=1)
  c.train.update(steps=40, checkpoint_every=10, log_every=1, image_log_every=6, image_log_count=2)
  c.evals.at_end = False  # the demo's evals are not part of these runs
  return c
'''


# The kill switches a test sets for one driver subprocess; never inherited by another.
KILL_SWITCHES = ('VTP_TEST_KILL_AFTER_SAVE', 'VTP_TEST_KILL_DURING_SET_ASIDE')


def driver_subprocess_env(base: pathlib.Path, config_name: str) -> tuple:
  """(config file, environment) for driver subprocesses (launch/main.py or a script importing the
  config by `config_name`): MICRO_CONFIG written to base/config_name.py, one CPU device, and the
  pytest run's compilation cache (so a program one xdist worker's subprocess compiled is read by
  the other's: a warm driver start costs 13 CPU-s against 32 CPU-s cold)."""
  config_file = base / f'{config_name}.py'
  config_file.write_text(MICRO_CONFIG)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(pathlib.Path(__file__).parents[1]),
             XLA_FLAGS=FAST_COMPILE + ' --xla_force_host_platform_device_count=1',
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  for key in KILL_SWITCHES:
    env.pop(key, None)
  return config_file, env


def assert_abstract_state_describes(state, config, mesh):
  """`create(abstract=True)` gives exactly the shapes, dtypes and shardings `create` makes."""
  from vtp_jax import tasks  # local, as in the fixtures above
  abstract, _, _ = tasks.for_config(config).create_state(config, mesh, abstract=True)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  paths_and_arrays = jax.tree_util.tree_flatten_with_path(state)[0]
  for (path, want), got in zip(paths_and_arrays, jax.tree.leaves(abstract)):
    assert isinstance(got, jax.ShapeDtypeStruct), path  # nothing was allocated
    assert (got.shape, got.dtype) == (want.shape, want.dtype), path
    assert got.sharding.is_equivalent_to(want.sharding, want.ndim), (path, got.sharding,
                                                                     want.sharding)


def assert_blocks_agree(ours, reference, x, *, first_output=False, out_atol=1e-6, grad_atol=1e-6):
  """Two block-level modules that should be the same function with the same parameters (two
  implementations of one layer): the parameter trees match, and so do the outputs on `x` and the
  parameter gradients of sum(tanh(output)). RoPE tables for 6 rotated tokens after 1 prefix token
  are passed as (x, sin, cos); `first_output` takes element 0 of a tuple output (Block's).
  Returns the jitted gradient function (module, params) and the parameters, for checks on the
  compiled program. Jitted throughout: op by op, every random draw and op compiles on its own."""
  angles = jax.random.uniform(jax.random.PRNGKey(3), (6, 8)) * 3.0
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  params = jax.jit(ours.init)(jax.random.PRNGKey(4), x, sin, cos)
  assert jax.tree.structure(params) == jax.tree.structure(
      jax.eval_shape(reference.init, jax.random.PRNGKey(4), x, sin, cos))

  def output(module, p):
    out = module.apply(p, x, sin, cos)
    return out[0] if first_output else out

  np.testing.assert_allclose(np.asarray(jax.jit(output, static_argnums=0)(ours, params)),
                             np.asarray(jax.jit(output, static_argnums=0)(reference, params)),
                             rtol=1e-5, atol=out_atol)
  grad = jax.jit(jax.grad(lambda module, p: jnp.sum(jnp.tanh(output(module, p))), argnums=1),
                 static_argnums=0)
  got, want = grad(ours, params), grad(reference, params)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=grad_atol,
                               err_msg=jax.tree_util.keystr(path))
  return grad, params
