"""`bench.aot --plan`: the search over mesh, remat policy and block stacking for one config and
target. Every candidate is compiled by `bench.aot` itself in a child process (an XLA compile holds
gigabytes of host memory and a failure must not end the search), several at once where the host's
memory allows, and the ranked table ends with the command line of the best plan.

Candidates by default: tensor in {1, 2, 4} (where it divides the heads and the devices); for each,
pure FSDP (data=1) and FSDP within groups of 8 chips with data parallelism across them; every
remat policy in --plan_remat; scanned and unrolled blocks (--plan_scan). A candidate that cannot
split its batch over the mesh's batch axes is skipped before compiling.
"""

import concurrent.futures
import json
import math
import os
import shlex
import subprocess
import sys

_PASSTHROUGH = ('--config', '--topology', '--slices', '--hbm_fraction')


def default_meshes(config, n_devices: int) -> list[tuple[int, int, int]]:
  """(data, fsdp, tensor) candidates for `n_devices`."""
  heads = math.gcd(config.model.encoder.heads, config.model.decoder.heads)
  out = []
  for tensor in (1, 2, 4):
    if n_devices % tensor or heads % tensor:
      continue
    rest = n_devices // tensor
    for fsdp in sorted({rest, min(rest, 8)}, reverse=True):
      out.append((rest // fsdp, fsdp, tensor))
  return out


def parse_meshes(text: str) -> list[tuple[int, int, int]]:
  meshes = []
  for part in filter(None, (p.strip() for p in text.split(';'))):
    sizes = tuple(int(x) for x in part.split(','))
    if len(sizes) != 3:
      raise ValueError(f"--plan_meshes entry {part!r}: use 'data,fsdp,tensor'.")
    meshes.append(sizes)
  return meshes


def _batch_divides(config, mesh) -> bool:
  from vtp_jax import tasks
  from vtp_jax import batch as batch_lib
  n = mesh[0] * mesh[1] * batch_lib.accum_steps(config)
  return all(size % n == 0 for size in tasks.for_config(config).batch_sizes(config).values() if size)


def _base_args(argv) -> list[str]:
  """The caller's flags that describe the config and target (its overrides included)."""
  keep = []
  for arg in argv[1:]:
    name = arg.split('=', 1)[0]
    if name.startswith('--config.') or name in _PASSTHROUGH:
      keep.append(arg)
  return keep


def _candidate_args(mesh, remat, scan) -> list[str]:
  data, fsdp, tensor = mesh
  return [f'--config.mesh.data={data}', f'--config.mesh.fsdp={fsdp}',
          f'--config.mesh.tensor={tensor}', f'--config.precision.remat_policy={remat}',
          f'--config.precision.scan_layers={scan}']


def _compile(args) -> dict:
  proc = subprocess.run([sys.executable, '-m', 'vtp_jax.bench.aot', *args], capture_output=True,
                        text=True, env=os.environ.copy())
  start = proc.stdout.find('{')
  if proc.returncode == 0 and start >= 0:
    return json.loads(proc.stdout[start:])
  tail = (proc.stderr or proc.stdout).strip().splitlines()
  errors = [line for line in tail if 'Error' in line or 'error' in line]
  return {'error': (errors or tail or ['exit status %d' % proc.returncode])[-1][:300]}


def _workers(requested: int) -> int:
  if requested > 0:
    return requested
  try:
    pages = os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
  except (ValueError, OSError):
    return 1
  return max(1, min(os.cpu_count() or 1, int(pages // (12 * 1024 ** 3))))


def rank_key(row: dict):
  """Fitting plans first, then by the bound step time, then by peak memory."""
  report = row.get('report') or {}
  if 'error' in report or not report:
    return (2, math.inf, math.inf)
  return (0 if report['fits'] else 1, report['bound_step_s'],
          report['memory_per_device_gib']['peak'])


def table(rows: list[dict]) -> str:
  lines = ['| mesh (d,f,t) | remat | scan | fits | peak GiB | bound s | MFU ceiling | compile s |',
           '|---|---|---|---|---|---|---|---|']
  for row in rows:
    r = row.get('report') or {}
    mesh = ','.join(str(x) for x in row['mesh'])
    if 'error' in r:
      lines.append(f"| {mesh} | {row['remat']} | {row['scan']} | error: {r['error']} |||||")
      continue
    ceiling = f"{r['mfu_ceiling']:.3f}" if r.get('mfu_ceiling') is not None else '-'
    lines.append(f"| {mesh} | {row['remat']} | {row['scan']} | {r['fits']} | "
                 f"{r['memory_per_device_gib']['peak']:.1f} | {r['bound_step_s']:.3f} | "
                 f"{ceiling} | {r['compile_s']} |")
  return '\n'.join(lines)


def run(config, target, argv, flags) -> None:
  meshes = (parse_meshes(flags.plan_meshes) if flags.plan_meshes else
            default_meshes(config, target.chips))
  remats = [r.strip() for r in flags.plan_remat.split(',') if r.strip()]
  scans = [s.strip().lower() == 'true' for s in flags.plan_scan.split(',') if s.strip()]
  base = _base_args(argv)
  rows = []
  for mesh in meshes:
    if math.prod(mesh) != target.chips:
      print(f'skipped mesh {mesh}: needs {math.prod(mesh)} devices, the target has '
            f'{target.chips}', file=sys.stderr)
      continue
    if not _batch_divides(config, mesh):
      print(f'skipped mesh {mesh}: a sub-batch does not divide over data x fsdp',
            file=sys.stderr)
      continue
    rows.extend({'mesh': mesh, 'remat': r, 'scan': s} for r in remats for s in scans)
  with concurrent.futures.ThreadPoolExecutor(_workers(flags.plan_workers)) as pool:
    futures = {pool.submit(_compile, base + _candidate_args(row['mesh'], row['remat'],
                                                            row['scan'])): row for row in rows}
    for future in concurrent.futures.as_completed(futures):
      futures[future]['report'] = future.result()
      row = futures[future]
      print(f"compiled {row['mesh']} remat={row['remat']} scan={row['scan']}", file=sys.stderr)
  rows.sort(key=rank_key)
  print(table(rows))
  best = next((row for row in rows if rank_key(row)[0] == 0), None)
  if best is None:
    print('\nNo candidate fits: raise the slice, lower data.batch_size, or try remat=full.')
  if flags.plan_reports:
    from vtp_jax import paths  # local: only when asked for
    paths.write_whole(flags.plan_reports, json.dumps(rows, indent=1))
  if best is None:
    return
  command = ['python', '-m', 'vtp_jax.bench.aot'] + base + _candidate_args(
      best['mesh'], best['remat'], best['scan'])
  print('\nbest plan:\n' + ' '.join(shlex.quote(a) for a in command))
