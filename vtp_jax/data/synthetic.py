"""`data.source='synthetic'`: random batches with the pipeline's element structure, as a real Grain
iterator (checkpointable state), for driver tests and for timing the step without a dataset.

Global batch i is `make_batch(config, seed)` (the task's synthetic batch; by default the tokenizer's
`vtp_jax.batch.synthetic_batch`) with a seed fixed by (data.seed, i);
each process takes its contiguous slice of every field, so the same global batches reach the
devices whatever the process count (a 2-process run and a 1-process run see identical data).
Elements also carry 'skipped' (all zero) and 'labels' (-1), like the pipeline's.
"""

import grain
import numpy as np

from vtp_jax import batch as batch_lib
from vtp_jax.data.decode import SKIP_REASONS


def global_batch(config, index: int, make_batch=batch_lib.synthetic_batch) -> dict:
  return make_batch(config, seed=int(config.data.seed) * 1_000_003 + int(index))


def host_slice(batch: dict, process_index: int, process_count: int) -> dict:
  """This process's rows of every field (axis 0 is the batch axis of every field)."""
  def cut(x):
    if x.shape[0] % process_count:
      raise ValueError(f'a batch field of {x.shape[0]} rows does not split over {process_count} '
                       'processes; change data.batch_size.')
    n = x.shape[0] // process_count
    return x[process_index * n:(process_index + 1) * n]

  return {branch: {k: cut(v) for k, v in fields.items()} for branch, fields in batch.items()}


def make_iterator(config, *, process_index: int = 0, process_count: int = 1,
                  start_step: int = 0, make_batch=batch_lib.synthetic_batch) -> grain.DatasetIterator:
  """A Grain iterator over host-local synthetic batches, starting at global batch `start_step`;
  `make_batch(config, seed)` makes one global batch."""
  b_local = int(config.data.batch_size) // process_count

  def element(index):
    out = host_slice(global_batch(config, index, make_batch), process_index, process_count)
    out['skipped'] = {reason: np.int64(0) for reason in SKIP_REASONS}
    out['labels'] = np.full((b_local,), -1, np.int32)
    return out

  dataset = grain.MapDataset.range(start_step, 2**62).map(element)
  # One thread, two batches ahead: the batches are cheap and tests run many processes at once.
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))
