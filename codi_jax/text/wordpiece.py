"""BERT WordPiece tokenizer of the Optimus text encoder (CODI_REFERENCE §1.5).

Behaves as the original `optimus_modules/tokenization_bert.BertTokenizer` configured the way CoDi
builds it (`configs/model/optimus.yaml`: `bert-base-cased-vocab.txt`, `do_lower_case: false`):
special-token pieces kept whole, control characters dropped, whitespace normalised, CJK ideographs
split off, punctuation split, accents kept, then greedy longest-match WordPiece with `##`
continuations and `[UNK]` for words over 100 characters or with no match.

`CoDi.optimus_encode` lower-cases each text itself, adds `[CLS] ... [SEP]`, right-pads the batch
with 0 and keeps the first 512 ids, so a text of more than 510 word pieces loses its `[SEP]`
(the original truncates silently; so do we, `encode_batch(..., max_length=512)`). The CoDi entry is
`codi_token_ids`; it rejects texts that give no tokens (the original would encode them as
`[CLS] [SEP]`, or, for whitespace-only text, as a special token chosen by set order).

B batch, T tokens.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Sequence

import numpy as np

from codi_jax.text import common

UNK, CLS, SEP, PAD, MASK = "[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"
SPECIAL_TOKENS = (UNK, SEP, PAD, CLS, MASK)
MAX_LENGTH = 512  # BERT position table; `optimus_encode` cuts its padded batch here
MAX_CHARS_PER_WORD = 100

# CJK Unified Ideographs (and extensions, compatibility ideographs); not Hangul, Hiragana, Katakana.
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_whitespace(char: str) -> bool:
  return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _is_control(char: str) -> bool:
  return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def _is_punctuation(char: str) -> bool:
  # Every non-alphanumeric printable ASCII character counts, e.g. "$", "^", "`" (not class P).
  cp = ord(char)
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(char).startswith("P")


def _is_cjk(char: str) -> bool:
  cp = ord(char)
  return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def basic_tokenize(text: str) -> list[str]:
  """Whitespace/punctuation/CJK pre-tokenization (the original's `BasicTokenizer`, cased)."""
  chars = []
  for char in text:
    if char in ("\x00", "\ufffd") or _is_control(char):
      continue
    if _is_whitespace(char):
      chars.append(" ")
    elif _is_cjk(char):
      chars.extend((" ", char, " "))
    else:
      chars.append(char)
  words = []
  for word in "".join(chars).split():
    start = 0
    for i, char in enumerate(word):
      if _is_punctuation(char):
        if i > start:
          words.append(word[start:i])
        words.append(char)
        start = i + 1
    if start < len(word):
      words.append(word[start:])
  return words


class BertTokenizer:
  """WordPiece tokenizer over a one-token-per-line vocabulary (line index = id)."""

  def __init__(self, vocab: dict[str, int]):
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
      raise ValueError(f"BERT vocabulary lacks the special tokens {missing}")
    if vocab[PAD] != 0:
      raise ValueError(f"BERT vocabulary has {PAD} at id {vocab[PAD]}; CoDi pads with id 0 and "
                       "masks attention with ids > 0, so it must be id 0")
    self.vocab = vocab
    self._id_to_token = {i: t for t, i in vocab.items()}
    self.unk_id, self.cls_id, self.sep_id = vocab[UNK], vocab[CLS], vocab[SEP]
    self.pad_id = 0

  @classmethod
  def from_file(cls, vocab_txt: str | os.PathLike) -> BertTokenizer:
    """Reads e.g. `bert-base-cased-vocab.txt`."""
    text = common.read_text(vocab_txt, "BERT vocabulary")
    lines = text.split("\n")
    if lines[-1] == "":
      lines.pop()
    # A repeated token keeps its last line, as the original's dict does.
    return cls({token: i for i, token in enumerate(lines)})

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def _wordpiece(self, word: str) -> list[str]:
    if len(word) > MAX_CHARS_PER_WORD:
      return [UNK]
    pieces, start = [], 0
    while start < len(word):
      for end in range(len(word), start, -1):  # longest match first
        piece = word[start:end] if start == 0 else "##" + word[start:end]
        if piece in self.vocab:
          break
      else:
        return [UNK]
      pieces.append(piece)
      start = end
    return pieces

  def tokenize(self, text: str) -> list[str]:
    """Word pieces of `text`, without `[CLS]`/`[SEP]` (special tokens in the text stay whole)."""
    tokens = []
    for piece in common.split_on_special_tokens(text, SPECIAL_TOKENS):
      if piece in SPECIAL_TOKENS:
        tokens.append(piece)
      else:
        for word in basic_tokenize(piece):
          tokens.extend(self._wordpiece(word))
    return tokens

  def encode(self, text: str) -> list[int]:
    """`[CLS] ids [SEP]`, not truncated."""
    return self._with_specials(self.tokenize(text))

  def _with_specials(self, tokens: list[str]) -> list[int]:
    return [self.cls_id, *(self.vocab.get(t, self.unk_id) for t in tokens), self.sep_id]

  def _batch(self, seqs: list[list[int]], max_length: int) -> np.ndarray:
    if max_length < 2:
      raise ValueError(f"max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
    seqs = [s[:max_length] for s in seqs]
    return common.pad_batch(seqs, max(len(s) for s in seqs), self.pad_id)  # [B, T]

  def encode_batch(self, texts: Sequence[str], max_length: int = MAX_LENGTH) -> np.ndarray:
    """[B, T] int32 `[CLS] ... [SEP]` ids, right-padded with 0, cut to `max_length` as in CoDi."""
    return self._batch([self.encode(t) for t in common.check_texts(texts)], max_length)

  def codi_token_ids(self, texts: Sequence[str]) -> np.ndarray:
    """What `CoDi.optimus_encode` feeds the encoder: lower-cased texts -> [B, T] int32 ids."""
    seqs = []
    for i, text in enumerate(common.check_texts(texts)):
      tokens = self.tokenize(text.lower())
      if not tokens:
        raise ValueError(f"text {i} ({text!r}) is empty or has no tokens after cleaning; CoDi's "
                         "text encoder needs at least one token")
      ids = self._with_specials(tokens)
      if len(ids) > MAX_LENGTH:
        # The original silently keeps the first 512 ids (dropping [SEP]); a caller should know.
        raise ValueError(f"text {i} is too long for the text VAE: {len(ids)} tokens with "
                         f"[CLS]/[SEP], at most {MAX_LENGTH}")
      seqs.append(ids)
    return self._batch(seqs, MAX_LENGTH)

  def decode(self, ids: Sequence[int]) -> str:
    """Word pieces joined back (`##` glued on), special tokens and padding dropped."""
    tokens = []
    for i in ids:
      token = self._id_to_token.get(int(i))
      if token is None:
        raise ValueError(f"id {int(i)} is outside the BERT vocabulary (size {self.vocab_size})")
      if token not in SPECIAL_TOKENS:
        tokens.append(token)
    return " ".join(tokens).replace(" ##", "").strip()
