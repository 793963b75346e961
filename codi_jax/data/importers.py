"""Importers from real-data layouts into our record shards (`codi_jax.data.records`).

Two layouts:
- WebDataset tar shards: consecutive members sharing a key form one sample, e.g. LAION-style
  `000123.jpg` + `000123.txt`/`.json`, WebVid-style `.mp4` + `.txt`, audio `.flac`/`.wav` + `.json`
  caption.
- CSV/JSONL manifests (AudioCaps/WavCaps-style): one row per example, a path to a local media file
  (a template over the row's columns) and one or more caption columns.

Every input record ends up either kept or rejected with a `FailureReason`; the counts (and a few
examples per reason) go into an `ImportReport`, so a malformed record never crashes an import and
never vanishes unaccounted. Media are kept as the original bytes after a full trial decode.

Work is split into numbered output shards (one per tar shard, or per block of manifest rows).
Process p of P takes the shards whose number is p mod P. A shard is written atomically and then
marked finished by its report sidecar, so a re-run skips finished shards and a killed import loses
at most the shard in flight.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import pathlib
import posixpath
import string
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from codi_jax.data import media
from codi_jax.data.media import FailureReason, MediaError
from codi_jax.data.records import RECORD_SUFFIX, Example, write_records
from codi_jax.io_utils import atomic_write_json
from codi_jax.modality import Modality

MEDIA_EXTENSIONS = {
    Modality.IMAGE: ("jpg", "jpeg", "png", "webp"),
    Modality.VIDEO: ("mp4", "webm", "mkv", "mov", "avi"),
    Modality.AUDIO: ("flac", "wav", "mp3", "ogg"),
}
TEXT_EXTENSIONS = ("txt", "text", "caption")
CAPTION_KEYS = ("caption", "text", "captions")
LICENSE_KEYS = ("license", "LICENSE", "licence")
MAX_FAILURE_SAMPLES = 5
SIDECAR_SUFFIX = ".report.json"

_DECODERS: dict[Modality, Callable[[bytes], Any]] = {
    Modality.IMAGE: media.decode_image,
    Modality.VIDEO: media.decode_video,
    Modality.AUDIO: lambda data: media.decode_audio(data, target_rate=None),
}


@dataclasses.dataclass
class ImportReport:
  """Counts of one import: seen == kept + sum(rejected.values()).

  rejected: records dropped, per `FailureReason` value. ignored_members: tar members left out of
  kept samples (no extension, a repeated extension, an unknown one), per extension.
  failures: up to MAX_FAILURE_SAMPLES "key: message" lines per reason, for debugging.
  """

  source: str
  seen: int = 0
  kept: int = 0
  rejected: dict[str, int] = dataclasses.field(default_factory=dict)
  ignored_members: dict[str, int] = dataclasses.field(default_factory=dict)
  failures: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  shards: list[str] = dataclasses.field(default_factory=list)

  def keep(self) -> None:
    self.seen += 1
    self.kept += 1

  def reject(self, reason: str, key: str, message: str) -> None:
    reason = FailureReason(reason).value
    self.seen += 1
    self.rejected[reason] = self.rejected.get(reason, 0) + 1
    samples = self.failures.setdefault(reason, [])
    if len(samples) < MAX_FAILURE_SAMPLES:
      samples.append(f"{key}: {message}")
    logging.debug("rejected %s (%s): %s", key, reason, message)

  def ignore(self, extension: str) -> None:
    self.ignored_members[extension] = self.ignored_members.get(extension, 0) + 1

  def merge(self, other: ImportReport) -> ImportReport:
    """A new report adding `other`'s counts to this one's."""
    if other.source != self.source:
      raise ValueError(f"cannot merge reports of sources {self.source!r} and {other.source!r}")
    merged = ImportReport.from_dict(self.to_dict())
    merged.seen += other.seen
    merged.kept += other.kept
    for reason, count in other.rejected.items():
      merged.rejected[reason] = merged.rejected.get(reason, 0) + count
    for ext, count in other.ignored_members.items():
      merged.ignored_members[ext] = merged.ignored_members.get(ext, 0) + count
    for reason, samples in other.failures.items():
      mine = merged.failures.setdefault(reason, [])
      mine.extend(samples[:MAX_FAILURE_SAMPLES - len(mine)])
    merged.shards = sorted(set(merged.shards) | set(other.shards))
    return merged

  def check(self) -> None:
    """Raises if some record is neither kept nor rejected."""
    if self.seen != self.kept + sum(self.rejected.values()):
      raise ValueError(f"import report does not add up: seen {self.seen} != kept {self.kept} + "
                       f"rejected {sum(self.rejected.values())}")

  def to_dict(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_dict(cls, data: dict) -> ImportReport:
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in fields})


def report_path(out_dir: str | os.PathLike, process_index: int, process_count: int) -> pathlib.Path:
  """Where process `process_index` writes the report of the shards it owns."""
  return pathlib.Path(out_dir) / f"import_report-{process_index:05d}-of-{process_count:05d}.json"


def collect_report(out_dir: str | os.PathLike, source: str) -> ImportReport:
  """The report of every finished shard in `out_dir`, whichever process wrote it."""
  report = ImportReport(source=source)
  for sidecar in sorted(pathlib.Path(out_dir).glob(f"shard-*{SIDECAR_SUFFIX}")):
    report = report.merge(ImportReport.from_dict(json.loads(sidecar.read_text())))
  report.check()
  return report


# ------------------------------------------------------------------------------- shard machinery


@dataclasses.dataclass(frozen=True)
class _ShardTask:
  index: int
  input_name: str  # Identifies the input, so a resumed import with other inputs is caught.
  examples: Callable[[ImportReport], Iterator[Example]]


def _check_process(process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, process_count), got {process_index} of "
                     f"{process_count}")


def _unique_keys(examples: Iterator[Example], report: ImportReport) -> Iterator[Example]:
  seen = set()
  for example in examples:
    if example.key in seen:
      report.reject(FailureReason.DUPLICATE_KEY, example.key, "key already used in this shard")
      continue
    seen.add(example.key)
    report.keep()
    yield example


def _run_shards(tasks: Sequence[_ShardTask], out_dir: str | os.PathLike, source: str,
                process_index: int, process_count: int) -> ImportReport:
  _check_process(process_index, process_count)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  total = ImportReport(source=source)
  for task in tasks:
    if task.index % process_count != process_index:
      continue
    name = f"shard-{task.index:05d}"
    shard, sidecar = out_dir / f"{name}{RECORD_SUFFIX}", out_dir / f"{name}{SIDECAR_SUFFIX}"
    if sidecar.exists() and shard.exists():
      done = json.loads(sidecar.read_text())
      if done.get("input") != task.input_name:
        raise ValueError(f"{sidecar} was imported from {done.get('input')!r}, not "
                         f"{task.input_name!r}: use a fresh output folder for other inputs")
      logging.info("skipping finished shard %s", shard)
      total = total.merge(ImportReport.from_dict(done))
      continue
    report = ImportReport(source=source, shards=[shard.name])
    write_records(shard, _unique_keys(task.examples(report), report))
    report.check()
    # The sidecar is the completion marker: written only once the shard is in place.
    atomic_write_json(sidecar, {**report.to_dict(), "input": task.input_name})
    logging.info("%s: kept %d of %d (%s)", shard, report.kept, report.seen, report.rejected)
    total = total.merge(report)
  atomic_write_json(report_path(out_dir, process_index, process_count), total.to_dict())
  return total


# ---------------------------------------------------------------------------------- shared rules


def _captions(value: Any) -> list[str]:
  """A caption field (str or list of str) -> its non-blank captions, stripped."""
  values = value if isinstance(value, list) else [value]
  return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def _verified(modality: Modality, data: bytes) -> bytes:
  _DECODERS[modality](data)  # Raises MediaError with the reason when undecodable.
  return data


def _extension(name: str) -> str:
  return name.rsplit(".", 1)[-1].lower() if "." in name else ""


# ------------------------------------------------------------------------------------ webdataset


class _StrictTarInfo(tarfile.TarInfo):
  """Python's tarfile takes a corrupt or cut member header, or a file that stops between members,
  for the end of the archive and drops the rest silently; this raises instead (as the one header
  error tarfile does not swallow)."""

  @classmethod
  def fromtarfile(cls, tar):
    try:
      return super().fromtarfile(tar)
    except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as e:
      raise tarfile.SubsequentHeaderError(f"bad member header at byte {tar.offset}: {e}") from e
    except tarfile.EmptyHeaderError:
      raise tarfile.SubsequentHeaderError(f"the archive ends at byte {tar.offset} without its "
                                          "end-of-archive block (truncated)") from None


def _nonzero_tail(tar: tarfile.TarFile) -> int:
  """Bytes that are not zero after the block tarfile read as the end of the archive (a member
  header that was zeroed leaves the members after it there)."""
  count = 0
  for chunk in iter(lambda: tar.fileobj.read(1 << 20), b""):
    count += len(chunk) - chunk.count(0)
  return count


def _tar_samples(path: pathlib.Path,
                 report: ImportReport) -> Iterator[tuple[str, dict[str, bytes]]]:
  """(key, {extension: bytes}) for runs of consecutive members sharing a key. An archive that
  cannot be read to its end is counted as a corrupt shard; the samples before the damage stay."""
  key, members = None, {}
  try:
    with tarfile.open(path, mode="r|*", tarinfo=_StrictTarInfo) as tar:
      for info in tar:
        if not info.isfile():
          continue
        dirname, base = posixpath.split(info.name)
        if "." not in base.lstrip("."):
          report.ignore("(none)")
          continue
        stem, ext = base.split(".", 1)
        member_key = posixpath.join(dirname, stem)
        data = tar.extractfile(info).read()
        if member_key != key:
          if key is not None:
            yield key, members
          key, members = member_key, {}
        if ext.lower() in members:
          report.ignore(ext.lower())
          continue
        members[ext.lower()] = data
      tail = _nonzero_tail(tar)
      if tail:
        raise tarfile.ReadError(f"{tail} non-zero bytes after the end-of-archive block")
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    report.reject(FailureReason.CORRUPT_SHARD, path.name,
                  f"unreadable after key {key!r}: {e or type(e).__name__}")
  if key is not None:
    yield key, members


def _webdataset_example(key: str, members: dict[str, bytes], source: str, license: str | None,
                        shard_name: str, report: ImportReport) -> Example:
  blobs: dict[Modality, bytes] = {}
  texts, meta, unknown = [], None, []
  for ext, data in members.items():
    modality = next((m for m, exts in MEDIA_EXTENSIONS.items() if ext in exts), None)
    if modality is not None and modality not in blobs:
      blobs[modality] = data
    elif ext in TEXT_EXTENSIONS and not texts:
      try:
        texts = _captions(data.decode("utf-8"))
      except UnicodeDecodeError:
        raise MediaError(FailureReason.BAD_METADATA, f".{ext} caption is not UTF-8") from None
    elif ext == "json" and meta is None:
      try:
        meta = json.loads(data)
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MediaError(FailureReason.BAD_METADATA, f"invalid .json: {e}") from None
      if not isinstance(meta, dict):
        raise MediaError(FailureReason.BAD_METADATA, ".json is not an object")
    else:
      unknown.append(ext)
  if not blobs:
    if unknown:
      raise MediaError(FailureReason.UNSUPPORTED_FORMAT, f"no supported media in {sorted(members)}")
    raise MediaError(FailureReason.MISSING_MEDIA, f"no media in {sorted(members)}")
  meta = meta or {}
  if not texts:
    texts = next((_captions(meta[k]) for k in CAPTION_KEYS if _captions(meta.get(k))), [])
  if not texts:
    raise MediaError(FailureReason.MISSING_CAPTION, f"no caption in {sorted(members)}")
  record_license = next((meta[k] for k in LICENSE_KEYS if isinstance(meta.get(k), str)
                         and meta[k].strip()), license)
  metadata = {"origin": {"shard": shard_name, "key": key}, "json": meta}
  if len(texts) > 1:
    metadata["captions"] = texts
  # Shard-qualified: WebDataset keys need only be unique within their shard.
  example = Example(key=f"{source}/{pathlib.PurePath(shard_name).stem}/{key}", source=source,
                    license=record_license, text=texts[0], metadata=metadata,
                    **{m.value: _verified(m, data) for m, data in blobs.items()})
  for ext in unknown:  # Counted only for kept samples: a rejected one is reported whole.
    report.ignore(ext)
  return example


def _webdataset_shard(path: pathlib.Path, source: str, license: str | None,
                      report: ImportReport) -> Iterator[Example]:
  for key, members in _tar_samples(path, report):
    try:
      yield _webdataset_example(key, members, source, license, path.name, report)
    except MediaError as e:
      report.reject(e.reason, f"{path.name}/{key}", str(e))


def import_webdataset(shards: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                      source: str, license: str | None = None, process_index: int = 0,
                      process_count: int = 1) -> ImportReport:
  """Imports WebDataset tar shards into `out_dir/shard-NNNNN.array_record` (one per input shard).

  license: the dataset's licence, overridden by a sample's own `license` json field.
  Returns this process's report (also written to `report_path(out_dir, ...)`).
  """
  paths = [pathlib.Path(s) for s in shards]
  if not paths:
    raise ValueError("import_webdataset: no input shards given")
  missing = [str(p) for p in paths if not p.is_file()]
  if missing:
    raise ValueError(f"import_webdataset: input shards not found: {missing}")
  tasks = [_ShardTask(i, p.name, lambda report, p=p: _webdataset_shard(p, source, license, report))
           for i, p in enumerate(paths)]
  return _run_shards(tasks, out_dir, source, process_index, process_count)


# ------------------------------------------------------------------------------------- manifests


@dataclasses.dataclass(frozen=True)
class ManifestSpec:
  """How to read one CSV/JSONL manifest.

  path_template: the media file's path as a format string over the row's columns, e.g.
    "{file_name}" or "{youtube_id}.wav"; relative paths resolve against media_root (default: the
    manifest's folder).
  caption_columns: the first non-blank one is the caption; all are kept in metadata. A JSONL
    value may be a list of captions.
  """

  path_template: str
  caption_columns: tuple[str, ...]
  modality: Modality = Modality.AUDIO
  key_column: str | None = None
  license_column: str | None = None
  media_root: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "modality", Modality.parse(self.modality))
    if self.modality not in MEDIA_EXTENSIONS:
      raise ValueError(f"ManifestSpec.modality must be one of "
                       f"{[m.value for m in MEDIA_EXTENSIONS]}, got {self.modality.value!r}")
    if isinstance(self.caption_columns, str) or not self.caption_columns \
        or not all(isinstance(c, str) and c for c in self.caption_columns):
      raise ValueError(f"ManifestSpec.caption_columns must be a non-empty tuple of column names, "
                       f"got {self.caption_columns!r}")
    object.__setattr__(self, "caption_columns", tuple(self.caption_columns))
    fields = [f for _, f, _, _ in string.Formatter().parse(self.path_template) if f is not None]
    if not fields or not all(f.isidentifier() for f in fields):
      raise ValueError(f"ManifestSpec.path_template must name columns like '{{path}}', got "
                       f"{self.path_template!r}")

  @property
  def template_columns(self) -> tuple[str, ...]:
    return tuple(f for _, f, _, _ in string.Formatter().parse(self.path_template) if f)


_Row = tuple[int, dict | MediaError]  # (1-based line or row number, the row or why it is bad)


def _manifest_rows(path: pathlib.Path) -> list[_Row]:
  suffix = path.suffix.lower()
  if suffix == ".jsonl":
    rows = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        rows.append((number, MediaError(FailureReason.BAD_ROW, f"invalid JSON: {e}")))
        continue
      rows.append((number, row if isinstance(row, dict) else
                   MediaError(FailureReason.BAD_ROW, "line is not a JSON object")))
    return rows
  if suffix in (".csv", ".tsv"):
    try:
      text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"manifest {path} is not UTF-8: {e}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""),
                            delimiter="\t" if suffix == ".tsv" else ",")
    rows = []
    for number, row in enumerate(reader, start=1):
      if None in row or None in row.values():
        rows.append((number, MediaError(FailureReason.BAD_ROW,
                                        f"expected {len(reader.fieldnames)} fields")))
      else:
        rows.append((number, row))
    return rows
  raise ValueError(f"manifest {path}: unsupported format {suffix!r} (use .csv, .tsv or .jsonl)")


def _manifest_example(number: int, row: dict, spec: ManifestSpec, root: pathlib.Path,
                      manifest: pathlib.Path, source: str, license: str | None) -> Example:
  try:
    relative = spec.path_template.format(**{c: row[c] for c in spec.template_columns})
  except KeyError as e:
    raise MediaError(FailureReason.BAD_ROW, f"missing column {e}") from None
  if not all(isinstance(row[c], (str, int)) and str(row[c]).strip()
             for c in spec.template_columns):
    raise MediaError(FailureReason.BAD_ROW, f"empty media path column in {spec.path_template!r}")
  if _extension(relative) not in MEDIA_EXTENSIONS[spec.modality]:
    raise MediaError(FailureReason.UNSUPPORTED_FORMAT, f"{relative!r} is not a "
                     f"{spec.modality.value} file ({', '.join(MEDIA_EXTENSIONS[spec.modality])})")
  texts = [t for c in spec.caption_columns for t in _captions(row.get(c))]
  if not texts:
    raise MediaError(FailureReason.MISSING_CAPTION, f"no caption in {spec.caption_columns}")
  file = root / relative
  if not file.is_file():
    raise MediaError(FailureReason.MISSING_FILE, f"{file} does not exist")
  data = _verified(spec.modality, file.read_bytes())
  if spec.key_column is not None:
    if not str(row.get(spec.key_column, "")).strip():
      raise MediaError(FailureReason.BAD_ROW, f"empty key column {spec.key_column!r}")
    key = str(row[spec.key_column]).strip()
  else:
    key = f"{manifest.stem}-{number}"
  record_license = license
  if spec.license_column is not None and isinstance(row.get(spec.license_column), str) \
      and row[spec.license_column].strip():
    record_license = row[spec.license_column].strip()
  metadata = {"origin": {"manifest": manifest.name, "row": number, "path": relative},
              "row": {k: v for k, v in row.items() if k not in spec.caption_columns}}
  if len(texts) > 1:
    metadata["captions"] = texts
  return Example(key=f"{source}/{key}", source=source, license=record_license, text=texts[0],
                 metadata=metadata, **{spec.modality.value: data})


def _manifest_shard(rows: Sequence[_Row], spec: ManifestSpec, root: pathlib.Path,
                    manifest: pathlib.Path, source: str, license: str | None,
                    report: ImportReport) -> Iterator[Example]:
  for number, row in rows:
    try:
      if isinstance(row, MediaError):
        raise row
      yield _manifest_example(number, row, spec, root, manifest, source, license)
    except MediaError as e:
      report.reject(e.reason, f"{manifest.name}:{number}", str(e))


def import_manifest(manifest: str | os.PathLike, out_dir: str | os.PathLike, spec: ManifestSpec,
                    *, source: str, license: str | None = None, rows_per_shard: int = 1000,
                    process_index: int = 0, process_count: int = 1) -> ImportReport:
  """Imports a CSV/TSV/JSONL manifest into `out_dir/shard-NNNNN.array_record`, one per block of
  `rows_per_shard` rows. Returns this process's report (also written next to the shards).
  """
  manifest = pathlib.Path(manifest)
  if not manifest.is_file():
    raise ValueError(f"manifest {manifest} does not exist")
  if rows_per_shard < 1:
    raise ValueError(f"rows_per_shard must be positive, got {rows_per_shard}")
  root = pathlib.Path(spec.media_root) if spec.media_root is not None else manifest.parent
  rows = _manifest_rows(manifest)
  blocks = [rows[i:i + rows_per_shard] for i in range(0, len(rows), rows_per_shard)]
  tasks = [
      _ShardTask(i, f"{manifest.name}[{i * rows_per_shard}:{i * rows_per_shard + len(block)}]",
                 lambda report, block=block: _manifest_shard(block, spec, root, manifest, source,
                                                             license, report))
      for i, block in enumerate(blocks)]
  return _run_shards(tasks, out_dir, source, process_index, process_count)
