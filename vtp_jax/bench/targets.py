"""Compile targets for `bench.aot`: target names -> compile-only devices, and each chip's published
peak FLOP/s, memory and bandwidths (the constants behind `fits` and the step-time bounds).

Names:
  - Cloud TPU accelerator types, with each generation's own counting rule: v4 and v5p names count
    TensorCores (two per chip: `v5p-256` is 128 chips), v5e (`v5litepod-N` or `v5e-N`) and v6e
    names count chips.
  - libtpu topology strings, chips per axis: `v5p:4x4x8`, `v5e:16x16`, `v6e:8x8`, `v4:4x4x4`.
  - GPU nodes: `h100-8`, `h200-8`, `h200-16` (GPUs in all, 8 per node), or `h100:2x8`.
TPU targets need `libtpu` (`pip install 'jax[tpu]==<jax version>'`); GPU targets need the CUDA
plugin (`pip install jax-cuda12-plugin==<jax version>`, no CUDA libraries needed to compile), and a
jax whose plugin accepts a `target_config` (0.10 does).
"""

import dataclasses
import math
import os
import re

# Per chip: peak dense bf16 FLOP/s, HBM bytes, HBM bytes/s, bidirectional interconnect bytes/s
# (ICI; NVLink on GPUs), data-centre network bytes/s per chip (None: not published).
# Sources: Cloud TPU system architecture pages (v4, v5e, v5p, v6e), NVIDIA H100/H200 datasheets.
GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_flops: float
  hbm_bytes: float
  hbm_bytes_per_s: float
  ici_bytes_per_s: float  # bidirectional, per chip
  dcn_bytes_per_s: float | None
  source: str
  # Width of the matrix unit's systolic array (bench/serial.py's fill rule); None: not modelled.
  matmul_unit: int | None = None


CHIPS = {
    'v4': Chip('TPU v4', 275e12, 32 * GIB, 1200e9, 600e9, None,
               'cloud.google.com/tpu/docs/v4: 275 TFLOP/s, 32 GiB at 1200 GB/s; ICI from the TPU '
               'v4 paper (Jouppi et al. 2023): six 50 GB/s links each way; 128 x 128 MXUs', 128),
    'v5p': Chip('TPU v5p', 459e12, 95 * GIB, 2765e9, 1200e9, 50e9 / 8,
                'cloud.google.com/tpu/docs/v5p: 459 TFLOP/s, 95 GiB at 2765 GB/s, ICI 1200 GB/s '
                'bidirectional, DCN 50 Gbit/s per chip; 128 x 128 MXUs', 128),
    'v5e': Chip('TPU v5e', 197e12, 16 * GIB, 819e9, 400e9, 2 * 100e9 / 8 / 8,
                'cloud.google.com/tpu/docs/v5e: 197 TFLOP/s, 16 GB at 819 GB/s, ICI 400 GB/s '
                'bidirectional, 2 x 100 Gbit/s NICs per 8-chip host; 128 x 128 MXUs', 128),
    'v6e': Chip('TPU v6e', 918e12, 32 * GIB, 1638e9, 800e9, 4 * 200e9 / 8 / 8,
                'cloud.google.com/tpu/docs/v6e: 918 TFLOP/s, 32 GB at 1638 GB/s, ICI 800 GB/s '
                'bidirectional, 4 x 200 Gbit/s NICs per 8-chip host; 256 x 256 MXUs '
                '(Trillium announcement)', 256),
    'h100': Chip('NVIDIA H100 SXM', 989e12, 80e9, 3.35e12, 900e9, 400e9 / 8,
                 'NVIDIA H100 datasheet: 989 TFLOP/s dense bf16, 80 GB HBM3 at 3.35 TB/s, NVLink '
                 '900 GB/s; one 400 Gbit/s InfiniBand NIC per GPU'),
    'h200': Chip('NVIDIA H200 SXM', 989e12, 141e9, 4.8e12, 900e9, 400e9 / 8,
                 'NVIDIA H200 datasheet: 989 TFLOP/s dense bf16, 141 GB HBM3e at 4.8 TB/s, NVLink '
                 '900 GB/s; one 400 Gbit/s InfiniBand NIC per GPU'),
}

# Chip-grid shapes of the slices Cloud TPU offers, by chip count (3-D tori for v4/v5p, 2-D for
# v5e/v6e), as the topology tables of the pages above list them.
_SHAPES_3D = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8',
              256: '4x8x8', 512: '8x8x8', 1024: '8x8x16', 2048: '8x16x16', 4096: '16x16x16',
              6144: '16x16x24'}
_SHAPES_2D = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16',
              256: '16x16'}
_TPU_GENERATIONS = {'v4': ('v4', 2, _SHAPES_3D), 'v5p': ('v5p', 2, _SHAPES_3D),
                    'v5litepod': ('v5e', 1, _SHAPES_2D), 'v5e': ('v5e', 1, _SHAPES_2D),
                    'v6e': ('v6e', 1, _SHAPES_2D)}


# Device kind (as jax reports it, lower case) -> the one-chip target of that chip (bench.device_check).
_ONE_CHIP = {'h100': 'h100:1x1', 'h200': 'h200:1x1', 'v5 lite': 'v5e-1', 'v5e': 'v5e-1',
             'v6 lite': 'v6e-1', 'v6e': 'v6e-1'}


def one_chip_target(device_kind: str) -> str | None:
  """The target name of one chip of `device_kind` ('NVIDIA H100 80GB HBM3' -> 'h100:1x1'); None
  where a chip is no target of its own (a v5p chip is two TensorCores: 'v5p-2')."""
  kind = device_kind.lower()
  return next((target for key, target in _ONE_CHIP.items() if key in kind), None)


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # as given
  platform: str  # 'tpu' or 'cuda'
  chip: Chip
  topology: str  # libtpu topology ('v5p:4x4x8') or GPU 'slices x hosts x devices' ('1x2x8')
  slices: int
  chips: int  # in all, over every slice


class TargetError(ValueError):
  pass


def parse(name: str, slices: int = 1) -> Target:
  """The compile target a name describes; a clear error for names it cannot read."""
  if slices < 1:
    raise TargetError(f'--slices={slices}; use 1 or more.')
  gpu = re.fullmatch(r'(h100|h200)(?:-(\d+)|:(\d+)x(\d+))', name)
  if gpu:
    per_node = int(gpu.group(4) or 8)
    total = int(gpu.group(2)) if gpu.group(2) else int(gpu.group(3)) * per_node
    if total % per_node:
      raise TargetError(f'{name}: {total} GPUs do not fill nodes of {per_node}; use a multiple.')
    nodes = total // per_node
    return Target(name, 'cuda', CHIPS[gpu.group(1)], f'{slices}x{nodes}x{per_node}', slices,
                  total * slices)
  topo = re.fullmatch(r'(v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})', name)
  if topo:
    chips = math.prod(int(x) for x in topo.group(2).split('x'))
    return Target(name, 'tpu', CHIPS[topo.group(1)], name, slices, chips * slices)
  accel = re.fullmatch(r'(v4|v5p|v5litepod|v5e|v6e)-(\d+)', name)
  if accel:
    generation, cores_per_chip, shapes = _TPU_GENERATIONS[accel.group(1)]
    count = int(accel.group(2))
    chips = count // cores_per_chip
    if count % cores_per_chip or chips not in shapes:
      rule = 'TensorCores (2 per chip)' if cores_per_chip == 2 else 'chips'
      raise TargetError(f'{name}: {accel.group(1)} names count {rule}; the slices offered are '
                        f'{", ".join(f"{accel.group(1)}-{c * cores_per_chip}" for c in shapes)}.')
    return Target(name, 'tpu', CHIPS[generation], f'{generation}:{shapes[chips]}', slices,
                  chips * slices)
  raise TargetError(f'--topology={name!r} is not a target name: use a Cloud TPU type (v5p-256, '
                    'v5e-256, v6e-64, v4-128), a libtpu topology (v5p:4x4x8) or a GPU node '
                    '(h100-8, h200-16).')


def gpu_target_config(chip: Chip) -> str:
  """The GpuTargetConfigProto (text) the CUDA plugin compiles for instead of a visible GPU:
  Hopper's per-SM limits, with this chip's memory size and bandwidth."""
  return f'''
gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_bytes_per_s)} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {int(chip.hbm_bytes)} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{chip.name}"
'''


def prepare_environment() -> None:
  """Before jax starts: compile-only work stays on the CPU backend, and several compiling
  processes may load libtpu at once (it takes a lock file otherwise)."""
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')


def devices(target: Target) -> list:
  """The target's compile-only devices (nothing can run on them; they exist to compile for)."""
  from jax.experimental import topologies
  if target.platform == 'tpu':
    kwargs = {'num_slices': target.slices} if target.slices > 1 else {}
    if target.chip is CHIPS['v4'] or target.chip is CHIPS['v5p']:
      kwargs['chip_config_name'] = 'megacore'  # one device per chip, as jax sees these chips
    try:
      return list(topologies.get_topology_desc(platform='tpu', topology_name=target.topology,
                                               **kwargs).devices)
    except RuntimeError as e:
      raise TargetError(f'{target.name}: libtpu is needed to compile for TPUs: pip install '
                        f'"jax[tpu]==<your jax version>" ({e})') from e
  try:
    return list(topologies.get_topology_desc(platform='cuda', topology_name='',
                                             target_config=gpu_target_config(target.chip),
                                             topology=target.topology).devices)
  except Exception as e:  # noqa: BLE001  (jax raises several types; the message is what matters)
    raise TargetError(f'{target.name}: this jax cannot compile for GPUs without one: '
                      f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}. '
                      'Needs the CUDA plugin of the same version (pip install '
                      'jax-cuda12-plugin==<jax version>), jax 0.10 or newer.') from e
