"""Everything that stores a run: where a workdir's checkpoints are and how they read back.

  saved.py       reading and writing parameter folders and training steps (Orbax), the layout
  errors.py      a damaged checkpoint said in one line (CheckpointUnreadable, exit status 2)
  digest.py      SHA-256 digests written with each step and checked on every read
  manager.py     the training loop's async saves and its resume (newest step that reads)
  set_aside.py   an unreadable step moved aside, on a disk or in a bucket
  init_from.py   a new run started from another checkpoint's parameters
  preemption.py  when a run must save and stop (SIGTERM, the preemption sync)
  workdir.py     start-up checks of the workdir (exists, writable, shared by every process)

The reading API most callers need is handed on here; the driver imports the modules it uses.
"""

from vtp_jax.checkpoints.errors import CheckpointUnreadable, MissingItem, report_unreadable
from vtp_jax.checkpoints.saved import (CONFIG_FILE, checkpoint_root, has_item, is_step_dir,
                                       item_metadata, latest_step_dir, load_config, load_item,
                                       resolve, restore_subtree, save_params)
