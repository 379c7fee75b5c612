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


def _reference():
  # The tokenizer's own Rust batch path: start/end tokens, zero padding and truncation implemented
  # independently of vtp_jax.data.text (it lowercases but does no other cleaning, so inputs below
  # are already clean).
  import instant_clip_tokenizer
  return instant_clip_tokenizer.Tokenizer()


def test_empty_and_blank_strings_are_start_end_then_padding():
  want = np.zeros((2, 6), np.int32)
  want[:, :2] = [text.START_TOKEN, text.END_TOKEN]
  np.testing.assert_array_equal(text.tokenize(['', ' \n\t '], context_length=6), want)
  np.testing.assert_array_equal(text.tokenize([''], context_length=6),
                                _reference().tokenize_batch([''], context_length=6))


@pytest.mark.parametrize('caption', ['café au lait', '猫が好き', 'a 🐱 on a mat', 'naïve ünïcödé straße',
                                     'Ελληνικά και русский'])
def test_non_ascii_matches_the_reference_and_round_trips(caption):
  ref = _reference()
  ids = text.tokenize(caption, context_length=40)
  np.testing.assert_array_equal(ids, ref.tokenize_batch([caption], context_length=40))
  body = [int(i) for i in ids[0] if i not in (0, text.START_TOKEN, text.END_TOKEN)]
  assert ref.decode(body).strip() == caption.lower()  # byte-level BPE loses nothing


def test_truncation_matches_the_reference_at_several_lengths():
  ref = _reference()
  caption = 'naïve ünïcödé straße with a long tail of words ' * 4
  for length in (3, 12, 77):  # the reference refuses lengths below 3
    np.testing.assert_array_equal(text.tokenize(caption, context_length=length),
                                  ref.tokenize_batch([caption], context_length=length))
  np.testing.assert_array_equal(text.tokenize(caption, context_length=2)[0],
                                [text.START_TOKEN, text.END_TOKEN])
  # A caption of exactly context_length tokens is not truncated: 'cat' is one token.
  ids = text.tokenize('cat cat cat', context_length=5)[0]
  np.testing.assert_array_equal(ids, [text.START_TOKEN, 2368, 2368, 2368, text.END_TOKEN])
