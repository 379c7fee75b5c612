"""Zero-shot classification: template averaging against NumPy, top-k on a hand-built case, the
template sets, and the run on a micro random-init tokenizer against the Tokenizer's own methods."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import micro_config
from vtp_jax.data import shapes
from vtp_jax.eval import data as eval_data
from vtp_jax.eval import templates
from vtp_jax.eval import zero_shot
from vtp_jax.inference import Tokenizer
from vtp_jax.models import vtp


def test_openai_templates_are_the_80_of_openclip():
  t = templates.OPENAI_IMAGENET_TEMPLATES
  assert len(t) == 80 and len(set(t)) == 80 and all(s.count('{}') == 1 for s in t)
  assert t[0] == 'a bad photo of a {}.' and t[-1] == 'a tattoo of the {}.'  # spec 4.1's ends
  assert templates.templates_for('auto', 'shapes:validation') == templates.SHAPES_TEMPLATES
  assert templates.templates_for('auto', 'tfds:imagenet2012:validation') == t
  with pytest.raises(ValueError, match='evals.templates'):
    templates.templates_for('fancy', 'shapes')


def test_class_embeddings_average_normalised_prompts_then_renormalise():
  rng = np.random.default_rng(0)
  names, tmpl = ['cat', 'dog'], ['a {}.', 'the {}!', 'one {}']
  table = {t.format(n): rng.standard_normal(5) * rng.uniform(0.5, 3) for n in names for t in tmpl}
  got = zero_shot.class_embeddings(lambda prompts: np.stack([table[p] for p in prompts]),
                                   names, tmpl)
  for row, name in enumerate(names):
    vecs = [table[t.format(name)] for t in tmpl]
    mean = np.mean([v / np.linalg.norm(v) for v in vecs], axis=0)
    np.testing.assert_allclose(got[row], mean / np.linalg.norm(mean), rtol=1e-5)


def test_topk_on_a_hand_built_case():
  classifier = np.eye(6, dtype=np.float32)
  feats = np.zeros((4, 6), np.float32)
  feats[0, 0] = 1                           # label 0: right at top-1
  feats[1, 1], feats[1, 2] = 0.9, 0.1       # label 2: second -> top-5 only
  feats[2, 5] = 1                           # label 4: tied last behind 0..3 -> missed by top-5
  feats[3] = [0, 0, 0, 0.2, 1, 0]           # label -1: unlabelled, ignored
  got = zero_shot.evaluate(feats, np.array([0, 2, 4, -1]), classifier)
  assert got['top1'] == pytest.approx(1 / 3) and got['top5'] == pytest.approx(2 / 3)
  assert got['examples'] == 3
  with pytest.raises(ValueError, match='class names'):
    zero_shot.evaluate(feats, np.array([0, 2, 9, -1]), classifier)


def test_shapes_factor_accuracy_scores_colour_and_shape_of_the_top1_class():
  names = shapes.class_names()
  classifier = np.eye(len(names), dtype=np.float32)
  cases = [('orange square', 'orange triangle'),  # colour right, shape wrong
           ('red circle', 'orange circle'),       # shape right, colour wrong
           ('blue star', 'blue star'),            # both right
           ('pink heart', 'green cross'),         # neither
           ('yellow cross', 'yellow heart')]      # colour right, shape wrong
  labels = np.array([names.index(truth) for truth, _ in cases] + [-1])
  feats = np.zeros((len(labels), len(names)), np.float32)
  for row, (_, predicted) in enumerate(cases):
    feats[row, names.index(predicted)] = 1.0
  feats[-1, 0] = 1.0  # unlabelled: ignored
  got = zero_shot.evaluate(feats, labels, classifier, eval_data.label_factors('shapes'))
  assert got['top1'] == pytest.approx(1 / 5)
  assert got['colour_top1'] == pytest.approx(3 / 5) and got['shape_top1'] == pytest.approx(2 / 5)
  assert 'shape_top1' not in zero_shot.evaluate(feats, labels, classifier)


def random_tokenizer(config, seed=0):
  """A Tokenizer with random parameters drawn in NumPy (no jitted init to compile)."""
  shapes = nn.unbox(jax.eval_shape(vtp.build(config).init, jax.random.key(0),
                                   jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 8), jnp.int32)))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if path[-1].key in ('scale', 'g'):
      return np.ones(leaf.shape, leaf.dtype)
    if path[-1].key in ('bias', 'mask_token', 'logit_scale'):
      return np.zeros(leaf.shape, leaf.dtype)
    return (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
  return Tokenizer(config, jax.tree_util.tree_map_with_path(fill, shapes['params']))


def test_run_on_a_micro_tokenizer_matches_its_own_features():
  config = micro_config()
  config.evals.update(batch_size=4, templates='shapes')
  tok = random_tokenizer(config)
  names = ['red circle', 'blue square', 'green star']
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  labels = np.array([0, 1, 2, 0, 1, 2, 2, 1])
  got = zero_shot.run(tok, config, 'shapes', batches=[(images[:5], labels[:5]),
                                                      (images[5:], labels[5:])],
                      class_names=names)
  # Reference: the Tokenizer's string API, one prompt set at a time, and NumPy.
  classes = []
  for name in names:
    emb = np.asarray(tok.clip_text_features_from_strings(
        [t.format(name) for t in templates.SHAPES_TEMPLATES]))
    mean = emb.mean(0)
    classes.append(mean / np.linalg.norm(mean))
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  image_emb = np.concatenate([np.asarray(tok.clip_image_features(
      ((x / 255 - mean) / std).astype(np.float32))) for x in (images[:4], images[4:])])
  logits = image_emb @ np.stack(classes).T
  want = np.mean(np.argmax(logits, axis=1) == labels)
  assert got['top1'] == pytest.approx(want)
  assert got['top5'] == 1.0 and got['templates'] == len(templates.SHAPES_TEMPLATES)
  assert got['examples'] == 8
