"""The one path layer: every path a user passes (a workdir, a checkpoint, a data source, an output
folder) goes through here, so a local folder and a bucket (`gs://BUCKET/...`) read and write alike.

Paths are `etils.epath.Path` (what Orbax uses): local paths are plain files; `gs://` goes through
gcsfs (fsspec), and Orbax's array data through TensorStore's own GCS driver. What object storage
does not do as a disk does is named here once (docs/checkpoints.md, 'Workdirs in a bucket'):
- no rename: a bucket "rename" is a copy of every object and a delete, so `copy_tree` and
  `remove_tree` are the primitives, and callers order them so that a kill between the two leaves a
  state the next run reads correctly;
- no append: an object is written whole, so a growing file is rewritten (`write_whole`);
- an object write is atomic (readers see the old object or the new one), so a local file is
  written to a temporary name and renamed, and an object is written in place (`write_whole`).
"""

import glob
import os
import uuid

import fsspec
from etils import epath

# Several writers share a bucket (TensorStore's array writes, every host, tensorboardX), so a
# folder listing cached by gcsfs would go stale: every listing asks the bucket.
for _protocol in ('gs', 'gcs'):
  fsspec.config.conf.setdefault(_protocol, {}).setdefault('use_listings_cache', False)


def _fresh_filesystems_after_fork() -> None:
  """gcsfs's filesystem object is not fork-safe (its event loop and sessions belong to the
  parent): a forked child, such as a data worker, builds its own on first use."""
  from etils.epath import backend  # local: etils' cache of filesystems by protocol
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


os.register_at_fork(after_in_child=_fresh_filesystems_after_fork)

Path = epath.Path
PathLike = epath.PathLike

# Prefixes of paths that are object storage (no rename, no append, writes atomic per object).
_BUCKET_PREFIXES = ('gs://', 's3://')


def path(p: PathLike) -> epath.Path:
  """`p` as a Path; a local one made absolute (a bucket path is absolute already)."""
  out = epath.Path(p)
  return out if is_bucket(out) else out.absolute()


def is_bucket(p: PathLike) -> bool:
  return os.fspath(p).startswith(_BUCKET_PREFIXES)


def write_whole(p: PathLike, data: str | bytes) -> None:
  """Writes the file whole so that no reader (nor a kill) ever sees it half-written: in a bucket
  one object upload; on a disk a temporary file renamed over it."""
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  target = p if is_bucket(p) else p.parent / f'.{p.name}.tmp-{uuid.uuid4().hex[:8]}'
  if isinstance(data, str):
    target.write_text(data)
  else:
    target.write_bytes(data)
  if target != p:
    os.replace(target, p)  # a local rename: atomic on one filesystem


def files_under(root: PathLike) -> list[epath.Path]:
  """Every file below `root`, recursively (a bucket lists objects; folders are prefixes)."""
  root = path(root)
  # A bucket's walk yields folders without the `gs://` prefix: rebuild each from `root`.
  listed_root = split_scheme(os.fspath(root))[1]
  out = []
  for folder, _, names in root.walk():
    relative = os.path.relpath(split_scheme(os.fspath(folder))[1], listed_root)
    out += [(root if relative == '.' else root / relative) / n for n in names]
  return sorted(out)


def copy_tree(src: PathLike, dst: PathLike) -> None:
  """Copies the folder `src` to `dst` file by file (in a bucket each copy stays server-side)."""
  src, dst = path(src), path(dst)
  for f in files_under(src):
    target = dst / os.path.relpath(os.fspath(f), os.fspath(src))
    target.parent.mkdir(parents=True, exist_ok=True)
    f.copy(target, overwrite=True)


def remove_tree(p: PathLike) -> None:
  p = path(p)
  if p.exists():
    p.rmtree()


def child_names(p: PathLike) -> list[str]:
  """Names directly under the folder `p` ([] when it does not exist)."""
  p = path(p)
  return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


GLOB_CHARS = frozenset('*?[')


def split_scheme(path: str) -> tuple[str, str]:
  """'gs://b/x' -> ('gs://', 'b/x'); a local path -> ('', path)."""
  scheme, sep, rest = path.partition('://')
  return (scheme + sep, rest) if sep else ('', path)


def glob_files(pattern: str) -> list[str]:
  """Files matching one glob, sorted: local ('~' expanded; `**` recursive, hidden names only
  where the pattern names them, as glob.glob) or in a bucket (`*`, `?`, `[...]` in any folder;
  `**` refused: every folder level below would be a listing). A pattern without glob characters
  is that one file if it exists."""
  if not is_bucket(pattern):
    # A disk: glob.glob itself, since etils.epath (under vtp_jax.paths) refuses `**` even on a
    # disk, and a recursive glob over local shards is the cheap, established way to name them.
    pattern = os.path.expanduser(pattern)
    return sorted(os.fspath(path(p)) for p in glob.glob(pattern, recursive=True)
                  if os.path.isfile(p))
  scheme, rest = split_scheme(pattern)
  parts = rest.split('/')
  first = next((i for i, part in enumerate(parts) if GLOB_CHARS & set(part)), None)
  if first is None:
    return [pattern] if path(pattern).is_file() else []
  if first == 0:
    raise ValueError(f'{pattern!r}: the bucket name cannot be a glob.')
  if '**' in rest:
    raise ValueError(f'{pattern!r}: `**` is not taken in a bucket (every folder below would be '
                     'listed); write a `*` per folder level, e.g. gs://BUCKET/data/*/*.tar.')
  root = path(scheme + '/'.join(parts[:first]))
  # A bucket has no folders to mistake for files (a folder is a prefix of object names, and a
  # glob of names with the file's extension matches objects): no request per match to check it.
  return sorted(os.fspath(p) for p in root.glob('/'.join(parts[first:])))
