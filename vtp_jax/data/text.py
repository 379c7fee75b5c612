"""CLIP BPE tokenisation with OpenCLIP's semantics (spec 1.6).

Text is cleaned as OpenCLIP's `SimpleTokenizer` does (ftfy, HTML unescaping twice, whitespace
collapsed, lowercased), then encoded by `instant-clip-tokenizer` (the OpenAI BPE vocabulary):
start token 49406, end token 49407, padding 0, and truncation to the context length with the end
token forced into the last position.
"""

import functools
import html
import re

import ftfy
import instant_clip_tokenizer
import numpy as np

START_TOKEN = 49406
END_TOKEN = 49407
PAD_TOKEN = 0


@functools.lru_cache(maxsize=1)
def _tokenizer():
  return instant_clip_tokenizer.Tokenizer()


def clean(text: str) -> str:
  """OpenCLIP's basic_clean + whitespace_clean + lower."""
  text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  return re.sub(r'\s+', ' ', text).strip().lower()


def tokenize(texts, context_length: int = 77) -> np.ndarray:
  """(len(texts), context_length) int32 token ids; a single string is treated as a list of one."""
  if isinstance(texts, str):
    texts = [texts]
  if context_length < 2:
    raise ValueError(f'context_length={context_length}; it must hold the start and end tokens.')
  tok = _tokenizer()
  out = np.zeros((len(texts), context_length), np.int32)
  for row, text in enumerate(texts):
    ids = [START_TOKEN] + list(tok.encode(clean(text))) + [END_TOKEN]
    if len(ids) > context_length:
      ids = ids[:context_length]
      ids[-1] = END_TOKEN
    out[row, :len(ids)] = ids
  return out
