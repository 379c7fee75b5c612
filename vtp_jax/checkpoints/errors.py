"""What goes wrong reading a checkpoint, said in one line: `CheckpointUnreadable` (the folder, the
part, a short cause, what to do) instead of Orbax's TensorStore spec, `reading` that turns any
storage error into it, and `report_unreadable` that turns it into `error: ...` and exit status 2
in a command line. A failed read's leftovers (the other arrays' unretrieved errors) stay off the
console.
"""

import contextlib
import logging
import re
import sys

from vtp_jax import paths


class CheckpointUnreadable(ValueError):
  """A checkpoint folder whose files cannot be read or do not match their digests."""

  def __init__(self, folder, part: str, cause: str, advice: str = ''):
    self.folder, self.part, self.cause = paths.path(folder), part, cause
    super().__init__(f'{folder}: {part} cannot be read ({cause}); '
                     f'{advice or _advice(self.folder)}.')


class MissingItem(FileNotFoundError):
  """The checkpoint is readable but holds no such item or field (not damage)."""


def _advice(folder: paths.Path) -> str:
  step_dir = next((p for p in (folder, *folder.parents) if p.name.isdigit()), None)
  if step_dir is not None:
    others = sorted(int(d.name) for d in step_dir.parent.iterdir()
                    if d.name.isdigit() and d != step_dir)
    if others:
      return (f'restore it from a copy, or read another step: '
              f'{", ".join(str(step_dir.parent / str(s)) for s in others[::-1][:3])}')
  return 'restore it from a copy (or re-create it)'


_TENSORSTORE_READ_ERROR = re.compile(r'Error (?:reading|writing) "([^"]+)" in OCDBT database at '
                                     r'[^"]*"[^"]*": (.*)')


def short_cause(error: BaseException, limit: int = 200) -> str:
  """The innermost error of a chain as 'Class: first line', TensorStore's wording shortened to the
  array and the reason, at most `limit` characters."""
  seen = {id(error)}
  while True:
    inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    if inner is None or id(inner) in seen:
      break
    seen.add(id(inner))
    error = inner
  lines = str(error).strip().splitlines()
  text = lines[0] if lines else ''
  m = _TENSORSTORE_READ_ERROR.search(text)
  if m:  # the array (and chunk) and the innermost reason, without the data files' paths
    reason = m.group(2).rsplit('": ', 1)[-1]  # after the last quoted path
    text = f'{m.group(1)}: {reason}'
  return f'{type(error).__name__}: {text}'[:limit]


class _DropFailedReadNoise(logging.Filter):
  def filter(self, record) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (exc is not None and _is_read_noise(exc))


def _is_read_noise(exc) -> bool:
  """What a failed Orbax read leaves behind once its error was raised: the other array reads'
  errors (never retrieved; wrapped by Orbax, or TensorStore's own when they fail before Orbax
  wraps them, which a loaded host makes likely) and TensorStore callbacks into the closed event
  loop."""
  text = str(exc)
  return (text.startswith('Encountered error while reading array index')
          or _TENSORSTORE_READ_ERROR.search(text) is not None
          or (isinstance(exc, RuntimeError) and text == 'Event loop is closed'))


_noise_filter_installed = False


def _quiet_failed_read_noise() -> None:
  """Keeps the leftovers of a failed read (one traceback per array of the damaged file, printed
  after the error was raised) off the console: the one-line error says it all."""
  global _noise_filter_installed
  if _noise_filter_installed:
    return
  _noise_filter_installed = True
  logging.getLogger('asyncio').addFilter(_DropFailedReadNoise())
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_read_noise(unraisable.exc_value):
      previous(unraisable)

  sys.unraisablehook = hook


@contextlib.contextmanager
def reading(folder, part: str):
  """Any error while reading `part` of `folder` becomes CheckpointUnreadable with a short cause."""
  _quiet_failed_read_noise()
  try:
    yield
  except (CheckpointUnreadable, MissingItem):
    raise
  except Exception as e:  # noqa: BLE001: whatever the storage layer raises is a damaged folder
    raise CheckpointUnreadable(folder, part, short_cause(e)) from e


@contextlib.contextmanager
def report_unreadable():
  """For command lines: a damaged checkpoint ends the program with its one line, exit status 2."""
  try:
    yield
  except CheckpointUnreadable as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
