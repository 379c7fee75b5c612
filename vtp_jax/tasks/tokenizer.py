"""Stage 1: the VTP tokenizer trained with CLIP, DINO/iBOT + KoLeo and reconstruction at once.

The code is `train/state.py`, `train/step.py`, `train/flops.py` and the tokenizer's batch contract
`vtp_jax/batch.py`; this file binds it to the driver's services: data (the Grain pipeline or
synthetic batches), `config.evals` on saved steps and the reconstruction grid.
"""

from vtp_jax import batch as batch_lib
from vtp_jax import paths
from vtp_jax.tasks import base
from vtp_jax.train import flops as flops_lib
from vtp_jax.train import state as state_lib
from vtp_jax.train import step as step_lib


def check_data_source(config) -> None:
  """data.source names something that exists, local or in a bucket (TFDS reports what is missing
  itself)."""
  source = str(config.data.get('source', ''))
  if not source:
    raise ValueError('data.source is empty; set it (e.g. shapes, tfds:NAME, tar:GLOB, '
                     'arrayrecord:GLOB, folder:PATH or synthetic).')
  kind, _, rest = source.partition(':')
  if kind in ('tar', 'arrayrecord', 'folder') and not rest:
    raise ValueError(f'data.source={source!r} names no path; write {kind}:PATH.')
  if kind not in ('tar', 'arrayrecord', 'folder'):
    return
  if '://' in rest and not paths.is_bucket(rest):
    return  # another store (http://...): its reader reports what is missing
  if kind == 'folder':
    folder = paths.path(rest)
    if not folder.is_dir():
      raise ValueError(f'data.source={source!r}: folder {rest} does not exist.')
    if not any(files for _, _, files in folder.walk()):  # stops at the first file
      raise ValueError(f'data.source={source!r}: folder {rest} holds no files.')
    return
  from vtp_jax.data import sources  # local: the data package is imported on use
  try:
    sources.expand_paths(rest, folder_ext='tar' if kind == 'tar' else 'array_record')
  except FileNotFoundError:
    raise ValueError(f'data.source={source!r}: no file matches {rest!r}; check the path/glob.'
                     ) from None
  except ValueError as e:  # a glob a bucket does not take (`**`)
    raise ValueError(f'data.source={source!r}: {e}') from None


class TokenizerTask(base.Task):
  name = 'tokenizer'
  checkpoint_holds = ('TrainState (step, params, opt_state, teacher, loss_state with the DINO and '
                      'iBOT centres, rng), the data-iterator state per process, the config')

  def validate(self, config, process_count: int) -> None:
    active = batch_lib.active_branches(config)
    for branch, name, size in zip(('clip', 'ssl', 'rec'),
                                  ('data.batch_size', 'SSL sub-batch', 'rec sub-batch'),
                                  batch_lib.sub_batch_sizes(config)):
      if branch in active and size % process_count:
        raise ValueError(f'{name} = {size} does not split over {process_count} processes.')
    check_data_source(config)

  def create_state(self, config, mesh, rng_seed=None, *, abstract=False):
    return state_lib.create(config, mesh, rng_seed, abstract=abstract)

  def make_train_step(self, config, mesh, state_shardings, tx):
    return step_lib.make_train_step(config, mesh, state_shardings, tx)

  def frozen_inputs(self, config) -> dict:
    return step_lib.frozen_inputs(config)

  def frozen_inputs_abstract(self, config) -> dict:
    return step_lib.frozen_inputs_abstract(config)

  def step_flops(self, config, mesh=None) -> dict:
    return flops_lib.step_flops(config, mesh)

  def batch_shapes(self, config) -> dict:
    return batch_lib.batch_shapes(config)

  def batch_sizes(self, config) -> dict:
    """{'clip', 'ssl', 'rec'}: each sub-batch, 0 where its loss is off."""
    sizes = dict(zip(('clip', 'ssl', 'rec'), batch_lib.sub_batch_sizes(config)))
    active = batch_lib.active_branches(config)
    return {k: v if k in active else 0 for k, v in sizes.items()}

  def check_divisible(self, config, mesh) -> None:
    batch_lib.check_divisible(config, mesh)

  def synthetic_batch(self, config, seed=0, n_devices=None) -> dict:
    return batch_lib.synthetic_batch(config, seed, n_devices)

  def uses_synthetic_data(self, config) -> bool:
    return config.data.get('source', '') == 'synthetic'

  def source_iterator(self, config, process_index, process_count, epoch_seed):
    """The Grain pipeline (vtp_jax/data/pipeline.py)."""
    from vtp_jax.data import pipeline  # local: heavy (TFDS, Grain workers); imported on use
    return pipeline.make_iterator(config, process_index=process_index,
                                  process_count=process_count, epoch_seed=epoch_seed)

  def supports_evaluations(self) -> bool:
    return True

  def evaluate(self, config, step_dir, step):
    """`config.evals` on the tokenizer saved at `step_dir` (vtp_jax/eval)."""
    from vtp_jax import eval as eval_lib  # local: evals pull in datasets and extra weights
    from vtp_jax import inference
    return eval_lib.run_evals(inference.Tokenizer.load(step_dir), config)

  def image_log(self, config, mesh):
    from vtp_jax.train import metrics as metrics_lib  # local: clu, only where images are logged
    return metrics_lib.ReconstructionLog(config, mesh)

  def summary(self, config) -> dict:
    b, b_ssl, b_rec = batch_lib.sub_batch_sizes(config)
    return {'encoder': config.model.encoder.width, 'depth': config.model.encoder.depth,
            'batch': b, 'ssl_batch': b_ssl, 'rec_batch': b_rec,
            'image_size': config.data.image_size}
