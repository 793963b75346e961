"""codi-jax cache: run the frozen encoders once over a dataset and store latents + condition tokens.

  codi-jax cache --config configs/codi.py:tiny --source synthetic --split train --limit 64
      --out outputs/cache/train
  codi-jax cache --source records --records 'data/laion/*.array_record' --out outputs/cache/laion
      --latent sample --store_dtype float16 --shard_size 1024

Reads the synthetic dataset (the examples a training run of --config reads) or our record
shards, and writes ArrayRecord shards of per-example features (`codi_jax.data.cache`: image/video/
audio/text latents, CLIP/CLAP condition tokens, caption) plus `cache_spec.json` and
`summary-<process>-of-<count>.json` (counts, failures per reason, seconds). Sizes follow the
config (`config.sample` latent sizes); every flag below overrides one setting. A re-run into the
same --out skips finished shards; run it in several processes (CODI_COORDINATOR, or
--process_index/--process_count) to split the shards between them.

Encoder weights: the image/audio VAEs, Optimus, CLIP and CLAP parts of the checkpoints --ckpt
(`codi-jax convert` or training output, e.g. the autoencoders' and align_encoders' models;
`cache.load_encoder_params`, checked against --config), with their latent normalisation. A
training run reads the cache with --config.data.cache=DIR, for its diffusion and latent-alignment
stages (it refuses a cache made with other weights, sizes or normalisation). Without --ckpt the
encoders are random (seed --seed) and a warning says the cache is for testing only. Tokenizer
vocabularies come from --tokenizers (default $CODI_TOKENIZERS, else the ones bundled with
codi-jax).
"""

from __future__ import annotations

import glob
import json
import pathlib

import jax
from absl import flags

from codi_jax.commands import common
from codi_jax.data import cache, records, synthetic
from codi_jax.io_utils import atomic_write_json
from codi_jax.train import data as train_data


SPLIT = flags.DEFINE_enum("split", "train", list(synthetic.SPLITS),
                          "Synthetic split (--source synthetic).")
LIMIT = flags.DEFINE_integer("limit", None, "Cache only the first N examples (default: all).")
OUT = flags.DEFINE_string("out", None, "Output folder of the cache shards (required).")
NAME = flags.DEFINE_string("name", None, "Shard file prefix (default: the split, or 'records').")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Examples per encoder call.")
SHARD_SIZE = flags.DEFINE_integer("shard_size", 256, "Examples per output shard.")
LATENT = flags.DEFINE_enum_class("latent", cache.LatentMode.MODE, cache.LatentMode,
                                 "VAE latents: the posterior mode or one sample per example.")
STORE_DTYPE = flags.DEFINE_enum_class("store_dtype", cache.StoreDtype.FLOAT32, cache.StoreDtype,
                                      "Storage dtype of latents and tokens (computed in fp32).")
TOKENIZERS = flags.DEFINE_string("tokenizers", None, common.TOKENIZERS_HELP)
CKPT = flags.DEFINE_list("ckpt", None, "Checkpoint directories holding the encoder parts "
                         f"({', '.join(cache.ENCODERS)}), comma-separated (each part from the "
                         "last one holding it, as a training run's init_from); default: random "
                         "weights, for testing only.")


def _source(run) -> tuple[object, dict]:
  """The examples to cache and their description for the cache spec."""
  if common.SOURCE.value == "synthetic":
    if common.RECORDS.value:
      raise SystemExit("codi-jax cache: --records is for --source records")
    data = train_data.synthetic_config(run)  # the examples training reads
    return synthetic.SplitSource(data, SPLIT.value), dict(source="synthetic", split=SPLIT.value)
  if not common.RECORDS.value:
    raise SystemExit("codi-jax cache: --source records needs --records")
  files = records.record_files([f for pattern in common.RECORDS.value for f in (
      sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern])])
  return records.read_records(files), dict(source="records", records=[str(f) for f in files])


def main(argv: list[str]) -> int:
  del argv
  if not OUT.value:
    raise SystemExit("codi-jax cache: --out DIR is required")
  run = common.CONFIG.value
  seed = run.seed if common.SEED.value is None else common.SEED.value
  name = NAME.value or (SPLIT.value if common.SOURCE.value == "synthetic" else "records")
  try:
    source, describe = _source(run)
    summary = train_data.cache_examples(run, CKPT.value, source, describe, OUT.value,
                                        name=name, seed=seed,
                                        batch_size=BATCH_SIZE.value, limit=LIMIT.value,
                                        shard_size=SHARD_SIZE.value, latent=LATENT.value,
                                        store_dtype=STORE_DTYPE.value,
                                        tokenizers=TOKENIZERS.value,
                                        process_index=common.PROCESS_INDEX.value,
                                        process_count=common.PROCESS_COUNT.value,
                                        progress=jax.process_index() == 0)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"codi-jax cache: {e}") from None
  if common.JSON.value:
    atomic_write_json(common.JSON.value, summary.as_json())
  failures = ", ".join(f"{k} {v}" for k, v in sorted(summary.failures.items())) or "none"
  print(f"cache {name}: {summary.written} records written, {summary.dropped} dropped, "
        f"{summary.shards_written} shards written, {summary.shards_skipped} already done; "
        f"failures: {failures}; {summary.seconds:.1f}s -> {pathlib.Path(OUT.value).resolve()}")
  return 0
