"""Record format: exact round trips, validation, damaged records, atomic multi-shard files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from codi_jax.data import records
from codi_jax.data.records import Example


def _example(i: int, **overrides) -> Example:
  fields = dict(key=f"src/{i:03d}", source="src", license="CC-BY-4.0", text=f"caption {i} ✓",
                image=bytes([i % 256]) * (i + 1), audio=b"RIFF" + bytes(i),
                metadata={"index": i, "tags": ["a", "b"], "nested": {"x": 1.5}})
  fields.update(overrides)
  return Example(**fields)


@pytest.mark.parametrize("example", [
    _example(3),
    _example(4, license=None, image=None, audio=None, video=b"\x00\x01", metadata={}),
    _example(5, text=None),
])
def test_serialize_round_trip_is_exact(example):
  data = records.serialize(example)
  assert data[:4] == records.MAGIC
  assert records.deserialize(data) == example
  assert records.serialize(records.deserialize(data)) == data


def test_modalities():
  assert records.modalities(_example(1)) == {"text", "image", "audio"}
  assert records.modalities(_example(1, text=None, image=None, video=b"v", audio=None)) == {"video"}


@pytest.mark.parametrize("overrides, match", [
    (dict(key=""), "key must be a non-empty str"),
    (dict(source=None), "source must be a non-empty str"),
    (dict(license=""), "license must be None or a non-empty str"),
    (dict(text="   "), "text must be None or a non-blank str"),
    (dict(image=b""), "image must be None or non-empty bytes"),
    (dict(text=None, image=None, audio=None), "has no text, image, video or audio"),
    (dict(metadata={"t": (1, 2)}), "JSON round trip"),
    (dict(metadata={1: "x"}), "JSON round trip"),
    (dict(metadata={"x": float("nan")}), "JSON-serialisable"),
    (dict(metadata=[1]), "must be a dict"),
])
def test_invalid_examples_are_rejected(overrides, match):
  with pytest.raises(ValueError, match=match):
    _example(0, **overrides)


def test_damaged_records_raise_value_error():
  data = records.serialize(_example(7))
  cases = [
      (b"CDR", "too short"),
      (b"XXXX" + data[4:], "not a CoDi record"),
      (data[:4] + bytes([9]) + data[5:], "unsupported record version 9"),
      (data[:-1], "does not fit"),
      (data + b"!", "trailing bytes"),
      (data[:12], "header is truncated"),
  ]
  for damaged, match in cases:
    with pytest.raises(ValueError, match=match):
      records.deserialize(damaged)


def test_write_and_read_several_shards(tmp_path):
  shards = [[_example(i) for i in range(5)], [], [_example(i) for i in range(5, 8)]]
  for n, examples in enumerate(shards):
    assert records.write_records(tmp_path / f"part-{n}.array_record", examples) == len(examples)
  assert sorted(p.name for p in tmp_path.iterdir()) == [  # No temp files left behind.
      "part-0.array_record", "part-1.array_record", "part-2.array_record"]
  source = records.read_records(tmp_path)
  assert len(source) == 8
  assert [source[i] for i in range(8)] == [_example(i) for i in range(8)]
  assert source[np.int64(6)] == _example(6)
  with pytest.raises(IndexError):
    source[8]
  clone = pickle.loads(pickle.dumps(source))  # As grain hands it to worker processes.
  assert [clone[i] for i in (7, 0)] == [_example(7), _example(0)]
  only_last = records.read_records([tmp_path / "part-2.array_record"])
  assert [e.key for e in (only_last[i] for i in range(3))] == ["src/005", "src/006", "src/007"]


def test_write_is_atomic_when_an_example_fails(tmp_path):
  path = tmp_path / "shard.array_record"
  records.write_records(path, [_example(0)])

  def broken():
    yield _example(1)
    raise RuntimeError("generator died")

  with pytest.raises(RuntimeError, match="generator died"):
    records.write_records(path, broken())
  assert [p.name for p in tmp_path.iterdir()] == ["shard.array_record"]
  assert records.read_records(path)[0] == _example(0)  # The old file is untouched.


def test_read_records_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    records.read_records(tmp_path / "missing")
  with pytest.raises(ValueError, match="no .array_record files"):
    records.read_records(tmp_path)
