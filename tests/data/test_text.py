"""CLIP BPE tokenisation follows OpenCLIP's semantics (spec 1.6)."""

import numpy as np
import pytest

from vtp_jax.data import text


def test_start_end_and_zero_padding():
  ids = text.tokenize(['a photo of a cat.'], context_length=10)
  assert ids.dtype == np.int32 and ids.shape == (1, 10)
  # OpenAI CLIP BPE ids: a=320, photo=1125, of=539, cat=2368, '.'=269.
  np.testing.assert_array_equal(ids[0], [49406, 320, 1125, 539, 320, 2368, 269, 49407, 0, 0])


def test_truncation_keeps_the_end_token_last():
  ids = text.tokenize('word ' * 100, context_length=8)[0]
  assert ids[0] == text.START_TOKEN and ids[-1] == text.END_TOKEN
  assert (ids != 0).all()


def test_cleaning_unescapes_html_collapses_space_and_lowercases():
  assert text.clean('  A  Red &amp;amp;\n Circle ') == 'a red & circle'
  np.testing.assert_array_equal(text.tokenize('A  RED circle'), text.tokenize('a red circle'))


def test_context_too_short_is_refused():
  with pytest.raises(ValueError, match='context_length'):
    text.tokenize('x', context_length=1)
