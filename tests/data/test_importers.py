"""Importers on small WebDataset shards and manifests made here, broken records included."""

from __future__ import annotations

import csv
import io
import json
import pathlib
import tarfile

import numpy as np
import pytest

from codi_jax.data import importers, media, records
from codi_jax.data.importers import ManifestSpec

RNG = np.random.default_rng(0)
PNG = media.encode_png(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8))
JPG = media.encode_jpeg(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8))
MP4 = media.encode_mp4(RNG.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), fps=4)
WAVE = (0.3 * np.sin(np.arange(1600) / 5.0)).astype(np.float32)
FLAC = media.encode_flac(WAVE, 16000)
WAV = media.encode_wav(WAVE, 16000)
EMPTY_WAV = media.encode_wav(WAVE[:1], 16000)[:44]  # Header only: zero samples.


def _tar(path: pathlib.Path, members: list[tuple[str, bytes]],
         cut: int | None = None) -> pathlib.Path:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  path.write_bytes(buf.getvalue()[:cut])
  return path


def _shards(root: pathlib.Path) -> list[pathlib.Path]:
  laion = [
      ("000.jpg", JPG), ("000.txt", b"a red square"),
      ("001.png", PNG),
      ("001.json", json.dumps({"caption": "a cat", "license": "CC0-1.0"}).encode()),
      ("002.jpg", JPG), ("002.txt", b"   "),  # Blank caption.
      ("003.jpg", b"\xff\xd8 not really a jpeg"), ("003.txt", b"broken"),
      ("004.gif", b"GIF89a"), ("004.txt", b"a gif"),
      ("005.txt", b"text without media"),
      ("006.jpg", JPG), ("006.json", b"{not json"),
      ("007.jpg", JPG), ("007.txt", b"with extras"), ("007.cls", b"3"),
      ("008.png", PNG), ("008.txt", b"first"),
      ("009.png", PNG), ("009.txt", b"between"),
      ("008.jpg", JPG), ("008.txt", b"again"),  # Not consecutive: the same key twice.
  ]
  webvid = [("v0.mp4", MP4), ("v0.txt", b"a moving dot"),
            ("v1.mp4", MP4[:len(MP4) // 2]), ("v1.txt", b"truncated")]
  audio = [("a0.flac", FLAC), ("a0.json", json.dumps({"text": ["a hum", "a tone"]}).encode()),
           ("a1.wav", EMPTY_WAV), ("a1.json", b'{"text": "silence"}'),
           ("a2.wav", WAV), ("a2.json", b'{"caption": "a beep"}')]
  cut_members = [("c0.png", PNG), ("c0.txt", b"kept before the cut"), ("c1.png", PNG * 20),
                 ("c1.txt", b"lost")]
  full = _tar(root / "tmp.tar", cut_members).stat().st_size
  return [_tar(root / "laion.tar", laion), _tar(root / "webvid.tar", webvid),
          _tar(root / "audio.tar", audio), _tar(root / "cut.tar", cut_members, cut=full // 2)]


EXPECTED_REJECTED = {
    "missing_caption": 1, "corrupt_image": 1, "unsupported_format": 1, "missing_media": 1,
    "bad_metadata": 1, "duplicate_key": 1, "corrupt_video": 1, "empty_audio": 1,
    "corrupt_shard": 1,
}
EXPECTED_KEYS = ["web/laion/000", "web/laion/001", "web/laion/007", "web/laion/008",
                 "web/laion/009", "web/webvid/v0", "web/audio/a0", "web/audio/a2", "web/cut/c0"]


@pytest.fixture()
def shards(tmp_path):
  return _shards(tmp_path)


def test_webdataset_import_keeps_good_records_and_counts_every_bad_one(shards, tmp_path):
  out = tmp_path / "out"
  report = importers.import_webdataset(shards, out, source="web", license="CC-BY-4.0")
  assert report.rejected == EXPECTED_REJECTED
  assert report.kept == len(EXPECTED_KEYS)
  assert report.seen == report.kept + sum(EXPECTED_REJECTED.values())
  assert report.ignored_members == {"cls": 1}
  assert report.shards == [f"shard-{i:05d}.array_record" for i in range(4)]
  assert json.loads(importers.report_path(out, 0, 1).read_text()) == report.to_dict()
  assert any("003" in line for line in report.failures["corrupt_image"])

  source = records.read_records(out)
  examples = {source[i].key: source[i] for i in range(len(source))}
  assert sorted(examples) == sorted(EXPECTED_KEYS)
  first, cat = examples["web/laion/000"], examples["web/laion/001"]
  assert (first.image, first.text, first.license, first.source) == (JPG, "a red square",
                                                                    "CC-BY-4.0", "web")
  assert (cat.image, cat.text, cat.license) == (PNG, "a cat", "CC0-1.0")
  assert cat.metadata == {"origin": {"shard": "laion.tar", "key": "001"},
                          "json": {"caption": "a cat", "license": "CC0-1.0"}}
  assert examples["web/laion/008"].text == "first"  # The first of a duplicated key wins.
  assert examples["web/webvid/v0"].video == MP4
  hum = examples["web/audio/a0"]
  assert (hum.audio, hum.text, hum.metadata["captions"]) == (FLAC, "a hum", ["a hum", "a tone"])
  assert records.modalities(examples["web/audio/a2"]) == {"text", "audio"}


def test_webdataset_import_resumes_after_a_kill(shards, tmp_path):
  out = tmp_path / "out"
  first = importers.import_webdataset(shards, out, source="web")
  finished = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
  # A kill during shard 2: its records and marker are gone, a temp file is left over.
  (out / "shard-00002.array_record").unlink()
  (out / "shard-00002.report.json").unlink()
  (out / ".shard-00002.array_record.123.tmp").write_bytes(b"partial")
  resumed = importers.import_webdataset(shards, out, source="web")
  assert resumed.to_dict() == first.to_dict()
  for name, mtime in finished.items():
    if not name.startswith("shard-00002"):
      assert (out / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
  source = records.read_records(out)
  assert sorted(source[i].key for i in range(len(source))) == sorted(EXPECTED_KEYS)
  with pytest.raises(ValueError, match="use a fresh output folder"):
    importers.import_webdataset(shards[::-1], out, source="web")


def test_two_processes_import_disjoint_shards_that_cover_everything(shards, tmp_path):
  out = tmp_path / "out"
  reports = [importers.import_webdataset(shards, out, source="web", process_index=p,
                                         process_count=2) for p in (1, 0)]
  assert reports[1].shards == ["shard-00000.array_record", "shard-00002.array_record"]
  assert reports[0].shards == ["shard-00001.array_record", "shard-00003.array_record"]
  total = importers.collect_report(out, "web")
  assert total.rejected == EXPECTED_REJECTED and total.kept == len(EXPECTED_KEYS)
  assert total.to_dict() == reports[0].merge(reports[1]).to_dict()
  keys = [records.read_records(out)[i].key for i in range(total.kept)]
  assert sorted(keys) == sorted(EXPECTED_KEYS)
  with pytest.raises(ValueError, match="process_index"):
    importers.import_webdataset(shards, out, source="web", process_index=2, process_count=2)


def _audiocaps(tmp_path: pathlib.Path) -> pathlib.Path:
  wavs = tmp_path / "wavs"
  wavs.mkdir()
  (wavs / "yt0.wav").write_bytes(WAV)
  (wavs / "yt1.wav").write_bytes(WAV)
  (wavs / "yt2.wav").write_bytes(b"RIFF....WAVEfmt broken")
  (wavs / "yt4.wav").write_bytes(WAV)
  (wavs / "yt5.wav").write_bytes(WAV)
  manifest = tmp_path / "audiocaps.csv"
  with manifest.open("w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["audiocap_id", "youtube_id", "caption", "caption_2"])
    writer.writerows([
        ["10", "yt0", "a dog barks", "a dog"],
        ["11", "yt1", "", "rain falls"],  # Falls back to the second caption column.
        ["12", "yt2", "corrupt file", ""],
        ["13", "yt3", "file is missing", ""],
        ["14", "yt4", "", ""],  # No caption at all.
        ["15", "yt5", "too", "many", "fields"],
        ["16", "yt5", "a car passes", ""],
    ])
  return manifest


def test_csv_manifest_import_with_two_processes(tmp_path):
  manifest = _audiocaps(tmp_path)
  spec = ManifestSpec(path_template="wavs/{youtube_id}.wav",
                      caption_columns=("caption", "caption_2"), key_column="audiocap_id")
  out = tmp_path / "out"
  for p in range(2):
    importers.import_manifest(manifest, out, spec, source="audiocaps", license="CC-BY-4.0",
                              rows_per_shard=2, process_index=p, process_count=2)
  total = importers.collect_report(out, "audiocaps")
  assert total.rejected == {"corrupt_audio": 1, "missing_file": 1, "missing_caption": 1,
                            "bad_row": 1}
  assert (total.seen, total.kept) == (7, 3)
  assert len(total.shards) == 4  # ceil(7 rows / 2).
  source = records.read_records(out)
  examples = {source[i].key: source[i] for i in range(len(source))}
  assert sorted(examples) == ["audiocaps/10", "audiocaps/11", "audiocaps/16"]
  dog, rain = examples["audiocaps/10"], examples["audiocaps/11"]
  assert (dog.audio, dog.text, dog.license, dog.metadata["captions"]) == (
      WAV, "a dog barks", "CC-BY-4.0", ["a dog barks", "a dog"])
  assert dog.metadata["origin"] == {"manifest": "audiocaps.csv", "row": 1, "path": "wavs/yt0.wav"}
  assert dog.metadata["row"] == {"audiocap_id": "10", "youtube_id": "yt0"}
  assert rain.text == "rain falls"


def test_jsonl_manifest_import(tmp_path):
  (tmp_path / "clips").mkdir()
  (tmp_path / "clips" / "x.flac").write_bytes(FLAC)
  (tmp_path / "clips" / "y.flac").write_bytes(EMPTY_WAV)
  lines = [
      json.dumps({"id": "x", "audio": "x.flac", "caption": ["a hum", "humming"],
                  "license": "CC0-1.0", "duration": 0.1}),
      "",
      "{broken json",
      json.dumps(["not", "an", "object"]),
      json.dumps({"id": "y", "audio": "y.flac", "caption": "silence"}),
      json.dumps({"id": "z", "audio": "z.mp4", "caption": "a video"}),
      json.dumps({"id": "w", "caption": "no path"}),
  ]
  manifest = tmp_path / "wavcaps.jsonl"
  manifest.write_text("\n".join(lines) + "\n")
  spec = ManifestSpec(path_template="{audio}", caption_columns=("caption",), key_column="id",
                      license_column="license", media_root=str(tmp_path / "clips"))
  report = importers.import_manifest(manifest, tmp_path / "out", spec, source="wavcaps")
  assert report.rejected == {"bad_row": 3, "empty_audio": 1, "unsupported_format": 1}
  assert (report.seen, report.kept) == (6, 1)
  (hum,) = [records.read_records(tmp_path / "out")[0]]
  assert (hum.key, hum.text, hum.license, hum.audio) == ("wavcaps/x", "a hum", "CC0-1.0", FLAC)
  assert hum.metadata["captions"] == ["a hum", "humming"]
  assert hum.metadata["row"]["duration"] == 0.1


@pytest.mark.parametrize("kwargs, match", [
    (dict(path_template="{p}", caption_columns=("c",), modality="text"), "modality must be one of"),
    (dict(path_template="{p}", caption_columns=()), "caption_columns"),
    (dict(path_template="{p}", caption_columns="c"), "caption_columns"),
    (dict(path_template="fixed.wav", caption_columns=("c",)), "path_template"),
])
def test_manifest_spec_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ManifestSpec(**kwargs)


def test_bad_importer_arguments(tmp_path):
  spec = ManifestSpec(path_template="{p}", caption_columns=("c",))
  with pytest.raises(ValueError, match="does not exist"):
    importers.import_manifest(tmp_path / "none.csv", tmp_path / "out", spec, source="s")
  (tmp_path / "m.xml").write_text("<x/>")
  with pytest.raises(ValueError, match="unsupported format"):
    importers.import_manifest(tmp_path / "m.xml", tmp_path / "out", spec, source="s")
  with pytest.raises(ValueError, match="not found"):
    importers.import_webdataset([tmp_path / "none.tar"], tmp_path / "out", source="s")


def _damaged_header(raw: bytes, at: int) -> bytes:
  return raw[:at + 148] + b"garbage!" + raw[at + 156:]  # the member header's checksum field


@pytest.mark.parametrize("damage, reason", [
    (lambda raw: _damaged_header(raw, 2048), "bad member header at byte 2048: invalid header"),
    (lambda raw: raw[:2048] + bytes(512) + raw[2560:], "non-zero bytes after the end-of-archive"),
    (lambda raw: raw[:2048 + 100], "bad member header at byte 2048: truncated header"),
    (lambda raw: raw[:3072], "ends at byte 3072 without its end-of-archive block"),
])
def test_a_damaged_tar_is_counted_not_taken_for_its_end(tmp_path, damage, reason):
  """tarfile stops at a corrupt or cut header as if the archive ended there; the import counts
  the shard as corrupt (and keeps the samples before the damage)."""
  members = [(f"{i:03d}.png", PNG) for i in range(6)]
  path = _tar(tmp_path / "x.tar", [(n, b"x" * 100) for n, _ in members])  # 1 KiB per member
  path.write_bytes(damage(path.read_bytes()))
  report = importers.ImportReport("web")
  keys = [key for key, _ in importers._tar_samples(path, report)]
  assert keys == ["000", "001", "002"][:len(keys)] and len(keys) >= 2
  assert report.rejected == {"corrupt_shard": 1}
  assert reason in report.failures["corrupt_shard"][0]
  intact = _tar(tmp_path / "y.tar", [(n, b"x" * 100) for n, _ in members])
  clean = importers.ImportReport("web")
  assert len(list(importers._tar_samples(intact, clean))) == 6 and clean.rejected == {}
