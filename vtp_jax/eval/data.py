"""Evaluation images: a dataset spec -> deterministic, preprocessed uint8 batches with labels, and
the class names that go with them.

Specs are the `config.data.source` strings of vtp_jax/data/sources.py (`shapes[:SPLIT]`,
`tfds:NAME[:SPLIT]`, `arrayrecord:GLOB`, `tar:GLOB`, `folder:PATH`); records come from its
`make_source` and are decoded by vtp_jax/data/decode.py, both imported lazily so the evaluators and
their tests run on in-memory arrays without any data module.

Which examples: with `max_examples` = n < len(source), the n evenly spaced records
`floor(i * len / n)`, so a class-sorted source is still sampled across classes and every process and
every run sees the same ones. Preprocessing (PIL, on the host):
  * 'center_crop': ADM `center_crop_arr(image_size)` as VTP's reconstruction and latent extraction
    (spec 4.1): BOX-halve while the short side >= 2 * size, BICUBIC short side to size, centre crop.
    The linear probe uses it too: DINOv2's Resize(256) + CenterCrop(224) is this with a 224/256
    crop, which we do not apply because the tokenizer is trained at image_size.
  * 'squash': Resize((size, size)) BILINEAR, aspect not kept, no crop: VTP's zero-shot (spec 4.1).
Bad records are skipped and counted (a dict passed as `skipped`), never fatal.
"""

import collections
import copy
import re
from typing import Iterator

from absl import logging
import numpy as np
from PIL import Image

PREPROCESS = ('center_crop', 'squash')


def _tfds_name_and_split(dataset_spec: str) -> tuple[str, str | None]:
  """'tfds:NAME[:VERSION][:SPLIT]' -> (NAME[:VERSION], SPLIT or None)."""
  parts = dataset_spec.split(':')[1:]
  if not parts or not parts[0]:
    raise ValueError(f'dataset {dataset_spec!r} names no TFDS dataset: write tfds:NAME[:SPLIT].')
  name, rest = parts[0], parts[1:]
  if rest and re.fullmatch(r'\d+(\.\d+)*', rest[0]):  # a version, as in 'mnist:3.0.1'
    name += ':' + rest.pop(0)
  return name, ':'.join(rest) or None


def with_split(dataset_spec: str, split: str | None) -> str:
  """`dataset_spec` with its split set to `split` (only `shapes` and `tfds:` specs have splits)."""
  if not split:
    return dataset_spec
  kind = dataset_spec.split(':')[0]
  if kind == 'shapes':
    return f'shapes:{split}'
  if kind == 'tfds':
    return f'tfds:{_tfds_name_and_split(dataset_spec)[0]}:{split}'
  raise ValueError(f'dataset {dataset_spec!r} has no splits (only shapes and tfds: do); pass the '
                   f'spec of the files you mean instead of split={split!r}.')


def center_crop_arr(image: np.ndarray, image_size: int) -> np.ndarray:
  """ADM's `center_crop_arr` (guided-diffusion image_datasets.py) on a uint8 (H, W, 3) array."""
  pil = Image.fromarray(image)
  while min(*pil.size) >= 2 * image_size:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
  scale = image_size / min(*pil.size)
  pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
  arr = np.asarray(pil)
  top = (arr.shape[0] - image_size) // 2
  left = (arr.shape[1] - image_size) // 2
  return arr[top:top + image_size, left:left + image_size]


def squash_resize(image: np.ndarray, image_size: int) -> np.ndarray:
  """torchvision Resize((size, size)) on a PIL image: PIL BILINEAR, aspect ratio not kept."""
  if image.shape[:2] == (image_size, image_size):
    return image
  return np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.BILINEAR))


def preprocess(image: np.ndarray, image_size: int, mode: str) -> np.ndarray:
  if mode == 'center_crop':
    return center_crop_arr(image, image_size)
  if mode == 'squash':
    return squash_resize(image, image_size)
  raise ValueError(f'preprocess={mode!r} is not one of {PREPROCESS}.')


def example_indices(num_records: int, max_examples: int | None) -> np.ndarray:
  """Evenly spaced record indices: all of them when max_examples is None/0 or >= num_records."""
  if not max_examples or max_examples >= num_records:
    return np.arange(num_records, dtype=np.int64)
  return (np.arange(max_examples, dtype=np.int64) * num_records) // max_examples


def open_source(config, dataset_spec: str, split: str | None = None):
  """The raw-record source of `dataset_spec` (split applied), via vtp_jax.data.sources."""
  from vtp_jax.data import sources  # local: the evaluators must not need the data stack to import
  config = copy.deepcopy(config)
  with config.unlocked():
    config.data.source = with_split(dataset_spec, split)
    # Captions are not needed here, and classification datasets (ImageNet...) have none.
    config.data.caption_key = ''
  return sources.make_source(config)


def decode_image_and_label(raw: dict) -> tuple[np.ndarray, int]:
  """(uint8 RGB image, label) of a raw record; raises decode.BadRecord.

  Classification datasets have no captions, and decode_record rejects caption-less records (the
  training pipeline needs them); evaluation does not, so a placeholder caption stands in.
  """
  from vtp_jax.data import decode
  record = decode.decode_record({**raw, 'caption': raw.get('caption') or '-'})
  return record['image'], record['label']


def iter_batches(source, indices, image_size: int, mode: str = 'center_crop',
                 batch_size: int = 64, skipped: dict | None = None) -> Iterator[tuple]:
  """(images uint8 (b, S, S, 3), labels int32 (b,), record indices int64 (b,)) over `indices`.

  The last batch may be short. Records that fail to decode are skipped and counted in `skipped`.
  """
  from vtp_jax.data import decode
  skipped = collections.Counter() if skipped is None else skipped
  images, labels, kept = [], [], []
  for index in indices:
    try:
      image, label = decode_image_and_label(source[int(index)])
    except decode.BadRecord as e:
      skipped[e.reason] = skipped.get(e.reason, 0) + 1
      continue
    images.append(preprocess(image, image_size, mode))
    labels.append(label)
    kept.append(index)
    if len(images) == batch_size:
      yield np.stack(images), np.asarray(labels, np.int32), np.asarray(kept, np.int64)
      images, labels, kept = [], [], []
  if images:
    yield np.stack(images), np.asarray(labels, np.int32), np.asarray(kept, np.int64)
  if sum(skipped.values()):
    logging.warning('skipped undecodable records: %s', dict(skipped))


def eval_images(config, dataset_spec: str, split: str | None = None,
                max_examples: int | None = None, *, mode: str = 'center_crop',
                batch_size: int | None = None, skipped: dict | None = None
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(images uint8 NHWC at config.data.image_size, labels int32) batches of a dataset spec."""
  source = open_source(config, dataset_spec, split)
  indices = example_indices(len(source), max_examples)
  batch_size = batch_size or config.evals.batch_size
  for images, labels, _ in iter_batches(source, indices, config.data.image_size, mode,
                                        batch_size, skipped):
    yield images, labels


def class_names(config, dataset_spec: str) -> list[str]:
  """Readable class names indexed by label: evals.class_names file, shapes, or TFDS label names."""
  if config.evals.class_names:  # a file of names, local or in a bucket
    from vtp_jax import paths
    text = paths.path(config.evals.class_names).read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]
  kind = dataset_spec.split(':')[0]
  if kind == 'shapes':
    from vtp_jax.data import shapes
    return list(shapes.class_names())
  if kind == 'tfds':
    import tensorflow_datasets as tfds
    name = _tfds_name_and_split(dataset_spec)[0]
    builder = tfds.builder(name, data_dir=config.data.get('data_dir') or None)
    key = config.data.get('label_key') or 'label'
    feature = builder.info.features[key]
    names = list(getattr(feature, 'names', None) or [])
    if not names:
      raise ValueError(f'{name}: feature {key!r} has no class names; give a file of names with '
                       '--config.evals.class_names=FILE.')
    return readable_names(names)
  raise ValueError(f'{dataset_spec!r} has no class names of its own; give a file of names (one a '
                   'line, in label order) with --config.evals.class_names=FILE.')


def label_factors(dataset_spec: str) -> dict:
  """The class label's factors, name -> (values, labels -> factor labels): vtp_shapes' colour and
  shape; empty for other datasets (their labels have no known factors)."""
  if dataset_spec.split(':')[0] == 'shapes':
    from vtp_jax.data import shapes
    return shapes.label_factors()
  return {}


def readable_names(names: list[str]) -> list[str]:
  """TFDS label names -> prompt-ready names: ImageNet's 1000 WordNet ids -> OpenCLIP's names."""
  if len(names) == 1000 and all(n[:1] == 'n' and n[1:].isdigit() for n in names):
    from vtp_jax.eval.imagenet_classes import IMAGENET_CLASSNAMES
    return list(IMAGENET_CLASSNAMES)
  return [n.replace('_', ' ') for n in names]
