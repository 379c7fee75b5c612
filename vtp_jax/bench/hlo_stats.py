"""Collectives of a compiled XLA program, read from its optimised HLO text: how many of each kind a
step executes and how many bytes they move.

Read from `compiled.as_text()` (the per-device SPMD program after XLA's passes), so what is counted
is what the target runs, including the forms a backend rewrites collectives into:
  - TPU wraps most collectives in async fusions (`async-collective-start` calling a fused
    computation that holds the `all-gather`), and turns reduce-scatters into `all-reduce-scatter`
    fusions whose body is an `all-reduce`: those count as reduce-scatter.
  - `*-start` / `*-done` pairs count once, at the start.
  - Collectives inside a `while` body (scanned layers) count once per iteration, from the loop's
    `known_trip_count`; a loop without one counts once and is reported in `unknown_trip_counts`.

Bytes are the logical buffer each collective works on: the gathered output of an all-gather, the
unreduced input of a reduce-scatter, the buffer of an all-reduce, all-to-all or permute.
`traffic_bytes` is what one device sends over its links under ring algorithms, the usual lower
bound: (n-1)/n of the buffer for all-gather, reduce-scatter and all-to-all, 2(n-1)/n for all-reduce,
the whole buffer for a permute (n = the replica group's size).
"""

import collections
import functools
import math
import re

import numpy as np

KINDS = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')

_DTYPE_BYTES = {
    'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4,
    'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16, 's4': 0.5, 'u4': 0.5,
}
_ARRAY = re.compile(r'\b([a-z][a-z0-9]*)\[([0-9,]*)\]')
_HEADER = re.compile(r'^(?:ENTRY\s+)?%([^\s(]+)\s*\(')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*(.*)$')
_CALLED = re.compile(r'\b(calls|body|condition|branch_computations|called_computations)='
                     r'(\{[^}]*\}|%[^\s,)]+)')
_CONDITION = re.compile(r'condition=%([^\s,]+)')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_EXPLICIT_GROUPS = re.compile(r'replica_groups=\{(\{[0-9,]*\})')
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_IOTA_GROUPS = re.compile(r'replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?')
_PAIRS = re.compile(r'source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}')
_CUSTOM_CALL_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def array_bytes(type_text: str) -> list[float]:
  """Byte sizes of the arrays named in an HLO type ('bf16[16,128]{1,0}' or a tuple of them)."""
  out = []
  for dtype, dims in _ARRAY.findall(type_text):
    if dtype in _DTYPE_BYTES:
      out.append(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d))
  return out


def _split_type(rest: str) -> tuple[str, str]:
  """('type text', 'opcode(...') of an instruction's right-hand side."""
  if rest.startswith('('):
    depth = 0
    for i, ch in enumerate(rest):
      depth += (ch == '(') - (ch == ')')
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  type_text, _, tail = rest.partition(' ')
  return type_text, tail


def _group_size(line: str, n_partitions: int) -> int:
  group = _first_group(line)
  return n_partitions if group is None else max(len(group), 1)  # no groups printed: all devices


def _first_group(line: str) -> list[int] | None:
  """Partition ids of the first replica group (or the devices of every permute pair)."""
  if m := _EXPLICIT_GROUPS.search(line):
    return [int(x) for x in m.group(1).strip('{}').split(',') if x]
  if m := _MESH_GROUPS.search(line):
    named = re.findall(r"'([^']+)'=(\d+)", m.group(1))
    axes = re.findall(r"'([^']+)'", m.group(2))
    ids = np.arange(math.prod(int(n) for _, n in named)).reshape([int(n) for _, n in named])
    order = [i for i, (a, _) in enumerate(named) if a not in axes] + [
        i for i, (a, _) in enumerate(named) if a in axes]
    size = math.prod(int(n) for a, n in named if a in axes)
    return ids.transpose(order).reshape(-1, size)[0].tolist()
  if m := _IOTA_GROUPS.search(line):
    groups = [int(x) for x in m.group(1).split(',')]
    dims = [int(x) for x in m.group(2).split(',')]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(3):
      ids = ids.transpose([int(x) for x in m.group(3).split(',')])
    return ids.reshape(groups[0], -1)[0].tolist()
  if m := _PAIRS.search(line):
    return [int(x) for x in re.findall(r'\d+', m.group(1))]
  return None


@functools.lru_cache(maxsize=2)  # bench.aot reads collectives and costs from the same text
def _parse(hlo_text: str):
  """{computation: [(name, type_text, opcode, line)]}, the entry's name."""
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    if current is None:
      if m := _HEADER.match(line):
        current = m.group(1)
        computations[current] = []
        if line.startswith('ENTRY'):
          entry = current
      continue
    if line.rstrip() == '}':
      current = None
      continue
    if m := _INSTRUCTION.match(line):
      type_text, tail = _split_type(m.group(2))
      opcode = tail.split('(', 1)[0].strip()
      computations[current].append((m.group(1), type_text, opcode, line))
    elif computations[current]:
      # A string attribute holding newlines (a Pallas kernel's backend_config, e.g. splash
      # attention's block sizes) continues its instruction on the next lines.
      name, type_text, opcode, text = computations[current][-1]
      computations[current][-1] = (name, type_text, opcode, text + '\n' + line)
  return computations, entry


def _condition_bound(instructions) -> int | None:
  """N for a loop condition `counter < N` with N a constant (how jax's scan and fori_loop lower,
  counting from 0), None for any other condition."""
  constants = {name: int(m.group(1)) for name, _, opcode, line in instructions
               if opcode == 'constant' and (m := re.search(r'constant\((-?\d+)\)', line))}
  for _, _, opcode, line in instructions:
    if opcode == 'compare' and 'direction=LT' in line and line.lstrip().startswith('ROOT'):
      operands = re.findall(r'%([^\s,)]+)', line.split('compare(', 1)[1].split(')', 1)[0])
      if len(operands) == 2 and operands[1] in constants:
        return constants[operands[1]]
  return None


def trip_count(computations, while_line: str) -> int | None:
  """Iterations of a while loop: XLA's `known_trip_count`, else a `counter < N` condition."""
  if trip := _TRIP_COUNT.search(while_line):
    return int(trip.group(1))
  cond = _CONDITION.search(while_line)
  return _condition_bound(computations.get(cond.group(1), ())) if cond else None


def _multiplicities(computations, entry, count_iterations=True):
  """How many times each computation runs per execution of the entry, and the while loops whose
  trip count XLA did not record."""
  runs = collections.Counter({entry: 1})
  unknown = []
  order = [entry]
  seen = {entry}
  i = 0
  while i < len(order):  # callers before callees: HLO call graphs are acyclic
    name = order[i]
    i += 1
    for _, _, opcode, line in computations.get(name, ()):
      for attr, target in _CALLED.findall(line):
        if attr == 'condition':
          continue
        times = 1
        if opcode == 'while' and attr == 'body' and count_iterations:
          trip = trip_count(computations, line)
          if trip is None:
            unknown.append(name)
          else:
            times = trip
        for callee in re.findall(r'%([^\s,}]+)', target):
          runs[callee] += runs[name] * times
          if callee not in seen:
            seen.add(callee)
            order.append(callee)
  return runs, unknown


def collective_of(comp: str, type_text: str, opcode: str, line: str,
                  n_partitions: int) -> tuple[str, float, float] | None:
  """(kind, logical bytes, ring traffic bytes) of one instruction, or None if it is no collective
  (the counting rules of the module docstring)."""
  base = opcode[:-len('-start')] if opcode.endswith('-start') else opcode
  if base not in KINDS:
    return None
  arrays = array_bytes(type_text)
  n = _group_size(line, n_partitions)
  if base == 'all-gather':
    size = arrays[-1] if opcode.endswith('-start') else sum(arrays)
    return base, size, size * (n - 1) / n
  if base == 'all-reduce' and comp.startswith('all-reduce-scatter'):
    size = sum(arrays)
    return 'reduce-scatter', size, size * (n - 1) / n
  if base == 'all-reduce':
    size = sum(arrays)  # all-reduce-start has its operands' shape, as all-reduce
    return base, size, 2 * size * (n - 1) / n
  if base == 'reduce-scatter':
    size = sum(arrays) * n
    return base, size, size * (n - 1) / n
  if base == 'all-to-all':
    size = sum(arrays)
    return base, size, size * (n - 1) / n
  # collective-permute(-start): (operand, result, contexts...) or the result alone
  return base, arrays[0], arrays[0]


def num_partitions(hlo_text: str) -> int:
  m = re.search(r'num_partitions=(\d+)', hlo_text)
  return int(m.group(1)) if m else 1


def collective_stats(hlo_text: str, partition_slices=None) -> dict:
  """{kind: {'count', 'bytes', 'traffic_bytes'}} for every kind in KINDS (zeros where absent), plus
  'unknown_trip_counts': computations holding a while loop without a recorded trip count.

  With `partition_slices` (the slice index of each partition id: the mesh's devices in order),
  'dcn_traffic_bytes' is the part of the traffic whose groups span slices (data-centre network).
  """
  computations, entry = _parse(hlo_text)
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text; pass compiled.as_text().')
  runs, unknown = _multiplicities(computations, entry)
  n_partitions = num_partitions(hlo_text)
  stats = {kind: {'count': 0, 'bytes': 0.0, 'traffic_bytes': 0.0} for kind in KINDS}
  dcn_traffic = 0.0
  for comp, instructions in computations.items():
    times = runs.get(comp, 0)
    if not times:
      continue
    for _, type_text, opcode, line in instructions:
      found = collective_of(comp, type_text, opcode, line, n_partitions)
      if found is None:
        continue
      kind, size, traffic = found
      if partition_slices is not None:
        group = _first_group(line)
        members = range(len(partition_slices)) if group is None else group
        if len({partition_slices[i] for i in members}) > 1:
          dcn_traffic += traffic * times
      entry_stats = stats[kind]
      entry_stats['count'] += times
      entry_stats['bytes'] += size * times
      entry_stats['traffic_bytes'] += traffic * times
  for kind in KINDS:
    stats[kind]['bytes'] = int(stats[kind]['bytes'])
    stats[kind]['traffic_bytes'] = int(stats[kind]['traffic_bytes'])
  stats['unknown_trip_counts'] = sorted(set(unknown))
  if partition_slices is not None:
    stats['dcn_traffic_bytes'] = int(dcn_traffic)
  return stats


# Ops that move no HBM bytes of their own (structure, or bodies counted where they run).
_FREE = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'while', 'call',
         'conditional', 'after-all', 'partition-id', 'replica-id', 'copy-done', 'async-done',
         'all-gather-done', 'all-reduce-done', 'collective-permute-done', 'opt-barrier'}


def _operand_names(line: str, opcode: str) -> list[str]:
  args = line.split(f' {opcode}(', 1)
  if len(args) < 2:
    return []
  depth = 1
  for i, ch in enumerate(args[1]):
    depth += (ch == '(') - (ch == ')')
    if depth == 0:
      return re.findall(r'%([^\s,)]+)', args[1][:i])
  return []


def _contraction_flops(line, opcode, out_elems, shapes) -> float:
  """2 x outputs x multiply-adds per output of a convolution (TPU's form of every matmul) or dot."""
  operands = _operand_names(line, opcode)
  if len(operands) < 2:
    return 0.0
  if opcode == 'convolution':
    # TPU writes every einsum as a convolution whose "spatial" dims may be batch dims (window 1
    # over an input of size 1) or contracted ones (window = input size): per output element,
    # the multiply-adds are the kernel's input features times min(window, input) per spatial dim.
    labels = re.search(r'dim_labels=([^_]+)_([^-]+)->', line)
    lhs, kernel = shapes.get(operands[0]), shapes.get(operands[1])
    if not labels or lhs is None or kernel is None:
      return 0.0
    lhs_labels, kernel_labels = labels.groups()
    if len(lhs_labels) != len(lhs) or len(kernel_labels) != len(kernel):
      return 0.0
    # A base-dilated convolution (`lhs_dilate`) is how TPU writes a batched matmul whose batch
    # dims became spatial ones: the window of size w over an input dilated d times meets only
    # ceil(w / d) real elements (1 when w == d), not w.
    window = re.search(r'window=\{size=([0-9x]+)', line)
    dilate = re.search(r'lhs_dilate=([0-9x]+)', line)
    sizes = [int(x) for x in window.group(1).split('x')] if window else []
    dilations = [int(x) for x in dilate.group(1).split('x')] if dilate else []
    macs = kernel[kernel_labels.index('i')]
    for dim, label in enumerate(kernel_labels):
      if label.isdigit():  # spatial dim number `label`, the window's entry of the same number
        hits = min(kernel[dim], lhs[lhs_labels.index(label)])
        if int(label) < min(len(sizes), len(dilations)):
          hits = min(hits, -(-sizes[int(label)] // dilations[int(label)]))
        macs *= hits
    return 2.0 * out_elems * macs
  lhs = shapes.get(operands[0])
  dims = re.search(r'lhs_contracting_dims=\{([0-9,]*)\}', line)
  if lhs is None or not dims:
    return 0.0
  return 2.0 * out_elems * math.prod(lhs[int(d)] for d in dims.group(1).split(',') if d)


def loop_aware_costs(hlo_text: str) -> dict:
  """{'flops', 'bytes_accessed'} per execution of the entry with every loop body counted once per
  iteration, and {'flops_once', 'bytes_once'} with each body counted once, as XLA's cost analysis
  does (which undercounts scanned layers by their depth). Matmul/convolution FLOPs wherever they
  sit (fused or not) and attention kernels' (`kernel_cost`); the operand and result bytes of every top-level op and fusion (a fusion's
  internals stay on chip; reading a whole operand where a fusion slices it overcounts, so the ratio
  of the two figures is the trustworthy part: `bench.aot` scales XLA's own counts by it)."""
  computations, entry = _parse(hlo_text)
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text; pass compiled.as_text().')
  every = _costs(computations, _multiplicities(computations, entry)[0])
  once = _costs(computations, _multiplicities(computations, entry, count_iterations=False)[0])
  return {**every, 'flops_once': once['flops'], 'bytes_once': once['bytes_accessed']}


def _costs(computations, runs) -> dict:
  fused = set()
  for instructions in computations.values():
    for _, _, opcode, line in instructions:
      if opcode == 'fusion':
        fused.update(re.findall(r'calls=%([^\s,]+)', line))
  flops = bytes_accessed = 0.0
  for comp, instructions in computations.items():
    times = runs.get(comp, 0)
    if not times:
      continue
    shapes, sizes = {}, {}
    for name, type_text, _, _ in instructions:
      arrays = _ARRAY.findall(type_text)
      if len(arrays) == 1:
        shapes[name] = [int(d) for d in arrays[0][1].split(',') if d]
      sizes[name] = sum(array_bytes(type_text))
    for name, type_text, opcode, line in instructions:
      if opcode in ('convolution', 'dot'):
        flops += times * _contraction_flops(line, opcode, math.prod(shapes.get(name, [0])),
                                            shapes)
      elif opcode == 'custom-call' and (kernel := kernel_cost(line, shapes)) is not None:
        flops += times * kernel['flops']
      if comp in fused or opcode in _FREE:
        continue
      operands = _operand_names(line, opcode)
      bytes_accessed += times * (sizes[name] + sum(sizes.get(o, 0) for o in operands))
  return {'flops': flops, 'bytes_accessed': bytes_accessed}


_COST_ESTIMATE = re.compile(r'"cost_estimate":\{"flops":"(\d+)"')


def kernel_cost(line: str, shapes: dict) -> dict | None:
  """{'flops', 'head_dim', 'tokens'} of an attention kernel's custom call, None for any other
  instruction. A Pallas kernel's FLOPs are those it declares (`pl.CostEstimate`, in its
  backend_config; 0 where it declares none, as splash does); cuDNN's fused attention declares
  nothing, so its FLOPs come from its (batch, tokens, heads, head_dim) operands: 4 B H Tq Tk d
  forward (q k^T and p v), 10 backward (q k^T recomputed, dv, dp, dq, dk). `head_dim` and `tokens`
  are the first operand's two minor dimensions (heads-first Pallas layouts) or its last and second
  (cuDNN's)."""
  target = _CUSTOM_CALL_TARGET.search(line)
  if target is None or not target.group(1).startswith(KERNEL_CALL_PREFIXES):
    return None
  operands = [shapes.get(o) for o in _operand_names(line, 'custom-call')]
  q = operands[0] if operands and operands[0] else [1, 1]
  if target.group(1).startswith('__cudnn$fmha') and len(operands) >= 2 and all(
      o and len(o) == 4 for o in operands[:2]):
    (batch, tq, heads, head_dim), tk = operands[0], operands[1][1]
    per = 10 if 'Backward' in target.group(1) else 4
    return {'flops': float(per * batch * heads * tq * tk * head_dim), 'head_dim': head_dim,
            'tokens': tq}
  declared = _COST_ESTIMATE.search(line)
  return {'flops': float(declared.group(1)) if declared else 0.0, 'head_dim': q[-1],
          'tokens': q[-2] if len(q) > 1 else 1}


# Custom-call targets of kernels we choose (not XLA's own bookkeeping calls such as AllocateBuffer):
# Pallas/Mosaic kernels on TPU (splash attention) and cuDNN's fused attention on GPU.
KERNEL_CALL_PREFIXES = ('tpu_custom_call', '__cudnn$fmha')


def kernel_calls(hlo_text: str) -> dict:
  """{custom-call target: instructions in the optimised HLO} for the KERNEL_CALL_PREFIXES."""
  targets = _CUSTOM_CALL_TARGET.findall(hlo_text)
  return dict(collections.Counter(t for t in targets if t.startswith(KERNEL_CALL_PREFIXES)))
