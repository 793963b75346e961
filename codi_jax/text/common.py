"""Shared by the three tokenizers: where vocabularies live, reading them, special-token splitting,
padding.

B batch, T tokens.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import zlib
from collections.abc import Sequence

import numpy as np
import regex

# The CLIP, BERT and GPT-2 vocabularies shipped as package data (their licences beside them).
BUNDLED_VOCAB = pathlib.Path(__file__).resolve().parent / "vocab"


def vocab_dir(directory: str | os.PathLike | None = None) -> pathlib.Path:
  """The folder every tokenizer vocabulary is read from: `directory` when given (a --tokenizers
  flag, `config.data.tokenizers`), else $CODI_TOKENIZERS, else the vocabularies bundled with the
  package. The one place this rule lives."""
  return pathlib.Path(directory or os.environ.get("CODI_TOKENIZERS") or BUNDLED_VOCAB)


def read_text(path: str | os.PathLike, what: str, *, gzipped: bool = False) -> str:
  """The UTF-8 text of a vocabulary file; clear errors for a missing, unreadable or empty one."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{what} not found: {path}")
  try:
    data = gzip.decompress(path.read_bytes()) if gzipped else path.read_bytes()
    text = data.decode("utf-8")
  except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
    raise ValueError(f"{what} {path} is not a gzip file ({e})") from e
  except UnicodeDecodeError as e:
    raise ValueError(f"{what} {path} is not UTF-8 text ({e})") from e
  if not text.strip():
    raise ValueError(f"{what} {path} is empty")
  return text


def parse_merges(text: str, source: str, limit: int | None = None) -> list[tuple[str, str]]:
  """BPE merges "a b" after a '#version' header line, in rank order (at most `limit` of them)."""
  lines = text.split("\n")
  if "#version" not in lines[0]:
    raise ValueError(f"{source}: BPE merges must start with a '#version' line, got {lines[0]!r}")
  lines = lines[1:] if limit is None else lines[1:limit + 1]
  if lines and lines[-1] == "":  # the final newline
    lines.pop()
  merges = []
  for number, line in enumerate(lines, start=2):
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f"{source}: merge line {number} is {line!r}, expected two symbols")
    merges.append((parts[0], parts[1]))
  return merges


def split_on_special_tokens(text: str, specials: Sequence[str]) -> list[str]:
  """`text` cut around exact occurrences of `specials`, as the original `tokenize` does.

  Special tokens come back as their own pieces; the text between them is stripped of surrounding
  whitespace and dropped when empty.
  """
  if not specials:
    return [text.strip()] if text.strip() else []
  pattern = "(" + "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
  pieces = []
  for i, piece in enumerate(regex.split(pattern, text)):
    if i % 2:  # odd positions are the captured special tokens
      pieces.append(piece)
    elif piece.strip():
      pieces.append(piece.strip())
  return pieces


def check_texts(texts: Sequence[str]) -> list[str]:
  """A batch of texts as a list; a bare string or a non-string item is a ValueError."""
  if isinstance(texts, str):
    raise ValueError("expected a sequence of texts, got a single string; wrap it in a list")
  texts = list(texts)
  if not texts:
    raise ValueError("expected at least one text, got an empty batch")
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise ValueError(f"text {i} is a {type(text).__name__}, expected str")
  return texts


def pad_batch(sequences: Sequence[Sequence[int]], length: int, pad_id: int) -> np.ndarray:
  """Sequences of at most `length` ids -> [B, length] int32, right-padded with `pad_id`."""
  out = np.full((len(sequences), length), pad_id, dtype=np.int32)  # [B, T]
  for i, ids in enumerate(sequences):
    out[i, :len(ids)] = ids
  return out
