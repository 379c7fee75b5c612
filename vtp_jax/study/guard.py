"""Runs one stage command so that it dies with the study: `python guard.py STUDY_PID ARGV...` asks
the kernel for SIGTERM when its parent (the study) exits (Linux `PR_SET_PDEATHSIG`), then execs
ARGV in its own place, which keeps that request.

A separate process rather than subprocess's `preexec_fn`, which is unsafe in a threaded program
(the study runs cells from a thread pool). Run as a script, so nothing of the package is imported.
"""

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def main() -> None:
  parent, argv = int(sys.argv[1]), sys.argv[2:]
  try:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
  except (OSError, AttributeError):  # not Linux: the command may outlive a killed study
    pass
  if os.getppid() != parent:  # the study died before the request took effect: do not start
    sys.exit(128 + signal.SIGTERM)
  os.execv(argv[0], argv)


if __name__ == '__main__':
  main()
