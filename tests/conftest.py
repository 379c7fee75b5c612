"""Test-wide setup: eight fake CPU devices, so sharding is exercised for real.

XLA reads the device count once, when jax first initialises its CPU backend; this file is imported by
pytest before any test module, so setting the flag here (before `import jax`) is early enough.
"""

import os
import pathlib

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  (must come after the flag)
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / 'shared'
FIXTURE = SHARED / 'fixtures' / 'vtp_reference_tiny'


@pytest.fixture
def reference_fixture() -> pathlib.Path:
  """The tiny reference-implementation fixture; skips where ../shared is absent (a user's clone)."""
  if not (FIXTURE / 'io.npz').exists():
    pytest.skip(f'reference fixture not found at {FIXTURE} (it ships beside the repo in CI only)')
  return FIXTURE
