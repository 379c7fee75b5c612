"""Start-up checks of a training workdir, before anything compiles: it can be written, and every
process of the run sees the same one.

A pod run's workdir is a bucket (or a filesystem every host mounts): checkpoints are written
collectively, each process its own shards, so a workdir that is a local folder on each host would
leave no host with a whole checkpoint. Each check fails with one line (`WorkdirError`) saying what
to do: the bucket does not exist, there are no credentials, the account may not write, or the
processes do not see each other's files.
"""

import errno
import os
import uuid

import jax
import numpy as np

from vtp_jax import paths

PROBES = '.vtp_jax_probes'  # where each process writes its probe file; emptied after the check


class WorkdirError(ValueError):
  """A workdir the run cannot use; the message is the one line users see."""


def _bucket(workdir: paths.Path) -> paths.Path:
  scheme, rest = paths.split_scheme(os.fspath(workdir))
  return paths.path(scheme + rest.split('/', 1)[0])


def _cause(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'[:200]


def _why_unwritable(workdir: paths.Path, error: BaseException) -> str:
  """The one line for a failed probe write, by what the storage layer said."""
  name = type(error).__name__
  module = type(error).__module__
  if module.startswith('google.auth') or name in ('DefaultCredentialsError', 'RefreshError'):
    return (f'{workdir}: no credentials to reach the bucket ({_cause(error)}); run `gcloud auth '
            'application-default login`, set GOOGLE_APPLICATION_CREDENTIALS, or run on a VM '
            'whose service account may write it.')
  if 'Forbidden' in str(error) or isinstance(error, PermissionError) or getattr(
      error, 'errno', None) in (errno.EACCES, errno.EPERM, errno.EROFS):
    return (f'{workdir}: this account may not write there ({_cause(error)}); grant it write '
            'access (roles/storage.objectAdmin on the bucket) or choose another --workdir.')
  return (f'{workdir}: cannot write there ({_cause(error)}); fix the cause or choose another '
          '--workdir.')


def check(workdir, process_index: int = 0, process_count: int = 1) -> None:
  """Raises WorkdirError unless every process can write `workdir` and sees the others' files.
  With several processes this is a collective: every process calls it at start-up."""
  workdir = paths.path(workdir)
  if paths.is_bucket(workdir):
    bucket = _bucket(workdir)
    try:
      exists = bucket.exists()
    except Exception as e:  # noqa: BLE001: whatever the client raises names the cause
      raise WorkdirError(_why_unwritable(workdir, e)) from None
    if not exists:
      raise WorkdirError(f'{workdir}: the bucket {bucket} does not exist (or this account may not '
                         f'see it); create it (gcloud storage buckets create {bucket}) or fix '
                         '--workdir.')
  run = _shared_name(process_count)
  probe = workdir / PROBES / run / f'process_{process_index}'
  problem = None
  try:
    paths.write_whole(probe, str(process_index))
  except Exception as e:  # noqa: BLE001
    problem = _why_unwritable(workdir, e)
  if process_count > 1:
    problem = _agree(problem)
    if problem is None:
      seen = set(paths.child_names(workdir / PROBES / run))
      missing = [i for i in range(process_count) if f'process_{i}' not in seen]
      unseen = _gather(missing)
      if any(unseen):
        lost = sorted({i for per_process in unseen for i in per_process})
        problem = (f'{workdir} is not shared by the processes of this run: process(es) '
                   f'{[p for p, u in enumerate(unseen) if u]} do not see the files of process(es) '
                   f'{lost}; use a bucket (gs://...) or a filesystem every host mounts.')
  try:
    probe.unlink()
  except OSError:
    pass
  if problem is not None:
    raise WorkdirError(problem)


def _shared_name(process_count: int) -> str:
  """A name all processes agree on for this start-up's probes (process 0 draws it)."""
  name = uuid.uuid4().hex[:16]
  if process_count == 1:
    return name
  from jax.experimental import multihost_utils  # local: multi-process runs only
  drawn = np.frombuffer(bytes.fromhex(name), np.uint8)
  return bytes(np.asarray(multihost_utils.broadcast_one_to_all(drawn))).hex()


def _agree(problem: str | None) -> str | None:
  """Every process's probe write succeeded, else the first failure (process order) for all."""
  from jax.experimental import multihost_utils  # local: multi-process runs only
  failed = np.asarray(multihost_utils.process_allgather(np.int32(problem is not None)))
  if problem is None and failed.any():
    problem = f'process(es) {np.flatnonzero(failed).tolist()} could not write the workdir'
  return problem


def _gather(missing: list[int]) -> list[list[int]]:
  """Every process's list of probe files it did not see, by process index (a collective)."""
  from jax.experimental import multihost_utils  # local: multi-process runs only
  flags = np.zeros(jax.process_count(), np.int32)
  flags[missing] = 1
  rows = np.asarray(multihost_utils.process_allgather(flags))
  return [np.flatnonzero(row).tolist() for row in rows]
