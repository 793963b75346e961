r"""codi-jax import-data: real paired datasets -> our ArrayRecord shards (+ a report per reason).

  codi-jax import-data --format webdataset --inputs 'laion/{00000..00009}.tar' --out data/laion \
      --name laion400m --license CC-BY-4.0
  codi-jax import-data --format manifest --inputs audiocaps/train.csv --out data/audiocaps \
      --name audiocaps --path_template '{youtube_id}.wav' --caption_columns caption \
      --modality audio --media_root audiocaps/wav

WebDataset tar shards (`jpg`/`png` + `txt`/`json`, `mp4` + `txt`, `flac`/`wav` + `json`) or a
CSV/TSV/JSONL manifest naming local media files (`codi_jax.data.importers`). Every media blob is
decoded once as a check; a record that fails is counted under its reason in the import report
(`report-*.json` beside the shards, merged and printed at the end), never silently dropped.
Re-running into the same --out skips finished shards; several processes (CODI_COORDINATOR, or
--process_index/--process_count) split the input shards between them. Brace ranges
`{00000..00009}` and globs expand.
"""

from __future__ import annotations

import glob
import json
import re

import jax
from absl import flags

from codi_jax.commands import common
from codi_jax.data import importers
from codi_jax.io_utils import atomic_write_json
from codi_jax.modality import Modality

FORMAT = flags.DEFINE_enum("format", None, ["webdataset", "manifest"], "Input format.")
INPUTS = flags.DEFINE_list("inputs", None, "Tar shards (globs, brace ranges) or one manifest.")
OUT = flags.DEFINE_string("out", None, "Output folder of record shards.")
NAME = flags.DEFINE_string("name", None, "Source name stored in every record (e.g. audiocaps).")
LICENSE = flags.DEFINE_string("license", None, "The dataset's licence, if known.")
PATH_TEMPLATE = flags.DEFINE_string("path_template", None,
                                    "Manifest: media path from the row, e.g. '{youtube_id}.wav'.")
CAPTION_COLUMNS = flags.DEFINE_list("caption_columns", None, "Manifest: caption column(s).")
MODALITY = flags.DEFINE_enum("modality", "audio", ["image", "video", "audio"],
                             "Manifest: the media files' modality.")
KEY_COLUMN = flags.DEFINE_string("key_column", None, "Manifest: column with a unique key.")
LICENSE_COLUMN = flags.DEFINE_string("license_column", None, "Manifest: per-row licence column.")
MEDIA_ROOT = flags.DEFINE_string("media_root", None,
                                 "Manifest: folder relative paths resolve against (default: the "
                                 "manifest's folder).")
ROWS_PER_SHARD = flags.DEFINE_integer("rows_per_shard", 1000, "Manifest rows per output shard.",
                                      lower_bound=1)


def _expand(pattern: str) -> list[str]:
  """`a/{000..002}.tar` brace ranges, then globs (sorted); a plain path stays as it is."""
  m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
  if m:
    lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
    return [p for i in range(lo, hi + 1)
            for p in _expand(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():])]
  return sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]


def main(argv: list[str]) -> int:
  del argv
  for flag in (FORMAT, INPUTS, OUT, NAME):
    if not flag.value:
      raise SystemExit(f"codi-jax import-data: --{flag.name} is required")
  index = jax.process_index() if common.PROCESS_INDEX.value is None else common.PROCESS_INDEX.value
  count = jax.process_count() if common.PROCESS_COUNT.value is None else common.PROCESS_COUNT.value
  inputs = [p for pattern in INPUTS.value for p in _expand(pattern)]
  if not inputs:
    raise SystemExit(f"codi-jax import-data: --inputs {INPUTS.value} matches no file")
  kw = dict(source=NAME.value, license=LICENSE.value, process_index=index, process_count=count)
  try:
    if FORMAT.value == "webdataset":
      report = importers.import_webdataset(inputs, OUT.value, **kw)
    else:
      if len(inputs) != 1 or not PATH_TEMPLATE.value or not CAPTION_COLUMNS.value:
        raise SystemExit("codi-jax import-data: --format manifest takes one manifest in --inputs, "
                         "--path_template and --caption_columns")
      spec = importers.ManifestSpec(
          path_template=PATH_TEMPLATE.value, caption_columns=tuple(CAPTION_COLUMNS.value),
          modality=Modality.parse(MODALITY.value), key_column=KEY_COLUMN.value,
          license_column=LICENSE_COLUMN.value, media_root=MEDIA_ROOT.value)
      report = importers.import_manifest(inputs[0], OUT.value, spec,
                                         rows_per_shard=ROWS_PER_SHARD.value, **kw)
  except ValueError as e:
    raise SystemExit(f"codi-jax import-data: {e}") from e
  summary = report.to_dict()
  print(json.dumps(summary, indent=1, sort_keys=True))
  if count > 1:
    print(f"process {index} of {count}; all processes together: "
          f"importers.collect_report({OUT.value!r}, {NAME.value!r})")
  if common.JSON.value:
    atomic_write_json(common.JSON.value, summary)
  return 0
