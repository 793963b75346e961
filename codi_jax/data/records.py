"""Our record format: one paired example (caption + encoded image/video/audio + provenance) per
ArrayRecord entry, written by the builders and importers and read back by the grain pipelines.

An entry is a versioned binary layout, safe to parse (no pickle):

  b"CDRX" | version (u8) | header length (u32 LE) | header (UTF-8 JSON) | image | video | audio

The header holds key, source, license, text, metadata and each blob's byte length (null when
absent); blobs follow in that fixed order.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
import pathlib
import struct
from collections.abc import Iterable, Sequence
from typing import Any

from codi_jax.io_utils import temp_file
from codi_jax.modality import Modality

MAGIC = b"CDRX"
VERSION = 1
BLOB_FIELDS = ("image", "video", "audio")
RECORD_SUFFIX = ".array_record"
_PREFIX = struct.Struct("<4sBI")  # magic, version, header length
# group_size:1 makes every record individually addressable, as grain's random access wants.
_WRITER_OPTIONS = "group_size:1"


def _canonical_metadata(metadata: Any) -> dict:
  if not isinstance(metadata, dict):
    raise ValueError(f"Example.metadata must be a dict, got {type(metadata).__name__}")
  try:
    text = json.dumps(metadata, sort_keys=True, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f"Example.metadata must be JSON-serialisable (str keys, finite numbers): "
                     f"{e}") from None
  canonical = json.loads(text)
  if canonical != metadata:  # e.g. tuples or int keys would not read back equal.
    raise ValueError("Example.metadata must survive a JSON round trip unchanged (use lists, "
                     "str keys)")
  return canonical


@dataclasses.dataclass(frozen=True)
class Example:
  """One paired example. Media are encoded bytes (PNG/JPEG, MP4, WAV/FLAC); absent ones None."""

  key: str
  source: str
  license: str | None = None
  text: str | None = None
  image: bytes | None = None
  video: bytes | None = None
  audio: bytes | None = None
  metadata: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    for name in ("key", "source"):
      value = getattr(self, name)
      if not isinstance(value, str) or not value:
        raise ValueError(f"Example.{name} must be a non-empty str, got {value!r}")
    if self.license is not None and (not isinstance(self.license, str) or not self.license):
      raise ValueError(f"Example.license must be None or a non-empty str, got {self.license!r}")
    if self.text is not None and (not isinstance(self.text, str) or not self.text.strip()):
      raise ValueError(f"Example {self.key!r}: text must be None or a non-blank str, got "
                       f"{self.text!r}")
    for name in BLOB_FIELDS:
      value = getattr(self, name)
      if value is None:
        continue
      if not isinstance(value, (bytes, bytearray)) or not value:
        raise ValueError(f"Example {self.key!r}: {name} must be None or non-empty bytes")
      object.__setattr__(self, name, bytes(value))
    if self.text is None and all(getattr(self, name) is None for name in BLOB_FIELDS):
      raise ValueError(f"Example {self.key!r} has no text, image, video or audio")
    object.__setattr__(self, "metadata", _canonical_metadata(self.metadata))


def modalities(example: Example) -> set[str]:
  """The modalities an example carries, as `Modality` values ("text", "image", ...)."""
  present = {Modality.TEXT.value} if example.text is not None else set()
  return present | {Modality(name).value for name in BLOB_FIELDS
                    if getattr(example, name) is not None}


def serialize(example: Example) -> bytes:
  if not isinstance(example, Example):
    raise ValueError(f"serialize expects an Example, got {type(example).__name__}")
  blobs = [getattr(example, name) for name in BLOB_FIELDS]
  header = {
      "key": example.key, "source": example.source, "license": example.license,
      "text": example.text, "metadata": example.metadata,
      "lengths": [None if blob is None else len(blob) for blob in blobs],
  }
  header_bytes = json.dumps(header, sort_keys=True, ensure_ascii=False,
                            separators=(",", ":")).encode("utf-8")
  return b"".join([_PREFIX.pack(MAGIC, VERSION, len(header_bytes)), header_bytes,
                   *(blob for blob in blobs if blob is not None)])


def deserialize(data: bytes) -> Example:
  """Parses one record; a damaged or foreign record raises ValueError saying what is wrong."""
  data = bytes(data)
  if len(data) < _PREFIX.size:
    raise ValueError(f"record too short ({len(data)} bytes) to be a CoDi record")
  magic, version, header_len = _PREFIX.unpack_from(data)
  if magic != MAGIC:
    raise ValueError(f"not a CoDi record (magic {magic!r}, expected {MAGIC!r})")
  if version != VERSION:
    raise ValueError(f"unsupported record version {version} (this reader knows {VERSION})")
  start = _PREFIX.size + header_len
  if start > len(data):
    raise ValueError("record header is truncated")
  try:
    header = json.loads(data[_PREFIX.size:start].decode("utf-8"))
    lengths = header["lengths"]
    fields = {name: header[name] for name in ("key", "source", "license", "text", "metadata")}
  except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"record header is malformed: {e}") from None
  if not isinstance(lengths, list) or len(lengths) != len(BLOB_FIELDS):
    raise ValueError(f"record header lengths must list {len(BLOB_FIELDS)} entries, got {lengths!r}")
  offset = start
  for name, length in zip(BLOB_FIELDS, lengths):
    if length is None:
      fields[name] = None
      continue
    if not isinstance(length, int) or length <= 0 or offset + length > len(data):
      raise ValueError(f"record {name} blob length {length!r} does not fit the record")
    fields[name] = data[offset:offset + length]
    offset += length
  if offset != len(data):
    raise ValueError(f"record has {len(data) - offset} trailing bytes")
  return Example(**fields)


def write_records(path: str | os.PathLike, examples: Iterable[Example]) -> int:
  """Writes `examples` to one ArrayRecord file, atomically (temp file, then rename).

  Returns the number written. A failure leaves no file at `path`.
  """
  from array_record.python import array_record_module

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = temp_file(path)
  count = 0
  try:
    writer = array_record_module.ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    try:
      for example in examples:
        writer.write(serialize(example))
        count += 1
    finally:
      writer.close()
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return count


def record_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[pathlib.Path]:
  """Expands files and folders (every `*.array_record` inside, sorted) into a list of shards."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  files = []
  for path in map(pathlib.Path, paths):
    if path.is_dir():
      files.extend(sorted(path.glob(f"*{RECORD_SUFFIX}")))
    elif path.is_file():
      files.append(path)
    else:
      raise ValueError(f"record path {path} does not exist")
  if not files:
    raise ValueError(f"no {RECORD_SUFFIX} files in {[str(p) for p in paths]}")
  return files


class RecordSource:
  """Random access over the examples of several record shards (grain's `RandomAccessDataSource`).

  Picklable: worker processes reopen the files lazily.
  """

  def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]):
    from array_record.python import array_record_data_source

    self.files = record_files(paths)
    self._source = array_record_data_source.ArrayRecordDataSource([str(f) for f in self.files])

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Example:
    index = operator.index(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record index {index} out of range [0, {len(self)})")
    return deserialize(self._source[index])

  def __repr__(self) -> str:
    return f"RecordSource({len(self.files)} files, {len(self)} examples)"


def read_records(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> RecordSource:
  """A random-access source (len, [i] -> Example) over record files and/or folders of them."""
  return RecordSource(paths)
