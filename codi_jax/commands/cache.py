"""codi-jax cache: run the frozen encoders once over a dataset and store latents + condition tokens.

  codi-jax cache --config configs/codi.py:tiny --source synthetic --split train --limit 64
      --out outputs/cache/train
  codi-jax cache --source records --records 'data/laion/*.array_record' --out outputs/cache/laion
      --latent sample --store_dtype float16 --shard_size 1024

Reads the synthetic dataset (generated at the config's image size and frame count) or our record
shards, and writes ArrayRecord shards of per-example features (`codi_jax.data.cache`: image/video/
audio/text latents, CLIP/CLAP condition tokens, caption) plus `cache_spec.json` and
`summary-<process>-of-<count>.json` (counts, failures per reason, seconds). Sizes follow the
config (`config.sample` latent sizes); every flag below overrides one setting. A re-run into the
same --out skips finished shards; run it in several processes (CODI_COORDINATOR, or
--process_index/--process_count) to split the shards between them.

Encoder weights: the image/audio VAEs, Optimus, CLIP and CLAP parts of the checkpoint --ckpt
(`codi-jax convert` output; `checkpoint.load_model` + `cache.load_encoder_params`, checked against
--config). Without --ckpt they are random (seed --seed) and a warning says the cache is for
testing only. Tokenizer vocabularies come from --tokenizers (default $CODI_TOKENIZERS, else
the ones bundled with codi-jax).
"""

from __future__ import annotations

import glob
import json
import pathlib

import jax
from absl import flags, logging

from codi_jax.commands import common
from codi_jax.data import cache, records, synthetic
from codi_jax.io_utils import atomic_write_json


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
CKPT = flags.DEFINE_string("ckpt", None, "Checkpoint directory holding the encoder parts "
                           f"({', '.join(cache.ENCODERS)}); default: random weights, for testing "
                           "only.")


def _source(config, run) -> tuple[object, dict]:
  """The examples to cache and their description for the cache spec."""
  if common.SOURCE.value == "synthetic":
    if common.RECORDS.value:
      raise SystemExit("codi-jax cache: --records is for --source records")
    data = synthetic.SyntheticConfig(image_size=config.image_size, num_frames=config.num_frames,
                                     seed=run.seed)
    return synthetic.SplitSource(data, SPLIT.value), dict(
        source="synthetic", split=SPLIT.value, synthetic_config=repr(data))
  if not common.RECORDS.value:
    raise SystemExit("codi-jax cache: --source records needs --records")
  files = records.record_files([f for pattern in common.RECORDS.value for f in (
      sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern])])
  return records.read_records(files), dict(source="records", records=[str(f) for f in files])


def _encoder_params(model, seed: int) -> tuple[dict, str]:
  """(encoder weights, their description for the cache spec)."""
  if CKPT.value is None:
    logging.warning(
        "codi-jax cache: no --ckpt, so the encoders have RANDOM weights (seed %d): these latents "
        "and tokens are for testing only, useless for training; pass --ckpt (a converted "
        "checkpoint) for real ones", seed)
    return cache.load_encoder_params(model, seed=seed), "random"
  try:
    params = cache.load_encoder_params(model, ckpt=CKPT.value)
  except ValueError as e:
    raise SystemExit(f"codi-jax cache: --ckpt {CKPT.value}: {e}") from None
  return params, f"checkpoint {pathlib.Path(CKPT.value).resolve()}"


def main(argv: list[str]) -> int:
  del argv
  if not OUT.value:
    raise SystemExit("codi-jax cache: --out DIR is required")
  run = common.CONFIG.value
  seed = run.seed if common.SEED.value is None else common.SEED.value
  config = cache.cache_config_from(run, batch_size=BATCH_SIZE.value, latent_mode=LATENT.value,
                                   seed=seed)
  try:
    source, describe = _source(config, run)
    tokenizers = cache.load_tokenizers(TOKENIZERS.value)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"codi-jax cache: {e}") from None
  params, weights = _encoder_params(run.model, seed)
  encoders = cache.FrozenEncoders(run.model, params, tokenizers, config)
  describe.update(model=json.loads(run.model.to_json_best_effort()), encoder_weights=weights)
  name = NAME.value or (SPLIT.value if common.SOURCE.value == "synthetic" else "records")
  summary = cache.build_cache(source, OUT.value, encoders, name=name, limit=LIMIT.value,
                              shard_size=SHARD_SIZE.value, store_dtype=STORE_DTYPE.value,
                              describe=describe, process_index=common.PROCESS_INDEX.value,
                              process_count=common.PROCESS_COUNT.value,
                              progress=jax.process_index() == 0)
  if common.JSON.value:
    atomic_write_json(common.JSON.value, summary.as_json())
  failures = ", ".join(f"{k} {v}" for k, v in sorted(summary.failures.items())) or "none"
  print(f"cache {name}: {summary.written} records written, {summary.dropped} dropped, "
        f"{summary.shards_written} shards written, {summary.shards_skipped} already done; "
        f"failures: {failures}; {summary.seconds:.1f}s -> {pathlib.Path(OUT.value).resolve()}")
  return 0
