"""Setting an unreadable step aside: `<step>` becomes `<step>.unreadable` (`.unreadable-<k>` when
taken), kept as it was, never listed as a step by Orbax nor deleted by it.

On a disk this is one rename. A bucket has no rename, so the step is copied and then deleted, in
an order that leaves a state the next run reads correctly wherever a kill falls
(docs/checkpoints.md, 'Workdirs in a bucket'). In a bucket Orbax counts a folder as a step only
while it holds `commit_success.txt` (its completion marker), and deletes any folder of the
checkpoint root without one when a run starts. So:
  1. every object of `<step>` is copied to the aside folder, the marker last: a kill here leaves
     an aside folder without a marker, which the next start deletes; `<step>` is untouched;
  2. `<step>`'s marker is deleted: from here on the step is no step, and a kill leaves a folder
     the next start deletes;
  3. the rest of `<step>` is deleted.
A re-run after a kill between 1 and 2 finds the same step unreadable again and, seeing a complete
copy of it already aside, only deletes it.
"""

import os
import signal

from vtp_jax import paths

SUFFIX = '.unreadable'  # never a step name to Orbax (steps are bare integers)
MARKER = 'commit_success.txt'  # Orbax's completion marker in a bucket (CommitFileTemporaryPath)


def _relative_sizes(folder: paths.Path) -> dict:
  return {os.path.relpath(os.fspath(f), os.fspath(folder)): f.stat().length
          for f in paths.files_under(folder)}


def aside_name(root: paths.Path, step: int) -> paths.Path:
  """The folder `<step>` goes to: `<step>.unreadable`, or the first free `-<k>`; in a bucket, an
  existing aside folder that is already a complete copy of `<step>` (a set-aside cut short after
  its copy) is reused."""
  source = root / str(step)
  candidates = [root / f'{step}{SUFFIX}'] + [root / f'{step}{SUFFIX}-{k}' for k in range(2, 1000)]
  for aside in candidates:
    if not aside.exists():
      return aside
    if paths.is_bucket(root) and (aside / MARKER).exists() and (
        _relative_sizes(aside) == _relative_sizes(source)):
      return aside
  raise RuntimeError(f'{root}: too many {step}{SUFFIX}-<k> folders; remove some')


def move(root: paths.Path, step: int, aside: paths.Path) -> None:
  """Moves `root/<step>` to `aside` (one process does it; the caller synchronises)."""
  source = root / str(step)
  if not paths.is_bucket(root):
    source.rename(aside)
    return
  if not (aside / MARKER).exists():
    files = paths.files_under(source)
    files.sort(key=lambda f: f == source / MARKER)  # the step's marker last
    for f in files:
      target = aside / os.path.relpath(os.fspath(f), os.fspath(source))
      f.copy(target, overwrite=True)
  _kill_for_tests('copied')
  if (source / MARKER).exists():
    (source / MARKER).unlink()
  _kill_for_tests('unmarked')
  paths.remove_tree(source)


def _kill_for_tests(stage: str) -> None:
  """`VTP_TEST_KILL_DURING_SET_ASIDE=copied|unmarked`: SIGKILL this process at that point of a
  bucket set-aside. Used by tests; unset in real runs."""
  if os.environ.get('VTP_TEST_KILL_DURING_SET_ASIDE') == stage:
    os.kill(os.getpid(), signal.SIGKILL)
