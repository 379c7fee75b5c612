"""The serial step-time estimate of a compiled program: what `bench.aot` quotes as the step time and
MFU, beside the ceiling (`bound_step_s`, `mfu_ceiling`) that bounds it from above.

The ceiling divides the program's total FLOPs by the peak and its total bytes by the HBM bandwidth
and takes the larger: it assumes every HBM-bound instruction overlaps every compute-bound one. A
TPU TensorCore runs one fused instruction at a time, so this estimate walks the optimised HLO in
its scheduled order and adds, per top-level instruction (a fusion, a kernel, a copy, a matmul),
max(its FLOPs / its effective peak, its HBM bytes / the bandwidth):

  - FLOPs: the matmuls and convolutions inside it, 2 per multiply-add; a kernel's from the cost it
    declares (`pl.CostEstimate`, read from its backend_config) or, for one that declares none
    (cuDNN attention, splash), from its operand shapes (`hlo_stats.kernel_cost`).
  - Effective peak (TPU): a matmul fills the MXU's systolic array, `Chip.matmul_unit` wide (128 on
    v4, v5e and v5p; 256 on v6e), along its contraction depth K and its output width N, each in
    whole passes of the array: it runs at peak x fill(K) x fill(N), fill(x) = x / (ceil(x / W) W).
    Head dim 64 on a 128-wide array is half a pass; 257 tokens take three passes of 128, two
    thirds full. An attention kernel's matmuls all have the head dim as K or N and the tokens as
    the other: fill(head dim) x fill(tokens). GPUs: no fill rule (`matmul_unit` None), peak as is.
    Source of the array widths: Cloud TPU's system-architecture pages (v4, v5p: four 128 x 128
    MXUs per TensorCore) and the Trillium (v6e) announcement (a 256 x 256 MXU).
  - Bytes: operands + results of the instruction (a fusion's insides stay on chip), scaled by one
    factor so that the program's sum equals XLA's own `bytes accessed` (loop-scaled): XLA knows
    which parts of an operand a fusion reads; the per-instruction shares come from the shapes.
  - Loops: a `while` body runs its trip count times (scanned blocks: once per block).
  - Collectives: a synchronous one costs its ring traffic over the chip's one-direction
    interconnect bandwidth (the data-centre network's for groups that span slices). An async one
    (`*-start` ... `*-done`) runs beside the instructions the schedule put between its start and
    its done; only what the compute between them does not cover is added, at the done. The TPU's
    asynchronous copies between HBM and on-chip memory (`copy-start`, `slice-start`: prefetches)
    are counted alike, their operand's bytes over the HBM bandwidth, but hide only behind the
    time an instruction leaves HBM idle (its compute beyond its own traffic).
Transcendentals (the softmax's exponentials) are not timed: the TPU's transcendental unit runs
beside the MXU and its rate is not published.

What the estimate leaves out: the time between fusions (launch, pipeline fill and drain), bank and
layout conflicts, a fusion reading less of an operand than its shape (handled only on average by the
byte scale), host work and input. It is an estimate, not a bound; the ceiling is the bound.
"""

import collections
import math
import re

from vtp_jax.bench import hlo_stats
from vtp_jax.bench import roofline

_operands = hlo_stats._operand_names  # noqa: SLF001 (same package)
_flops = hlo_stats._contraction_flops  # noqa: SLF001
_CALLS = re.compile(r'calls=%([^\s,]+)')
_ASYNC_COPIES = ('copy-start', 'slice-start')
_BODY = re.compile(r'body=%([^\s,]+)')
_BRANCHES = re.compile(r'(?:branch_computations|true_computation|false_computation)=\{?([^}]*)\}?')
_TO_APPLY = re.compile(r'to_apply=%([^\s,]+)')
_CONTRACTING = re.compile(r'(lhs|rhs)_contracting_dims=\{([0-9,]*)\}')
_BATCH = re.compile(r'rhs_batch_dims=\{([0-9,]*)\}')


def fill(size: int, unit: int | None) -> float:
  """The share of `unit`-wide array passes that `size` rows or columns fill (1.0 for no unit)."""
  if not unit or size <= 0:
    return 1.0
  return size / (math.ceil(size / unit) * unit)


def _dims(shape) -> int:
  return math.prod(shape) if shape else 1


def matmul_fill(line: str, opcode: str, shapes: dict, unit: int | None, name: str = '') -> float:
  """fill(K) x fill(N) of the dot or convolution `name`: K its contraction depth, N its output
  width (the right-hand side's free dimensions; a convolution's output features)."""
  if not unit:
    return 1.0
  operands = _operands(line, opcode)
  if len(operands) < 2:
    return 1.0
  rhs = shapes.get(operands[1])
  if rhs is None:
    return 1.0
  if opcode == 'convolution':
    # TPU writes matmuls as convolutions whose spatial dims may be contracted (window = input):
    # the depth is the multiply-adds per output, not the kernel's input features alone.
    labels = re.search(r'dim_labels=[^_]+_([^-]+)->', line)
    out = _dims(shapes.get(name)) if name else 0
    if not labels or len(labels.group(1)) != len(rhs) or not out:
      return 1.0
    k = _flops(line, opcode, out, shapes) / (2 * out)
    n = rhs[labels.group(1).index('o')]
    return fill(round(k), unit) * fill(n, unit)
  contracting = dict(_CONTRACTING.findall(line))
  rhs_contract = [int(d) for d in contracting.get('rhs', '').split(',') if d]
  batch = _BATCH.search(line)
  rhs_batch = [int(d) for d in batch.group(1).split(',') if d] if batch else []
  k = _dims([rhs[d] for d in rhs_contract])
  n = _dims([rhs[d] for d in range(len(rhs)) if d not in rhs_contract and d not in rhs_batch])
  return fill(k, unit) * fill(n, unit)


class _Estimator:
  """One pass over a parsed program (see the module docstring for the rules)."""

  def __init__(self, hlo_text: str, chip, byte_scale: float, partition_slices=None,
               scope_of=None, count_iterations: bool = True):
    self.computations, self.entry = hlo_stats._parse(hlo_text)  # noqa: SLF001
    if self.entry is None:
      raise ValueError('no ENTRY computation in the HLO text; pass compiled.as_text().')
    self.chip = chip
    self.unit = getattr(chip, 'matmul_unit', None)
    self.byte_scale = byte_scale
    self.count_iterations = count_iterations
    self.n_partitions = hlo_stats.num_partitions(hlo_text)
    self.partition_slices = partition_slices
    self.scope_of = scope_of  # (computation, instruction name) -> scope, or None
    self.fused = set()
    for instructions in self.computations.values():
      for _, _, opcode, line in instructions:
        if opcode == 'fusion':
          self.fused.update(_CALLS.findall(line))
    self.parts = collections.Counter()
    self.scopes = collections.Counter()
    self.instructions = []
    self._shapes = {}

  def shapes(self, comp: str) -> dict:
    if comp not in self._shapes:
      self._shapes[comp] = roofline._shapes(self.computations.get(comp, ()))  # noqa: SLF001
    return self._shapes[comp]

  def matmul_seconds(self, comp: str, seen=None) -> float:
    """Seconds of the matmuls inside a fused computation (and the fusions nested in it)."""
    seen = set() if seen is None else seen
    if comp in seen:
      return 0.0
    seen.add(comp)
    shapes = self.shapes(comp)
    total = 0.0
    for name, _, opcode, line in self.computations.get(comp, ()):
      if opcode in ('convolution', 'dot'):
        flops = _flops(line, opcode, _dims(shapes.get(name)), shapes)
        total += flops / (self.chip.peak_flops * matmul_fill(line, opcode, shapes, self.unit, name))
      for callee in _CALLS.findall(line):
        total += self.matmul_seconds(callee, seen)
    return total

  def collective_seconds(self, comp, type_text, opcode, line) -> float | None:
    found = hlo_stats.collective_of(comp, type_text, opcode, line, self.n_partitions)
    if found is None:
      return None
    _, _, traffic = found
    rate = self.chip.ici_bytes_per_s / 2
    if self.partition_slices is not None and self.chip.dcn_bytes_per_s:
      group = hlo_stats._first_group(line)  # noqa: SLF001
      members = range(len(self.partition_slices)) if group is None else group
      if len({self.partition_slices[i] for i in members}) > 1:
        rate = self.chip.dcn_bytes_per_s
    return traffic / rate

  @staticmethod
  def overlap(pending: dict, seconds: float, hbm_idle: float) -> None:
    """What is in flight runs beside an instruction of `seconds`: a collective over the links for
    all of it, an async copy only while the instruction leaves HBM idle (`hbm_idle`: the time its
    compute exceeds its own HBM traffic)."""
    for left in pending.values():
      beside = seconds if left[1].startswith('collectives') else hbm_idle
      left[0] = max(0.0, left[0] - beside)

  def run(self, comp: str, times: float) -> tuple[float, float]:
    """(seconds, of which HBM is idle) of one execution of `comp`; adds `times` x each
    instruction's seconds to the parts, scopes and instruction list."""
    shapes = self.shapes(comp)
    sizes = {name: sum(hlo_stats.array_bytes(t)) for name, t, _, _ in self.computations[comp]}
    pending = {}  # async start -> [seconds still to cover, the part they go to if exposed]
    total = idle_total = 0.0
    for name, type_text, opcode, line in self.computations[comp]:
      seconds, part, idle = 0.0, None, 0.0
      if opcode == 'while':
        body = _BODY.search(line)
        trip = hlo_stats.trip_count(self.computations, line) if self.count_iterations else 1
        trip = 1 if trip is None else trip
        if body and body.group(1) in self.computations:
          seconds, idle = (trip * x for x in self.run(body.group(1), times * trip))
        self.overlap(pending, seconds, idle)
      elif opcode in ('call', 'conditional', 'async-start') or (
          opcode == 'custom-call' and _TO_APPLY.search(line)):
        callees = _CALLS.findall(line) + _TO_APPLY.findall(line)
        for group in _BRANCHES.findall(line):
          callees += re.findall(r'%([^\s,}]+)', group)
        callees = [c for c in callees if c in self.computations and c not in self.fused]
        seconds, idle = max((self.run(c, times) for c in callees), default=(0.0, 0.0))
        self.overlap(pending, seconds, idle)
      elif opcode not in hlo_stats._FREE:  # noqa: SLF001
        # Every instruction that moves bytes is charged them, as XLA's `bytes accessed` counts
        # them (byte_scale makes the sums equal): then the estimate is at least the HBM bound.
        moved = sizes[name] + sum(sizes.get(o, 0) for o in _operands(line, opcode))
        hbm_s = self.byte_scale * moved / self.chip.hbm_bytes_per_s
        collective = self.collective_seconds(comp, type_text, opcode, line)
        started_here = None
        if collective is not None and opcode.endswith('-start'):
          # Its buffers are read and written while the transfer runs; the rest of the transfer
          # runs beside what the schedule put before its done.
          seconds, part = hbm_s, 'collectives (HBM side)'
          started_here = [max(0.0, collective - hbm_s), 'collectives (not hidden)']
        elif collective is not None:
          seconds, part = max(collective, hbm_s), 'collectives (synchronous)'
        elif opcode in _ASYNC_COPIES:
          # A DMA between HBM and on-chip memory (a prefetch into VMEM, or back): it runs beside
          # the instructions until its done, while they leave HBM idle.
          started_here = [hbm_s, 'async copies (not hidden)']
        elif opcode.endswith('-done') and (started := next(
            (o for o in _operands(line, opcode) if o in pending), None)):
          seconds, part = pending.pop(started)
          seconds += hbm_s
        else:
          seconds, part, idle = self.instruction_seconds(opcode, line, shapes, hbm_s, name)
        self.overlap(pending, seconds, idle)
        if started_here is not None:
          pending[name] = started_here
      elif opcode.endswith('-done') and (started := next(
          (o for o in _operands(line, opcode) if o in pending), None)):
        seconds, part = pending.pop(started)
      if part is not None and seconds > 0:
        self.parts[part] += seconds * times
        scope = self.scope_of(comp, name) if self.scope_of else 'program'
        self.scopes[scope] += seconds * times
        self.instructions.append((seconds * times, name, opcode, part, scope, times))
      total += seconds
      idle_total += idle
    for left, _ in pending.values():  # a start whose done this computation does not hold
      total += left
    return total, idle_total

  def instruction_seconds(self, opcode, line, shapes, hbm_s, name):
    """(seconds, part, seconds of it HBM is idle) of one top-level instruction moving `hbm_s`."""
    kernel = hlo_stats.kernel_cost(line, shapes) if opcode == 'custom-call' else None
    if kernel is not None:
      util = fill(kernel['head_dim'], self.unit) * fill(kernel['tokens'], self.unit)
      compute_s = kernel['flops'] / (self.chip.peak_flops * util)
      return max(compute_s, hbm_s), 'attention kernels', max(0.0, compute_s - hbm_s)
    if opcode in ('convolution', 'dot'):
      flops = _flops(line, opcode, _dims(shapes.get(name)), shapes)
      compute_s = flops / (self.chip.peak_flops * matmul_fill(line, opcode, shapes, self.unit,
                                                             name))
    else:
      compute_s = sum(self.matmul_seconds(c) for c in _CALLS.findall(line))
    if compute_s >= hbm_s and compute_s > 0:
      return compute_s, 'compute-bound instructions', compute_s - hbm_s
    return hbm_s, 'HBM-bound instructions', 0.0


def estimate(hlo_text: str, chip, byte_scale: float = 1.0, partition_slices=None,
             scope_of=None, top: int = 15, count_iterations: bool = True) -> dict:
  """{'step_s', 'parts': {part: seconds}, 'scopes': {scope: seconds}, 'top_instructions'} of one
  execution of the program's entry (see the module docstring). `byte_scale` multiplies the HLO's
  operand and result bytes (bench.aot passes XLA's total over the HLO's); `scope_of(computation,
  instruction)` names the scope an instruction's time is charged to."""
  estimator = _Estimator(hlo_text, chip, byte_scale, partition_slices, scope_of,
                         count_iterations)
  step, _ = estimator.run(estimator.entry, 1.0)
  estimator.instructions.sort(key=lambda row: -row[0])
  return {
      'step_s': step,
      'parts': dict(estimator.parts),
      'scopes': dict(sorted(estimator.scopes.items(), key=lambda kv: -kv[1])),
      'top_instructions': [
          {'seconds': s, 'name': n, 'opcode': op, 'part': part, 'scope': scope, 'runs': t}
          for s, n, op, part, scope, t in estimator.instructions[:top]],
  }
