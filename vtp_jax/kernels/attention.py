"""`precision.attention`: the one entry point the model calls for softmax attention.

Every backend computes softmax(q k^T / sqrt(head_dim)) v with float32 scores and the same
parameters; they differ in where and how fast. Two array layouts exist: 'xla', 'cpu' and 'splash'
take heads-first (batch, heads, tokens, head_dim) arrays, which spare XLA the transposes around the
attention matmuls; 'cudnn' and 'jax' take jax.nn.dot_product_attention's tokens-first
(batch, tokens, heads, head_dim). `heads_first` tells the caller which to build.

'auto' (the config default) is not a kernel but a choice made at trace time, per attention call:
on TPU 'vmem' up to its 512 tokens and 'splash' beyond, on NVIDIA GPUs 'cudnn', where the kernel
takes the call (each kernel module's `unsupported` says what it takes), 'xla' otherwise. Since the layout depends on the choice, the
caller resolves 'auto' with `choose` before building q, k, v. The platform is that of the devices
the program is compiled for, read from the mesh being traced under (`jax.set_mesh`), not
`jax.default_backend()`: bench.aot compiles TPU and GPU programs on a CPU host. `resolve` is the
pure rule, so a caller can also report what a config will get.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from absl import logging

OPTION = 'precision.attention'
AUTO = 'auto'
# Beyond the vmem kernel's lengths, 'auto' takes splash from one kernel block of tokens up. Below it
# the padding to 128 moves more bytes than the xla kernel's small score matrices: in docs/scaling.md's
# VTP-S roofline, splash on the text tower's 77 tokens added 36 GiB to its scopes.
SPLASH_MIN_TOKENS = 128
BACKENDS = {
    AUTO: "'vmem' (up to 512 tokens) or 'splash' on TPU, 'cudnn' on NVIDIA GPUs where they take "
          "the call, else 'xla' (chosen at trace time; kernels/attention.py, resolve)",
    'xla': "our XLA kernel with FlashAttention's backward identity (kernels/xla_attention.py)",
    'cpu': 'a compiled float32 XLA:CPU kernel (kernels/cpu_attention.py)',
    'cudnn': "cuDNN's fused GPU kernel, jax.nn.dot_product_attention (kernels/cudnn_attention.py)",
    'jax': "jax.nn.dot_product_attention's own XLA path (kernels/cudnn_attention.py)",
    'splash': 'the TPU splash attention Pallas kernel (kernels/splash_attention.py)',
    'vmem': 'a TPU Pallas kernel holding whole sequences in VMEM, unpadded, up to 512 tokens '
            '(kernels/vmem_attention.py)',
}
_HEADS_FIRST = ('xla', 'cpu', 'splash', 'vmem')


@dataclasses.dataclass(frozen=True)
class Platform:
  """The devices a program is compiled for."""
  name: str  # jax's platform name: 'cpu', 'tpu', 'gpu' ('cuda' is read as 'gpu')
  device_kind: str = ''  # e.g. 'TPU v5 lite', 'NVIDIA H100 80GB HBM3'
  compute_capability: str | None = None  # NVIDIA 'major.minor'; known only for this host's GPUs


@dataclasses.dataclass(frozen=True)
class Call:
  """What the kernels' constraints depend on in one attention call."""
  tokens: int
  head_dim: int
  dtype: str  # numpy name of q/k/v's dtype: 'bfloat16', 'float32', ...
  causal: bool = False
  seq_sharded: bool = False  # the logical axis rules split the token axis over the mesh
  matmul_precision: str | None = None  # jax_default_matmul_precision while tracing


def check(backend: str) -> None:
  if backend not in BACKENDS:
    choices = '; '.join(f'{name!r}: {what}' for name, what in BACKENDS.items())
    raise ValueError(f'{OPTION}={backend!r} is not a backend; use one of {choices}.')


def heads_first(backend: str) -> bool:
  """Whether `backend` takes (batch, heads, tokens, head_dim) rather than (batch, tokens, ...)."""
  check(backend)
  if backend == AUTO:
    raise ValueError(f"{OPTION}='auto' has no layout of its own: resolve it first with "
                     'attention.choose (or attention.resolve) and pass the backend it returns.')
  return backend in _HEADS_FIRST


def resolve(backend: str, call: Call, platform: Platform) -> tuple[str, str]:
  """(backend to run, why) for `call` on `platform`; a named backend is returned as it is."""
  check(backend)
  if backend != AUTO:
    return backend, f'{OPTION}={backend!r} in the config'
  # Imported on use like the kernels below; these modules import no Pallas at the top.
  from vtp_jax.kernels import cudnn_attention
  from vtp_jax.kernels import splash_attention
  from vtp_jax.kernels import vmem_attention
  name = 'gpu' if platform.name == 'cuda' else platform.name
  where = f'{name} ({platform.device_kind})' if platform.device_kind else name
  shape = f'head dim {call.head_dim}, {call.tokens} tokens, {call.dtype}'
  if name == 'tpu':
    vmem_why_not = vmem_attention.unsupported(
        tokens=call.tokens, head_dim=call.head_dim, dtype=call.dtype,
        seq_sharded=call.seq_sharded, matmul_precision=call.matmul_precision)
    if vmem_why_not is None:
      return 'vmem', f'{where}: the vmem kernel takes {shape}, unpadded'
    why_not = splash_attention.unsupported(
        head_dim=call.head_dim, dtype=call.dtype, seq_sharded=call.seq_sharded,
        matmul_precision=call.matmul_precision)
    if why_not is None and call.tokens < SPLASH_MIN_TOKENS:
      why_not = (f'fewer than {SPLASH_MIN_TOKENS} tokens, where padding to a kernel block costs '
                 'more than the scores it saves')
    if why_not is None:
      padded = splash_attention.padded_length(call.tokens)
      pad = f' padded to {padded}' if padded != call.tokens else ''
      return 'splash', f'{where}: vmem cannot take {shape} ({vmem_why_not}); splash takes it{pad}'
    return 'xla', (f'{where}: vmem cannot take {shape} ({vmem_why_not}); splash cannot '
                   f'either: {why_not}')
  if name == 'gpu':
    why_not = cudnn_attention.unsupported(
        head_dim=call.head_dim, dtype=call.dtype, seq_sharded=call.seq_sharded,
        device_kind=platform.device_kind, compute_capability=platform.compute_capability)
    if why_not is None:
      return 'cudnn', f'{where}: cuDNN takes {shape}'
    return 'xla', f'{where}: cuDNN cannot take {shape}: {why_not}'
  return 'xla', f'{where}: no fused attention kernel for this platform'


def trace_platform() -> Platform:
  """The platform of the devices being compiled for: the mesh's under `jax.set_mesh` (compile-only
  TPU/GPU devices on a CPU host included), else the default backend's."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, 'abstract_device', None)
  if device is None:  # no mesh, or an abstract mesh built without devices
    device = jax.devices()[0]
  name = 'gpu' if device.platform == 'cuda' else device.platform
  capability = None
  if name == 'gpu' and jax.default_backend() == 'gpu':
    # Only real GPUs carry a compute capability; the abstract device has none, so take it from
    # this host's GPUs when they are the kind being compiled for.
    local = jax.local_devices()[0]
    if local.device_kind == device.device_kind:
      capability = getattr(local, 'compute_capability', None)
  return Platform(name, device.device_kind, capability)


def _seq_sharded(tokens: int) -> bool:
  """Whether the current logical axis rules and mesh split the token axis ('act_seq')."""
  import flax.linen as nn
  from vtp_jax import sharding
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return False
  spec = nn.logical_to_mesh_axes(('act_seq',))
  return sharding.fit_spec(jax.sharding.PartitionSpec(*spec), (tokens,), mesh)[0] is not None


@functools.lru_cache(maxsize=None)
def _log_choice(name: str, reason: str) -> None:
  # Cached so that a model's many attention calls log one line per distinct choice and reason.
  logging.info("%s='auto' -> %r: %s", OPTION, name, reason)


def choose(backend: str, *, tokens: int, head_dim: int, dtype, causal: bool) -> str:
  """The backend to run for this call while tracing: `backend` itself, or what 'auto' resolves to
  on the platform being compiled for (logged once per distinct choice and reason)."""
  check(backend)
  if backend != AUTO:
    return backend
  call = Call(tokens=int(tokens), head_dim=int(head_dim), dtype=jnp.dtype(dtype).name,
              causal=bool(causal), seq_sharded=_seq_sharded(int(tokens)),
              matmul_precision=jax.config.jax_default_matmul_precision)
  name, reason = resolve(backend, call, trace_platform())
  _log_choice(name, reason)
  return name


def takes_projection(backend: str) -> bool:
  """Whether `backend` takes the stacked qkv projection and the RoPE tables (`qkv_attention`)
  rather than q, k, v built apart: 'vmem' rotates and slices them on chip."""
  return backend == 'vmem'


def qkv_attention(qkv: jax.Array, sin, cos, *, causal: bool, rope_dtype: str,
                  backend: str) -> jax.Array:
  """Attention of the (3, batch, heads, tokens, head_dim) projection, q and k rotated by the RoPE
  tables when given, for a backend that `takes_projection`."""
  if not takes_projection(backend):
    raise ValueError(f'{OPTION}={backend!r} takes q, k, v apart: call softmax_attention.')
  from vtp_jax.kernels import vmem_attention
  return vmem_attention.qkv_attention(qkv, sin, cos, causal, rope_dtype=rope_dtype)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                      backend: str) -> jax.Array:
  """Attention of q, k, v in `backend`'s layout (see `heads_first`), output in the same layout."""
  check(backend)
  if backend == AUTO:
    raise ValueError(f"{OPTION}='auto' must be resolved before q, k, v are built, since the "
                     'layout depends on it: call attention.choose and pass what it returns.')
  # Imported on use: the 'cpu' backend builds C++ and 'splash' pulls in Pallas, neither of which the
  # default path should pay for.
  if backend == 'xla':
    from vtp_jax.kernels import xla_attention
    return xla_attention.softmax_attention(q, k, v, causal)
  if backend == 'cpu':
    from vtp_jax.kernels import cpu_attention
    return cpu_attention.softmax_attention(q, k, v, causal)
  if backend == 'splash':
    from vtp_jax.kernels import splash_attention
    return splash_attention.softmax_attention(q, k, v, causal)
  if backend == 'vmem':
    from vtp_jax.kernels import vmem_attention
    return vmem_attention.softmax_attention(q, k, v, causal)
  from vtp_jax.kernels import cudnn_attention
  return cudnn_attention.softmax_attention(q, k, v, causal,
                                           implementation='cudnn' if backend == 'cudnn' else None)
