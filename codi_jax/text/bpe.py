"""Byte-level BPE: one merge engine, the GPT-2 tokenizer (Optimus decoder) and the CLIP tokenizer.

Both tokenizers map UTF-8 bytes to printable characters, cut the text with a regex into words and
merge each word's symbols by merge rank; they differ in pre-processing and vocabulary:

* GPT-2 (`optimus_modules/tokenization_gpt2.py` as CoDi builds it, CODI_REFERENCE §1.5):
  `gpt2-vocab.json` + `gpt2-merges.txt`, CoDi's `<PAD>`, `<BOS>`, `<EOS>` appended as ids
  50257-50259, a space put before the text, no end-of-word marker. `decode_generated` is what
  `optimus_vae.decode` makes of a sampled sequence; `clean_generated` the de-duplication that
  `model_module_infer.decode` applies to it.
* CLIP (the `clip_modules.CLIPTokenizer` that `FrozenCLIP` calls, transformers 4.26 semantics):
  vocabulary built from `bpe_simple_vocab_16e6.txt.gz` (256 bytes, 256 bytes + `</w>`, 48894
  merges, `<|startoftext|>` 49406, `<|endoftext|>` 49407), text cleaned with `ftfy.fix_text`
  (which also unescapes HTML entities, repeatedly, in lines without "<"; no extra
  `html.unescape` as in open_clip), whitespace collapsed, lower-cased; batches are
  `[SOT] ids[:75] [EOT]` padded with EOT to 77, so the last real token is always EOT. Special
  tokens written in the text are cut out before cleaning, as `CLIPTokenizer.from_pretrained`
  (which CoDi uses) sets it up.

Deliberate departures from the original GPT-2 tokenizer, none on a path CoDi runs: whitespace-only
text encodes to no ids (the original gives `<PAD>`), and `skip_special_tokens` drops all four
special tokens (the original's ids lookup misses the added ones and drops only 50256).

B batch, T tokens.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from collections.abc import Sequence

import ftfy
import numpy as np
import regex

from codi_jax.text import common

_CACHE_SIZE = 1 << 16  # distinct words whose merges are remembered per tokenizer


@functools.cache
def byte_to_unicode() -> dict[int, str]:
  """Byte -> printable character: printable Latin-1 bytes map to themselves, the other 68 bytes
  to chr(256 + k) in byte order (the table both BPE vocabularies are written in)."""
  table = {b: chr(b) for b in (*range(33, 127), *range(161, 173), *range(174, 256))}
  shifted = [b for b in range(256) if b not in table]
  table.update({b: chr(256 + k) for k, b in enumerate(shifted)})
  return table


class BytePairEncoding:
  """Greedy BPE over a merge list: repeatedly merge the adjacent pair of lowest rank."""

  def __init__(self, merges: Sequence[tuple[str, str]], end_of_word: str = ""):
    # A pair listed twice keeps its later rank, as the originals' dicts do.
    self.ranks = {pair: rank for rank, pair in enumerate(merges)}
    self._unranked = len(merges)  # above every rank
    self.end_of_word = end_of_word
    self._cached = functools.lru_cache(maxsize=_CACHE_SIZE)(self._merge)

  def __call__(self, word: str) -> tuple[str, ...]:
    """Symbols of one (byte-mapped) word; the last carries `end_of_word`."""
    return self._cached(word)

  def _merge(self, word: str) -> tuple[str, ...]:
    if not word:
      return ()
    symbols = list(word)
    symbols[-1] += self.end_of_word
    while len(symbols) > 1:
      ranks = [self.ranks.get(pair, self._unranked) for pair in itertools.pairwise(symbols)]
      best = min(ranks)
      if best == self._unranked:
        break
      k = ranks.index(best)
      first, second = symbols[k], symbols[k + 1]
      merged, i = [], 0
      while i < len(symbols):  # every non-overlapping occurrence, left to right
        if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    return tuple(symbols)


def _byte_encode(text: str) -> str:
  table = byte_to_unicode()
  return "".join(table[b] for b in text.encode("utf-8"))


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
  return {c: b for b, c in byte_to_unicode().items()}


def _byte_decode(symbols: str) -> str:
  inverse = _unicode_to_byte()
  return bytes(inverse[c] for c in symbols).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------- GPT-2

GPT2_UNK = "<|endoftext|>"
GPT2_ADDED = ("<PAD>", "<BOS>", "<EOS>")  # added by `optimus_vae.__init__`, in this order
_GPT2_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
# The original `decode`'s clean-up, applied in this order (" do not" -> " don't" included).
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class GPT2Tokenizer:
  """GPT-2 byte-level BPE with CoDi's added `<PAD>`, `<BOS>`, `<EOS>`."""

  def __init__(self, encoder: dict[str, int], merges: Sequence[tuple[str, str]]):
    if sorted(encoder.values()) != list(range(len(encoder))):
      raise ValueError("GPT-2 vocabulary ids must be 0..N-1, each used once")
    if GPT2_UNK not in encoder:
      raise ValueError(f"GPT-2 vocabulary lacks {GPT2_UNK}")
    missing = sorted(set(byte_to_unicode().values()) - set(encoder))
    if missing:
      raise ValueError(f"GPT-2 vocabulary lacks {len(missing)} single-byte symbols, e.g. "
                       f"{missing[0]!r}; not a byte-level BPE vocabulary")
    self.encoder = dict(encoder)
    for token in GPT2_ADDED:
      self.encoder.setdefault(token, len(self.encoder))
    self.decoder = {i: t for t, i in self.encoder.items()}
    self.bpe = BytePairEncoding(merges)
    self.unk_id = self.encoder[GPT2_UNK]
    self.pad_id, self.bos_id, self.eos_id = (self.encoder[t] for t in GPT2_ADDED)
    self.special_tokens = (GPT2_UNK, *GPT2_ADDED)
    self._added = frozenset(self.encoder[t] for t in GPT2_ADDED)
    self._special_ids = frozenset(self.encoder[t] for t in self.special_tokens)

  @classmethod
  def from_files(cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike
                 ) -> GPT2Tokenizer:
    """Reads `gpt2-vocab.json` and `gpt2-merges.txt`."""
    try:
      encoder = json.loads(common.read_text(vocab_json, "GPT-2 vocabulary"))
    except json.JSONDecodeError as e:
      raise ValueError(f"GPT-2 vocabulary {vocab_json} is not valid JSON ({e})") from e
    if not isinstance(encoder, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in encoder.items()):
      raise ValueError(f"GPT-2 vocabulary {vocab_json} must be a JSON object of token -> id")
    return cls(encoder, common.parse_merges(common.read_text(merges_txt, "GPT-2 merges"),
                                            str(merges_txt)))

  @property
  def vocab_size(self) -> int:
    """Including the three added tokens (50260 for GPT-2)."""
    return len(self.encoder)

  def tokenize(self, text: str, *, add_prefix_space: bool = True) -> list[str]:
    """BPE symbols. As in the original, the text is cut around special tokens, each other piece
    is stripped and (by default) given one leading space before the regex."""
    tokens = []
    for piece in common.split_on_special_tokens(text, self.special_tokens):
      if piece in self.special_tokens:
        tokens.append(piece)
        continue
      if add_prefix_space:
        piece = " " + piece
      for word in _GPT2_PATTERN.findall(piece):
        tokens.extend(self.bpe(_byte_encode(word)))
    return tokens

  def encode(self, text: str, *, add_prefix_space: bool = True) -> list[int]:
    """Ids of `text` (no `<BOS>`/`<EOS>` added). `decode(encode(s))` is `" " + s.strip()`, and
    `s.strip()` with `add_prefix_space=False`."""
    return [self.encoder.get(t, self.unk_id)
            for t in self.tokenize(text, add_prefix_space=add_prefix_space)]

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False,
             clean_up_tokenization_spaces: bool = False) -> str:
    """Text of `ids`. Added tokens come out as " <BOS>" etc. (a space before each), as in the
    original; `skip_special_tokens` drops `<|endoftext|>` and the three added tokens."""
    parts, run = [], []
    for i in ids:
      i = int(i)
      if i not in self.decoder:
        raise ValueError(f"id {i} is outside the GPT-2 vocabulary (size {self.vocab_size})")
      if skip_special_tokens and i in self._special_ids:
        continue
      if i in self._added:
        parts.extend((_byte_decode("".join(run)), " " + self.decoder[i]))
        run = []
      else:
        run.append(self.decoder[i])
    text = "".join(parts) + _byte_decode("".join(run))
    if clean_up_tokenization_spaces:
      for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text

  def decode_generated(self, ids: Sequence[int]) -> str:
    """`optimus_vae.decode` of one sampled sequence `[<BOS>, ..., <EOS>]`: decode with clean-up,
    then drop the first and last whitespace-separated words (meant to be `<BOS>`, `<EOS>`)."""
    words = self.decode(ids, clean_up_tokenization_spaces=True).split()
    return " ".join(words[1:-1])


def clean_generated(text: str) -> str:
  """`model_module_infer.decode`'s text post-processing: drop a word equal to its predecessor,
  then the original's `remove_duplicate_word` (collapses adjacently repeated n-grams)."""
  words = text.split()
  kept = [w for i, w in enumerate(words) if i == 0 or w != words[i - 1]]
  return remove_duplicate_ngrams(" ".join(kept))


_OPENING, _CLOSING, _JOIN = "([{", "?!.,:;}])", "<puncnext>"


def _split_punctuation(text: str) -> list[str]:
  """Words with leading brackets and trailing punctuation split off, each glued by a marker."""
  units = []
  for word in text.split(" "):
    while word and word[0] in _OPENING:
      units.extend((word[0], _JOIN))
      word = word[1:]
    tail = []
    while word and word[-1] in _CLOSING:
      tail[:0] = (_JOIN, word[-1])
      word = word[:-1]
    if word:
      units.append(word)
    units.extend(tail)
  return units


def remove_duplicate_ngrams(text: str) -> str:
  """The original `core/common/utils.remove_duplicate_word`, step for step.

  The text becomes a list of units (words, split-off punctuation). For n = 1, 2, ...: while some
  unit i equals unit i+n, units i+1..i+n are deleted (first match first); then every unit is
  widened by the last word of its right neighbour (n-grams of n+1 words, one fewer unit). When one
  unit is left it is the result, with the punctuation markers glued back.
  """
  if not text:
    return text
  units = _split_punctuation(text)
  n = 1
  while len(units) > 1:
    i = 0
    while i < len(units) - n:
      if units[i] == units[i + n]:
        del units[i + 1:i + n + 1]
        i = 0
      else:
        i += 1
    if len(units) > 1:
      units = [units[k] + " " + units[k + 1].split(" ")[n - 1] for k in range(len(units) - 1)]
      n += 1
  return units[0].replace(f" {_JOIN} ", "") if units else ""


# ---------------------------------------------------------------------------------------- CLIP

CLIP_SOT, CLIP_EOT = "<|startoftext|>", "<|endoftext|>"
CLIP_NUM_MERGES = 49152 - 256 - 2  # merges the CLIP vocabulary uses (the file has more)
CLIP_CONTEXT_LENGTH = 77
_CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
    r"""|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)
_WHITESPACE = regex.compile(r"\s+")


def clip_clean(text: str) -> str:
  """ftfy repair (NFC, HTML entities, width, ...), whitespace runs -> one space, strip, lower."""
  return _WHITESPACE.sub(" ", ftfy.fix_text(text)).strip().lower()


class CLIPTokenizer:
  """CLIP text tokenizer: `</w>`-terminated byte-level BPE over a 49408-token vocabulary."""

  def __init__(self, merges: Sequence[tuple[str, str]]):
    if len(merges) < CLIP_NUM_MERGES:
      raise ValueError(f"CLIP BPE needs {CLIP_NUM_MERGES} merges, the file has {len(merges)}")
    merges = merges[:CLIP_NUM_MERGES]
    symbols = list(byte_to_unicode().values())
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges),
             CLIP_SOT, CLIP_EOT]
    self.encoder = {token: i for i, token in enumerate(vocab)}
    if len(self.encoder) != len(vocab):
      raise ValueError("CLIP merges produce repeated vocabulary entries; not a CLIP BPE file")
    self.decoder = dict(enumerate(vocab))
    self.bpe = BytePairEncoding(merges, end_of_word="</w>")
    self.sot_id, self.eot_id = self.encoder[CLIP_SOT], self.encoder[CLIP_EOT]

  @classmethod
  def from_file(cls, bpe_gz: str | os.PathLike) -> CLIPTokenizer:
    """Reads `bpe_simple_vocab_16e6.txt.gz` (a version line, then one merge per line)."""
    text = common.read_text(bpe_gz, "CLIP BPE vocabulary", gzipped=True)
    return cls(common.parse_merges(text, str(bpe_gz), limit=CLIP_NUM_MERGES))

  @property
  def vocab_size(self) -> int:
    return len(self.encoder)

  def tokenize(self, text: str) -> list[str]:
    """BPE symbols of `text` (no SOT/EOT added; special tokens in the text are kept)."""
    tokens = []
    for piece in common.split_on_special_tokens(text, (CLIP_SOT, CLIP_EOT)):
      if piece in (CLIP_SOT, CLIP_EOT):
        tokens.append(piece)
        continue
      for word in _CLIP_PATTERN.findall(clip_clean(piece)):
        # Lower-cased special tokens written in another case match the regex whole.
        tokens.extend((word,) if word in (CLIP_SOT, CLIP_EOT) else self.bpe(_byte_encode(word)))
    return tokens

  def encode(self, text: str) -> list[int]:
    return [self.encoder[t] for t in self.tokenize(text)]

  def encode_batch(self, texts: Sequence[str], context_length: int = CLIP_CONTEXT_LENGTH
                   ) -> np.ndarray:
    """[B, context_length] int32: `[SOT] ids [EOT]`, ids cut to keep EOT last, EOT padding."""
    if context_length < 2:
      raise ValueError(f"context_length must be at least 2 (SOT and EOT), got {context_length}")
    seqs = [[self.sot_id, *self.encode(t)[:context_length - 2], self.eot_id]
            for t in common.check_texts(texts)]
    return common.pad_batch(seqs, context_length, self.eot_id)  # [B, T]

  def decode(self, ids: Sequence[int]) -> str:
    """Cleaned text of `ids` (word ends become spaces), SOT/EOT/padding dropped."""
    symbols = []
    for i in ids:
      i = int(i)
      if i not in self.decoder:
        raise ValueError(f"id {i} is outside the CLIP vocabulary (size {self.vocab_size})")
      if i not in (self.sot_id, self.eot_id):
        symbols.append(self.decoder[i])
    return _byte_decode("".join(symbols)).replace("</w>", " ").strip()
