"""Host-side tokenisation of captions for the text encoder (strings never reach a device).

`build_tokenizer(spec)`:
  'bytes'  a built-in byte-level tokenizer: ids 0..255 are the UTF-8 bytes, 256 = pad,
           257 = end of text (vocabulary 258). Needs no files: smoke runs and tests.
  a path   a local Hugging Face tokenizer directory (e.g. the Qwen2.5 tokenizer a user
           downloaded), loaded with transformers' AutoTokenizer without network access.

`tokenize(tokenizer, captions, max_len)` returns right-padded int32 `input_ids` and
`attention_mask` (1 = token, 0 = padding), both (B, max_len). Every caption is followed by the
tokenizer's end-of-text token, so each row has at least one real token: the empty caption ''
(the condition of dropped captions and of the unconditional CFG branch) is exactly [EOS].
Captions longer than max_len - 1 tokens are cut, keeping the end-of-text token.
"""
from __future__ import annotations

import os
from typing import Protocol, Sequence

import numpy as np


class Tokenizer(Protocol):
  """What `tokenize` needs from a tokenizer."""

  vocab_size: int  # ids are in [0, vocab_size)
  pad_id: int
  eos_id: int

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without padding or the trailing end-of-text token."""


class ByteTokenizer:
  """UTF-8 bytes as tokens: 256 byte ids, then pad and end-of-text."""

  vocab_size = 258
  pad_id = 256
  eos_id = 257

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [list(text.encode("utf-8")) for text in texts]

  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`, stopping at the first end-of-text or pad token."""
    out = bytearray()
    for i in ids:
      i = int(i)
      if i in (self.pad_id, self.eos_id):
        break
      if not 0 <= i < 256:
        raise ValueError(f"token id {i} is not a byte, pad ({self.pad_id}) or eos "
                         f"({self.eos_id})")
      out.append(i)
    return out.decode("utf-8", errors="replace")

  def __repr__(self):
    return "ByteTokenizer()"


class HFTokenizer:
  """A transformers tokenizer from a local directory, with the project's pad/eos rules."""

  def __init__(self, path: str):
    from transformers import AutoTokenizer

    self.path = path
    try:
      self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot load a tokenizer from {path!r}: {e}") from e
    eos = self.tokenizer.eos_token_id
    if eos is None:
      raise ValueError(f"the tokenizer at {path!r} defines no eos_token; captions end with it "
                       "(set eos_token in its tokenizer_config.json)")
    self.eos_id = int(eos)
    pad = self.tokenizer.pad_token_id
    # Padding is masked out everywhere; its id only has to be a valid one.
    self.pad_id = int(pad) if pad is not None else self.eos_id
    self.vocab_size = len(self.tokenizer)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    # The tokenizer's own special-token rule (e.g. a BOS where the model expects one; Qwen2
    # adds none); the end-of-text token is appended by `tokenize`.
    return [list(ids) for ids in self.tokenizer(list(texts))["input_ids"]]

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def __repr__(self):
    return f"HFTokenizer({self.path!r})"


def build_tokenizer(spec: str) -> Tokenizer:
  """'bytes' or a local Hugging Face tokenizer directory (see the module docstring)."""
  if spec == "bytes":
    return ByteTokenizer()
  if not spec:
    raise ValueError("no tokenizer given: pass 'bytes' or the directory of a Hugging Face "
                     "tokenizer (e.g. the Qwen2.5 checkpoint directory)")
  if not os.path.isdir(spec):
    raise ValueError(f"tokenizer {spec!r} is neither 'bytes' nor an existing directory")
  return HFTokenizer(spec)


def tokenize(tokenizer: Tokenizer, captions: Sequence[str] | np.ndarray,
             max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded (input_ids, attention_mask), both int32 (B, max_len); see the module doc."""
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  texts = list(captions)
  bad = [t for t in texts if not isinstance(t, str)]
  if bad:
    raise TypeError(f"captions must be str, got {type(bad[0]).__name__}: {bad[0]!r}")
  ids = np.full((len(texts), max_len), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(texts), max_len), np.int32)
  for row, tokens in enumerate(tokenizer.encode_batch(texts)):
    tokens = list(tokens)[:max_len - 1] + [tokenizer.eos_id]
    ids[row, :len(tokens)] = tokens
    mask[row, :len(tokens)] = 1
  if ids.size and int(ids.max()) >= tokenizer.vocab_size:
    raise ValueError(f"token id {int(ids.max())} is outside the tokenizer's vocabulary "
                     f"({tokenizer.vocab_size})")
  return ids, mask
