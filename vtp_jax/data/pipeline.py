"""The Grain input graph: raw source -> host-local VTP batches (the vtp_jax/batch.py contract).

    MapDataset.source(make_source(config)) -> shuffle(data.seed) -> repeat(data.num_epochs)
      -> map_with_index(decode)            # BadRecord becomes a skip marker, never an exception
      -> [process_index::process_count]    # each JAX process reads a disjoint share
      -> to_iter_dataset(ReadOptions)      # decoding runs in data.read_threads threads
      -> ViewsBatchIterDataset             # drop + count skips, batch, pick sub-batches, views
      -> mp_prefetch(data.worker_count)    # optional worker processes

Determinism: an example's views are drawn from Generator(seed, global index, view tag), where the
global index counts positions in the shuffled, repeated sequence (so it encodes epoch and
position); a batch's draws (which examples form the SSL and rec sub-batches, and the iBOT masks)
come from Generator(seed, batch tag, global index of the batch's first example), which is unique
across processes and workers. Nothing depends on thread timing, so restoring the iterator state
(the parent's read position only: batches are formed synchronously) replays the same batches.
"""

import collections

from absl import flags
import grain
import jax
import numpy as np

from vtp_jax import batch as batch_lib
from vtp_jax.data import decode, masking, text, views

_CLIP, _SSL, _REC, _BATCH = 0, 1, 2, 3  # view tags of the random streams


class _Decode:
  """map_with_index fn: raw record -> decoded record tagged with its global index, or a marker."""

  def __call__(self, index, raw):
    try:
      record = decode.decode_record(raw)
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
  images = [views.as_pil(r['image']) for r in records]
  out = {}
  if 'clip' in active:
    out['clip'] = {
        'image': np.stack([views.clip_view(im, config, _rng(seed, _CLIP, r['index']))
                           for im, r in zip(images, records)]),
        'tokens': text.tokenize([r['caption'] for r in records],
                                context_length=config.model.text.context_length)}
  if 'ssl' in active:
    crops = [views.ssl_views(images[i], config, _rng(seed, _SSL, records[i]['index']))
             for i in ssl_rows]
    d = config.data
    out['ssl'] = {
        'global': _stack([c[0] for c in crops], (0, 2, d.global_crop_size, d.global_crop_size, 3)),
        'local': _stack([c[1] for c in crops],
                        (0, d.n_local_crops, d.local_crop_size, d.local_crop_size, 3)),
        'mask': masking.ssl_masks(config, len(ssl_rows), batch_rng, mask_collate)}
  if 'rec' in active:
    out['rec'] = {'image': _stack([views.rec_view(images[i], config,
                                                  _rng(seed, _REC, records[i]['index']))
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
  if d.num_epochs < 0 or d.worker_count < 0 or d.read_threads < 0:
    raise ValueError('data.num_epochs, data.worker_count and data.read_threads must be >= 0.')


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
  ds = ds.map_with_index(_Decode())
  ds = ds[process_index::process_count]
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=d.read_threads,
                                            prefetch_buffer_size=d.read_buffer_size))
  # iBOT masks are collated per device (vtp_jax/batch.py, ibot_buffer_size), resolved here in the
  # main process: workers never start JAX.
  n_devices = jax.device_count() if n_devices is None else n_devices
  mask_collate = batch_lib.mask_collate_samples(config, n_devices, sizes[1])
  ds = ViewsBatchIterDataset(ds, config, seed, sizes, drop_remainder, with_keys, len(source),
                             mask_collate)
  if d.worker_count > 0:
    # Grain reads absl flags when it starts workers; outside an absl app (tests, notebooks) they
    # are unparsed and reading them raises, so take the defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=d.worker_count, per_worker_buffer_size=d.prefetch_buffer_size))
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
