"""XLA compiler options of the train steps, per platform: one table, passed to every step's
`jax.jit(compiler_options=...)`, so the launcher, `bench.step`, `bench.profile` and `bench.aot`
compile the same program (they all build the step through the same functions).

Options go with the compile rather than through `LIBTPU_INIT_ARGS` / `XLA_FLAGS`: an environment
variable is read once when the backend starts (too late for a process that already holds one, and
easy to forget on one of several launchers), while a compile option is part of the program's
compile request wherever it is made, and a compile-only target on a CPU host gets it too.

TPU: XLA's windowed einsums ("collective matmuls") are off for all-gathers and reduce-scatters.
Under FSDP they decompose each projection into a loop that passes weight shards round the ring
while re-reading the activation they multiply on every iteration. A projection weight is well
under a megabyte here and its activation over 100 MB, so the loop multiplies HBM traffic instead of
hiding communication. Measured with `bench.aot --breakdown` (docs/scaling.md, 'FSDP that gathers
weights'): VTP-S on v5p-16 at batch 2,048 goes from 10,302 collective-permutes and 28.5 GiB a chip to
37 and 11.6 GiB. The plain all-gather of a weight is then scheduled asynchronously beside compute.

GPU: XLA's Triton GEMM fusions are off, so matmuls go to cuBLAS (as MaxText's GPU flags set too).
With them on, the GPU compiler fails on the backward of the qkv projection beside cuDNN attention
("Couldn't find output tile sizes that satisfy hlo", VTP-L on h200-8 in `bench.aot`).
"""

# Platform (as jax names a device's platform) -> {option: value}. Values are what XLA parses.
OPTIONS: dict[str, dict[str, object]] = {
    'tpu': {
        'xla_tpu_enable_windowed_einsum_for_all_gather': False,
        'xla_tpu_enable_windowed_einsum_for_reduce_scatter': False,
    },
    'gpu': {
        'xla_gpu_enable_triton_gemm': False,
    },
}


def platform_of(mesh) -> str:
  """The platform a mesh's devices compile for ('tpu', 'gpu', 'cpu'); compile-only TPU devices
  from `jax.experimental.topologies` say 'tpu' on a CPU host."""
  platform = mesh.devices.flat[0].platform
  return 'gpu' if platform in ('cuda', 'rocm') else platform


def for_mesh(mesh) -> dict:
  """The compiler options for a step compiled over `mesh` (a fresh dict: the caller may add)."""
  return dict(OPTIONS.get(platform_of(mesh), {}))
