"""A roofline of a compiled step by model scope, read from its optimised HLO: where the FLOPs, the
HBM bytes and the collective bytes are, which loops the compiler made, and which instructions move
the most bytes. `python -m vtp_jax.bench.aot ... --breakdown` prints it beside the report.

Scopes come from each instruction's `op_name` metadata, which jax writes as the trace path:
`jvp(VTP.encode)/encoder/blocks_3/...` is the forward of a trained call, `transpose(jvp(...))` its
backward, a call outside `jvp` (`VTP.encode` of the teacher, the optimizer's arithmetic) runs
without gradient. A fusion without metadata takes the scope of the instructions it fuses. The
model methods get readable names (`SCOPE_NAMES`); anything else keeps jax's own frame name.

Counting (per device, loop bodies once per iteration, as `hlo_stats` counts):
  - flops: 2 x multiply-adds of every dot and convolution (TPU writes matmuls as convolutions),
    wherever fused; elementwise work is not counted, as in MFU.
  - hbm bytes: operands + results of every top-level instruction and fusion (a fusion's insides
    stay on chip). This is the same model as XLA's `bytes accessed` but coarser (a fusion that
    slices an operand is charged the whole operand), so the shares are what to read; `bench.aot`
    scales the scope bytes to XLA's total in `hbm_bytes_xla_scaled`.
  - collectives: the logical bytes per kind of `hlo_stats.collective_of`.
Each scope's own bound is max(flops / peak FLOP/s, hbm bytes / HBM bandwidth): arithmetic
intensity (flops per byte) below the chip's ridge point (peak / bandwidth) means HBM-bound.

Loops: every `while` with its trip count and scope. A loop whose body holds a collective-permute
and a dot or convolution is a collective matmul (XLA's windowed einsum: a weight shard passed round
the ring while the activation it multiplies is re-read each iteration); they are named as such.
"""

import collections
import re

from vtp_jax.bench import hlo_stats

# VTP methods (models/vtp.py) and other modules by the name a reader knows them by.
SCOPE_NAMES = {
    'VTP.clip_image_features': 'CLIP image encoder',
    'VTP.clip_text_features': 'text tower',
    'VTP.encode': 'SSL encoder',
    'VTP.dino': 'DINO/iBOT head',
    'VTP.latents': 'rec encoder',
    'VTP.decode': 'pixel decoder',
    'LPIPS': 'LPIPS',
}
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r'calls=%([^\s,]+)')
_BODY = re.compile(r'body=%([^\s,]+)')
_SHAPE = re.compile(r'([a-z][a-z0-9]*\[[0-9,]*\])')


def scope_of_op_name(op_name: str) -> str:
  """'backward SSL encoder', 'forward losses', 'no-grad SSL encoder (teacher)', 'update', ..."""
  parts = op_name.split('/')
  frame = parts[1] if len(parts) > 1 else ''
  direction = 'no-grad'
  if frame.startswith('transpose(jvp(') and frame.endswith('))'):
    direction, frame = 'backward', frame[len('transpose(jvp('):-2]
  elif frame.startswith('jvp(') and frame.endswith(')'):
    direction, frame = 'forward', frame[len('jvp('):-1]
  frame = frame.split(';')[0]
  if frame in SCOPE_NAMES:
    name = SCOPE_NAMES[frame]
    if direction == 'no-grad' and frame in ('VTP.encode', 'VTP.dino'):
      name += ' (teacher)'
    return f'{direction} {name}'
  if frame.startswith('VTP.') or (frame and frame[0].isupper() and '(' not in frame):
    return f'{direction} {frame}'  # another module method (the generator, the GAN stage)
  if direction == 'no-grad':
    # Outside value_and_grad and outside any model call: the AdamW update, the EMA teacher, the
    # centre updates, the logit-scale clamp, teacher-target normalisation.
    return 'update and teacher targets'
  return f'{direction} losses'


class _Program:
  """The parsed HLO with each computation's run count and a scope per instruction."""

  def __init__(self, hlo_text: str):
    self.computations, entry = hlo_stats._parse(hlo_text)  # noqa: SLF001 (same package)
    if entry is None:
      raise ValueError('no ENTRY computation in the HLO text; pass compiled.as_text().')
    self.runs, self.unknown = hlo_stats._multiplicities(self.computations, entry)  # noqa: SLF001
    self.n_partitions = hlo_stats.num_partitions(hlo_text)
    self.fused = set()
    for instructions in self.computations.values():
      for _, _, opcode, line in instructions:
        if opcode == 'fusion':
          self.fused.update(_CALLS.findall(line))
    self._inner_scope = {}

  def scope(self, line: str, known=None, fallback='unattributed') -> str:
    """An instruction's scope: its own metadata, else that of what it fuses, else that of its
    first operand with one (`known`: name -> scope so far), else `fallback` (its caller's)."""
    m = _OP_NAME.search(line)
    if m:
      return scope_of_op_name(m.group(1))
    for callee in _CALLS.findall(line):
      found = self.inner_scope(callee)
      if found:
        return found
    if known:
      for operand in re.findall(r'%([^\s,)]+)', line.split('=', 1)[-1]):
        if operand in known:
          return known[operand]
    return fallback

  def scoped(self):
    """(computation, runs, [(name, type_text, opcode, line, scope)]) in caller-first order; a
    computation's unattributed instructions take the scope of the instruction that calls it."""
    caller_scope = {}
    for comp, times in list(self.runs.items()):
      if not times or comp not in self.computations:
        continue
      known, rows = {}, []
      fallback = caller_scope.get(comp, 'unattributed')
      for name, type_text, opcode, line in self.computations[comp]:
        scope = self.scope(line, known, fallback)
        known[name] = scope
        rows.append((name, type_text, opcode, line, scope))
        for callee in re.findall(r'(?:calls|body|condition|to_apply)=%([^\s,}]+)', line):
          caller_scope.setdefault(callee, scope)
      yield comp, times, rows

  def inner_scope(self, comp: str) -> str | None:
    """The scope of a fused computation: its root's, else the first instruction's that has one."""
    if comp not in self._inner_scope:
      self._inner_scope[comp] = None
      instructions = self.computations.get(comp, ())
      ordered = sorted(instructions, key=lambda ins: not ins[3].lstrip().startswith('ROOT'))
      for _, _, _, line in ordered:
        if (m := _OP_NAME.search(line)):
          self._inner_scope[comp] = scope_of_op_name(m.group(1))
          break
      else:
        for _, _, _, line in instructions:
          for callee in _CALLS.findall(line):
            if (found := self.inner_scope(callee)):
              self._inner_scope[comp] = found
              break
          if self._inner_scope[comp]:
            break
    return self._inner_scope[comp]

  def fused_flops(self, comp: str, seen=None) -> float:
    """Dot/convolution FLOPs inside a fused computation (and fusions nested in it), once."""
    seen = set() if seen is None else seen
    if comp in seen:
      return 0.0
    seen.add(comp)
    instructions = self.computations.get(comp, ())
    shapes = _shapes(instructions)
    total = 0.0
    for name, _, opcode, line in instructions:
      if opcode in ('convolution', 'dot'):
        total += hlo_stats._contraction_flops(line, opcode, _elements(shapes.get(name)), shapes)  # noqa: SLF001
      for callee in _CALLS.findall(line):
        total += self.fused_flops(callee, seen)
    return total


def scope_table(hlo_text: str) -> dict:
  """{(computation, instruction): scope} of every instruction in a computation that runs."""
  return {(comp, name): scope for comp, _, rows in _Program(hlo_text).scoped()
          for name, _, _, _, scope in rows}


def _shapes(instructions) -> dict:
  shapes = {}
  for name, type_text, _, _ in instructions:
    arrays = hlo_stats._ARRAY.findall(type_text)  # noqa: SLF001
    if len(arrays) == 1:
      shapes[name] = [int(d) for d in arrays[0][1].split(',') if d]
  return shapes


def _elements(shape) -> int:
  out = 1
  for d in shape or [0]:
    out *= d
  return out


def _blank():
  return {'flops': 0.0, 'hbm_bytes': 0.0, 'collectives': collections.Counter(),
          'collective_counts': collections.Counter()}


def breakdown(hlo_text: str, peak_flops: float, hbm_bytes_per_s: float, top: int = 20) -> dict:
  """{'scopes': {scope: figures}, 'top_instructions': [...], 'loops': [...], 'totals': {...}}."""
  program = _Program(hlo_text)
  scopes = collections.defaultdict(_blank)
  heavy = []
  loop_scopes = {}
  for comp, times, rows in program.scoped():
    instructions = program.computations[comp]
    sizes = {name: sum(hlo_stats.array_bytes(type_text)) for name, type_text, _, _ in instructions}
    shapes = _shapes(instructions)
    for name, type_text, opcode, line, scope in rows:
      if opcode == 'while':
        loop_scopes[name] = scope
      found = hlo_stats.collective_of(comp, type_text, opcode, line, program.n_partitions)
      if found is not None:
        kind, size, _ = found
        figures = scopes[scope]
        figures['collectives'][kind] += size * times
        figures['collective_counts'][kind] += times
      if comp in program.fused or opcode in hlo_stats._FREE:  # noqa: SLF001
        continue
      flops = 0.0
      if opcode in ('convolution', 'dot'):
        flops = hlo_stats._contraction_flops(line, opcode, _elements(shapes.get(name)), shapes)  # noqa: SLF001
      elif opcode == 'fusion' or opcode.startswith('async'):
        flops = sum(program.fused_flops(c) for c in _CALLS.findall(line))
      elif opcode == 'custom-call' and (kernel := hlo_stats.kernel_cost(line, shapes)):
        flops = kernel['flops']
      operands = hlo_stats._operand_names(line, opcode)  # noqa: SLF001
      moved = sizes[name] + sum(sizes.get(o, 0) for o in operands)
      figures = scopes[scope]
      figures['flops'] += flops * times
      figures['hbm_bytes'] += moved * times
      heavy.append((moved * times, name, opcode, scope, times, type_text))
  total_flops = sum(f['flops'] for f in scopes.values())
  total_bytes = sum(f['hbm_bytes'] for f in scopes.values())
  out_scopes = {}
  for scope, f in sorted(scopes.items(), key=lambda kv: -kv[1]['hbm_bytes']):
    compute_s, hbm_s = f['flops'] / peak_flops, f['hbm_bytes'] / hbm_bytes_per_s
    out_scopes[scope] = {
        'flops': f['flops'], 'hbm_bytes': f['hbm_bytes'],
        'hbm_share': f['hbm_bytes'] / total_bytes if total_bytes else 0.0,
        'intensity': f['flops'] / f['hbm_bytes'] if f['hbm_bytes'] else None,
        'compute_s': compute_s, 'hbm_s': hbm_s,
        'bound': 'hbm' if hbm_s > compute_s else 'compute',
        'collective_bytes': dict(f['collectives']),
        'collective_counts': dict(f['collective_counts']),
    }
  heavy.sort(key=lambda h: -h[0])
  top_instructions = [
      {'bytes': b, 'name': n, 'opcode': op, 'scope': s, 'runs': t,
       'shape': ' '.join(_SHAPE.findall(ty))[:120]}
      for b, n, op, s, t, ty in heavy[:top]]
  return {'scopes': out_scopes, 'top_instructions': top_instructions,
          'loops': loops(program, loop_scopes),
          'totals': {'flops': total_flops, 'hbm_bytes': total_bytes,
                     'ridge_flops_per_byte': peak_flops / hbm_bytes_per_s}}


def _body_contents(program, comp, seen=None) -> set:
  """Opcodes in a loop body and everything it calls (nested loops included)."""
  seen = set() if seen is None else seen
  if comp in seen:
    return set()
  seen.add(comp)
  ops = set()
  for _, _, opcode, line in program.computations.get(comp, ()):
    ops.add(opcode[:-len('-start')] if opcode.endswith('-start') else opcode)
    for callee in re.findall(r'(?:calls|body|to_apply)=%([^\s,}]+)', line):
      ops |= _body_contents(program, callee, seen)
  return ops


def loops(program: '_Program', scopes: dict) -> dict:
  """Every while loop: its trip count, its scope, and whether it is a collective matmul."""
  found = []
  for comp, instructions in program.computations.items():
    times = program.runs.get(comp, 0)
    if not times:
      continue
    for name, _, opcode, line in instructions:
      if opcode != 'while':
        continue
      body = _BODY.search(line)
      trip = hlo_stats.trip_count(program.computations, line)
      contents = _body_contents(program, body.group(1)) if body else set()
      collective_matmul = ('collective-permute' in contents and
                           bool(contents & {'convolution', 'dot', 'fusion'}) and
                           not contents & {'while'})
      scope = scopes.get(name, 'unattributed')
      if scope == 'unattributed' and body:
        scope = program.inner_scope(body.group(1)) or scope
      found.append({'name': name, 'trip_count': trip,
                    'runs': times, 'scope': scope,
                    'kind': 'collective matmul (windowed einsum)' if collective_matmul
                            else 'loop'})
  by_kind = collections.Counter(f['kind'] for f in found)
  return {'count': len(found), 'by_kind': dict(by_kind),
          'collective_matmul_iterations': sum((f['trip_count'] or 1) * f['runs'] for f in found
                                              if f['kind'] != 'loop'),
          'loops': found}


def table(result: dict, hbm_scale: float = 1.0) -> str:
  """The breakdown as a printed table (bytes scaled to XLA's count by `hbm_scale`)."""
  gib = 1024 ** 3
  lines = [f'{"scope":44s} {"est ms":>8s} {"TFLOP":>8s} {"HBM GiB":>9s} {"share":>6s} '
           f'{"FLOP/B":>7s} {"bound":>7s}  collectives GiB']
  for scope, f in result['scopes'].items():
    coll = ', '.join(f'{k} {v / gib:.2f}' for k, v in f['collective_bytes'].items() if v)
    intensity = f'{f["intensity"]:.0f}' if f['intensity'] is not None else '-'
    estimated = f'{f["estimated_s"] * 1e3:8.1f}' if 'estimated_s' in f else f'{"-":>8s}'
    lines.append(f'{scope[:44]:44s} {estimated} {f["flops"] / 1e12:8.2f} '
                 f'{f["hbm_bytes"] * hbm_scale / gib:9.2f} {f["hbm_share"]:6.1%} '
                 f'{intensity:>7s} {f["bound"]:>7s}  {coll}')
  lines.append(f'ridge point: {result["totals"]["ridge_flops_per_byte"]:.0f} FLOP/B')
  lp = result['loops']
  lines.append(f'loops: {lp["count"]} ({", ".join(f"{k}: {v}" for k, v in lp["by_kind"].items())})'
               f'; collective-matmul iterations per step: {lp["collective_matmul_iterations"]}')
  lines.append('top instructions by HBM bytes:')
  for t in result['top_instructions']:
    lines.append(f'  {t["bytes"] * hbm_scale / gib:8.2f} GiB  {t["opcode"]:12s} x{t["runs"]:<4d} '
                 f'{t["scope"][:40]:40s} {t["shape"][:70]}')
  return '\n'.join(lines)
