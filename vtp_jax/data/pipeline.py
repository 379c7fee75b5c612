"""The Grain input graph: raw source -> host-local VTP batches (the vtp_jax/batch.py contract).

    MapDataset.source(make_source(config)) -> shuffle(data.seed) -> repeat(data.num_epochs)
      -> map_with_index(decode)            # BadRecord becomes a skip marker, never an exception;
                                           # data.decode='scaled': JPEGs at reduced DCT scale
      -> [process_index::process_count]    # each JAX process reads a disjoint share
      -> to_iter_dataset(ReadOptions)      # decoding runs in data.read_threads threads
      -> ViewsBatchIterDataset             # drop + count skips, batch, pick sub-batches, views
                                           # (data.views_backend: OpenCV or Pillow pixels)
      -> mp_prefetch(data.worker_count)    # optional worker processes; -1 = auto_worker_count

Determinism: an example's views are drawn from Generator(seed, global index, view tag), where the
global index counts positions in the shuffled, repeated sequence (so it encodes epoch and
position); a batch's draws (which examples form the SSL and rec sub-batches, and the iBOT masks)
come from Generator(seed, batch tag, global index of the batch's first example), which is unique
across processes and workers. Nothing depends on thread timing, so restoring the iterator state
(the parent's read position only: batches are formed synchronously) replays the same batches.
"""

import collections
import functools
import os

from absl import flags, logging
import grain
import jax
import numpy as np

from vtp_jax import batch as batch_lib
from vtp_jax.data import decode, masking, text, views

_CLIP, _SSL, _REC, _BATCH = 0, 1, 2, 3  # view tags of the random streams


DECODE_MODES = ('scaled', 'full')
VIEWS_BACKENDS = ('opencv', 'pillow')  # data.views_backend (vtp_jax/data/views.py)
# auto_worker_count: cores left to the training process (JAX's host threads, the checkpoint and
# metric writers) and the ceiling; beyond ~128 workers start-up and per-worker batch buffers cost
# more than the cores add (each worker holds prefetch_buffer_size whole host batches).
AUTO_RESERVED_CORES_MIN, AUTO_RESERVED_CORES_MAX, AUTO_MAX_WORKERS = 2, 8, 128


class _Decode:
  """map_with_index fn: raw record -> decoded record tagged with its global index, or a marker.

  With data.decode='scaled' a JPEG is decoded at the largest DCT reduction that the example's own
  crops allow: every view's draws are replayed here from the header's size, on the generators the
  views will use, for every active branch (whether the example joins the SSL and rec sub-batches
  is only drawn once its batch is formed).
  """

  def __init__(self, config=None, seed=0):
    self._config, self._seed = config, seed
    self._branches = batch_lib.active_branches(config) if config is not None else ()

  def _reduction(self, index, source_hw):
    rngs = {'clip': _rng(self._seed, _CLIP, index), 'rec': _rng(self._seed, _REC, index),
            'ssl': _rng(self._seed, _SSL, index)}
    boxes = views.view_boxes(source_hw, self._config, self._branches, rngs)
    return views.decode_reduction(source_hw, boxes)

  def __call__(self, index, raw):
    reduction_for = functools.partial(self._reduction, index) if self._config is not None else None
    try:
      record = decode.decode_record(raw, reduction_for)
    except decode.BadRecord as e:
      return {'skip': e.reason, 'key': raw.get('key'), 'index': index}
    record['index'] = index
    return record


def _rng(seed: int, tag: int, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, tag, index])


def _build_batch(records, config, seed, b_ssl, b_rec, with_keys, mask_collate) -> dict:
  """Views, tokens and masks of one host-local batch of decoded records."""
  n = len(records)
  active = batch_lib.active_branches(config)
  batch_rng = _rng(seed, _BATCH, records[0]['index'])
  # Sub-batches are random subsets of this batch (spec 2.1), drawn independently of each other.
  ssl_rows = np.sort(batch_rng.permutation(n)[:b_ssl])
  rec_rows = np.sort(batch_rng.permutation(n)[:b_rec])
  # Arrays go to the OpenCV ops, PIL images to Pillow's (views.py): the same draws either way.
  if config.data.get('views_backend', 'opencv') == 'pillow':
    images = [views.as_pil(r['image']) for r in records]
  else:
    images = [r['image'] for r in records]
  out = {}
  if 'clip' in active:
    out['clip'] = {
        'image': np.stack([views.clip_view(im, config, _rng(seed, _CLIP, r['index']),
                                           r['source_hw']) for im, r in zip(images, records)]),
        'tokens': text.tokenize([r['caption'] for r in records],
                                context_length=config.model.text.context_length)}
  if 'ssl' in active:
    crops = [views.ssl_views(images[i], config, _rng(seed, _SSL, records[i]['index']),
                             records[i]['source_hw']) for i in ssl_rows]
    d = config.data
    out['ssl'] = {
        'global': _stack([c[0] for c in crops], (0, 2, d.global_crop_size, d.global_crop_size, 3)),
        'local': _stack([c[1] for c in crops],
                        (0, d.n_local_crops, d.local_crop_size, d.local_crop_size, 3)),
        'mask': masking.ssl_masks(config, len(ssl_rows), batch_rng, mask_collate)}
  if 'rec' in active:
    out['rec'] = {'image': _stack([views.rec_view(images[i], config,
                                                  _rng(seed, _REC, records[i]['index']),
                                                  records[i]['source_hw'])
                                   for i in rec_rows],
                                  (0, config.data.image_size, config.data.image_size, 3))}
  out['labels'] = np.asarray([r['label'] for r in records], np.int32)
  if with_keys:
    out['keys'] = [str(r['key']) for r in records]
    out['captions'] = [r['caption'] for r in records]
  return out


def _stack(arrays, empty_shape):
  return np.stack(arrays) if arrays else np.zeros(empty_shape, np.uint8)


class _ViewsBatchIterator(grain.DatasetIterator):
  """Pulls decoded records, drops and counts skip markers, and emits one batch per call."""

  def __init__(self, parent, config, seed, sizes, drop_remainder, with_keys, source_len,
               mask_collate):
    super().__init__(parent)
    self._mask_collate = mask_collate
    self._source_len = source_len
    self._config = config
    self._seed = seed
    self._b, self._b_ssl, self._b_rec = sizes
    self._drop_remainder = drop_remainder
    self._with_keys = with_keys

  def __next__(self):
    skipped = collections.Counter()
    skipped_keys = []
    records = []
    run_of_skips = 0
    while len(records) < self._b:
      try:
        record = next(self._parent)
      except StopIteration:
        # The tail (and the skips counted in it) only surfaces without drop_remainder, which
        # inspection uses to account for every record of a finite pass.
        if self._drop_remainder or not (records or skipped):
          raise
        break
      if 'skip' in record:
        run_of_skips += 1
        if run_of_skips >= 20 * self._source_len + 100:
          # A run this long spans >= 20 passes of this process's share (for each of P processes
          # and W workers) without a usable record: there is none (with even one, the chance is
          # about e^-20). Without this check an all-bad source would spin forever.
          raise ValueError(
              f'{run_of_skips} records in a row were skipped ({dict(skipped)}; last key '
              f'{record["key"]!r}); the source holds no usable image-caption pair for this '
              'process. Check data.source (python -m vtp_jax.data.inspect --list_keys).')
        skipped[record['skip']] += 1
        if self._with_keys:
          skipped_keys.append((str(record['key']), record['skip']))
        continue
      run_of_skips = 0
      records.append(record)
    if records:
      frac = len(records) / self._b
      out = _build_batch(records, self._config, self._seed,
                         min(self._b_ssl, int(round(self._b_ssl * frac))),
                         min(self._b_rec, int(round(self._b_rec * frac))), self._with_keys,
                         self._mask_collate)
    else:
      out = {'labels': np.zeros((0,), np.int32)}
      if self._with_keys:
        out['keys'], out['captions'] = [], []
    out['skipped'] = {r: np.int64(skipped[r]) for r in decode.SKIP_REASONS}
    if self._with_keys:
      out['skipped_keys'] = skipped_keys
    return out

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)

  def __str__(self):
    return f'ViewsBatchIterator(batch={self._b}, ssl={self._b_ssl}, rec={self._b_rec})'


class ViewsBatchIterDataset(grain.IterDataset):
  """Host-local batching with the three views (see the module docstring)."""

  def __init__(self, parent, config, seed, sizes, drop_remainder=True, with_keys=False,
               source_len=2**62, mask_collate=None):
    super().__init__(parent)
    self._args = (config, seed, sizes, drop_remainder, with_keys, source_len, mask_collate)

  def __iter__(self):
    return _ViewsBatchIterator(self._parent.__iter__(), *self._args)

  def __str__(self):
    return 'ViewsBatchIterDataset'


def local_sizes(config, process_count: int) -> tuple[int, int, int]:
  """Host-local (B, B_ssl, B_rec); refuses batch sizes that do not split over the processes."""
  b, b_ssl, b_rec = batch_lib.sub_batch_sizes(config)
  for name, size in (('data.batch_size', b), ('SSL sub-batch (batch_size*ssl_batch_fraction)',
                     b_ssl), ('rec sub-batch (batch_size*rec_batch_fraction)', b_rec)):
    if size % process_count:
      raise ValueError(f'{name} = {size} does not divide over {process_count} JAX processes; '
                       'each process loads an equal share, so change the batch size.')
  return b // process_count, b_ssl // process_count, b_rec // process_count


def check_config(config) -> None:
  """Clear errors for view and loader settings that would fail deep inside a worker."""
  d = config.data
  batch_lib.batch_shapes(config)  # patch-size divisibility, active branches
  for name in ('crop_ratio', 'clip_crop_scale', 'rec_crop_scale', 'global_crop_scale',
               'local_crop_scale', 'blur_sigma'):
    lo, hi = d[name]
    if not 0 < lo <= hi:
      raise ValueError(f'data.{name}={tuple(d[name])}: need 0 < low <= high.')
  if len(d.blur_probability) != 3:
    raise ValueError(f'data.blur_probability={d.blur_probability}: give 3 probabilities '
                     '(global crop 1, global crop 2, local crops).')
  if len(d.color_jitter) != 4:
    raise ValueError(f'data.color_jitter={d.color_jitter}: give (brightness, contrast, '
                     'saturation, hue).')
  if d.num_epochs < 0 or d.worker_count < -1 or d.read_threads < 0:
    raise ValueError('data.num_epochs and data.read_threads must be >= 0, data.worker_count >= -1 '
                     '(-1 = one per core but a few).')
  if d.get('decode', 'scaled') not in DECODE_MODES:
    raise ValueError(f'data.decode={d.decode!r}: use one of {DECODE_MODES}.')
  if d.get('views_backend', 'opencv') not in VIEWS_BACKENDS:
    raise ValueError(f'data.views_backend={d.views_backend!r}: use one of {VIEWS_BACKENDS}.')


def host_cores() -> int:
  """CPU cores this process may run on (its affinity mask, which containers narrow)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS has no affinity
    return os.cpu_count() or 1


def host_ram_bytes() -> int:
  try:
    return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
  except (ValueError, OSError, AttributeError):
    return 0  # unknown: no memory cap


def auto_worker_count(cores: int, worker_bytes: int = 0, ram_bytes: int = 0) -> int:
  """data.worker_count=-1: one Grain worker per core, less a few, within memory, at most 128.

  The reserve is cores/8 clamped to [2, 8] (JAX's host threads, checkpoint and metric writers).
  Each worker decodes and augments whole host batches at one core's rate (docs/scaling.md, 'The
  host keeps up'), so the input rate grows with the workers; but each also holds its batches
  (worker_bytes), and together they may take at most half of the host's RAM (ram_bytes). A
  machine with two cores or fewer gets no workers (everything in-process).
  """
  reserve = min(AUTO_RESERVED_CORES_MAX, max(AUTO_RESERVED_CORES_MIN, cores // 8))
  count = min(AUTO_MAX_WORKERS, cores - reserve)
  if worker_bytes and ram_bytes:
    count = min(count, int(0.5 * ram_bytes // worker_bytes))
  return max(0, count)


_logged_auto = set()


def resolve_worker_count(config, cores: int | None = None, process_count: int = 1,
                         ram_bytes: int | None = None) -> int:
  """data.worker_count, with -1 resolved by auto_worker_count (logged once per value); a worker's
  memory is (prefetch_buffer_size + 1) host-local batches (the one it is building)."""
  d = config.data
  if d.worker_count != -1:
    return d.worker_count
  cores = host_cores() if cores is None else cores
  ram_bytes = host_ram_bytes() if ram_bytes is None else ram_bytes
  batch_bytes = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
                    for fields in batch_lib.batch_shapes(config).values()
                    for shape, dtype in fields.values()) // process_count
  count = auto_worker_count(cores, (d.prefetch_buffer_size + 1) * batch_bytes, ram_bytes)
  if (cores, count) not in _logged_auto:
    _logged_auto.add((cores, count))
    logging.info('data.worker_count=-1 (auto): %d Grain workers for %d cores and %.0f GiB of RAM '
                 '(all cores but max(2, min(8, cores/8)), at most %d, their batches within half '
                 'the RAM); set data.worker_count to override.', count, cores, ram_bytes / 2**30,
                 AUTO_MAX_WORKERS)
  return count


def make_dataset(config, *, process_index=None, process_count=None, epoch_seed=None,
                 source=None, drop_remainder=True, with_keys=False,
                 n_devices=None) -> grain.IterDataset:
  """The Grain IterDataset behind make_iterator (see it for the arguments)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is outside [0, {process_count}).')
  check_config(config)
  sizes = local_sizes(config, process_count)
  d = config.data
  seed = int(d.seed if epoch_seed is None else epoch_seed)
  if source is None:
    from vtp_jax.data import sources  # pylint: disable=g-import-not-at-top
    source = sources.make_source(config)
  if len(source) == 0:
    raise ValueError(f'data source {d.get("source")!r} holds no records.')
  ds = grain.MapDataset.source(source).shuffle(seed=seed)
  ds = ds.repeat(d.num_epochs if d.num_epochs > 0 else None)
  scaled = d.get('decode', 'scaled') == 'scaled'
  ds = ds.map_with_index(_Decode(config, seed) if scaled else _Decode())
  ds = ds[process_index::process_count]
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=d.read_threads,
                                            prefetch_buffer_size=d.read_buffer_size))
  # iBOT masks are collated per device (vtp_jax/batch.py, ibot_buffer_size), resolved here in the
  # main process: workers never start JAX.
  n_devices = jax.device_count() if n_devices is None else n_devices
  mask_collate = batch_lib.mask_collate_samples(config, n_devices, sizes[1])
  ds = ViewsBatchIterDataset(ds, config, seed, sizes, drop_remainder, with_keys, len(source),
                             mask_collate)
  workers = resolve_worker_count(config, process_count=process_count)
  if workers > 0:
    # Grain reads absl flags when it starts workers; outside an absl app (tests, notebooks) they
    # are unparsed and reading them raises, so take the defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=d.prefetch_buffer_size))
  return ds


def make_iterator(config, *, process_index=None, process_count=None, epoch_seed=None,
                  source=None, drop_remainder=True, with_keys=False,
                  n_devices=None) -> grain.DatasetIterator:
  """A checkpointable iterator of host-local batches (INTERFACES.md).

  Args:
    config: the run config; reads config.data and the active loss branches.
    process_index, process_count: this process's share; default jax.process_index()/count().
    epoch_seed: overrides config.data.seed (data order and augmentation).
    source: a grain RandomAccessDataSource of raw records; default make_source(config).
    drop_remainder: False emits a final, smaller batch (for one-pass inspection only); it may
      hold no records at all, only the skips met after the last full batch.
    with_keys: add 'keys' and 'captions' of the batch's records and 'skipped_keys' ((key, reason)
      pairs), for inspection; vtp_jax.data.device.to_global drops them.
    n_devices: devices of the run, for the per-device iBOT mask collation; default
      jax.device_count().
  """
  return iter(make_dataset(config, process_index=process_index, process_count=process_count,
                           epoch_seed=epoch_seed, source=source, drop_remainder=drop_remainder,
                           with_keys=with_keys, n_devices=n_devices))
