"""Training batches: the phase's grain pipeline, tokenised on the host, placed on the mesh.

`config.data` picks the source (the embedded synthetic dataset, our record shards, or a prepared
tfds folder) and the fixed shapes; with `config.data.cache` set, the training split of a stage
whose encoders are frozen reads their outputs from `codi-jax cache` shards instead
(`cache_examples` writes them; validation and test examples still come from the source). Each
process reads its own slice of the one global stream (`codi_jax.data.pipeline`) and `place`
assembles the global batch over the mesh's batch axes with
`jax.make_array_from_process_local_data`. Text becomes fixed-length ids for the three text models
here (CLIP `clip_length`, BERT `bert_length`, GPT-2 `gpt2_length` with <BOS>/<EOS>/<PAD>);
strings and keys stay on the host.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping, NamedTuple, Sequence

import grain
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from codi_jax.data import cache, pipeline, synthetic
from codi_jax.modality import Modality
from codi_jax.models.optimus import BOS_ID, EOS_ID, PAD_ID
from codi_jax.parallel.sharding import place_batch
from codi_jax.text import BertTokenizer, CLIPTokenizer, GPT2Tokenizer, vocab_dir
from codi_jax.train import latent_stats
from codi_jax.train.state import init_sources

ARRAY_FIELDS = ("index", "image", "video", "audio", "clip_ids", "bert_ids", "gpt2_ids")


class Tokenizers(NamedTuple):
  clip: CLIPTokenizer
  bert: BertTokenizer
  gpt2: GPT2Tokenizer


def load_tokenizers(directory: str | None) -> Tokenizers:
  """The three vocabularies from one folder (`vocab_dir`: `directory`, $CODI_TOKENIZERS or the
  bundled ones)."""
  d = vocab_dir(directory)
  files = {"clip": d / "clip_bpe_simple_vocab_16e6.txt.gz", "bert": d / "bert-base-cased-vocab.txt",
           "vocab": d / "gpt2-vocab.json", "merges": d / "gpt2-merges.txt"}
  missing = [str(p) for p in files.values() if not p.is_file()]
  if missing:
    raise FileNotFoundError(f"tokenizer files missing: {missing}; point config.data.tokenizers "
                            "at a folder holding the CLIP, BERT and GPT-2 vocabularies")
  return Tokenizers(CLIPTokenizer.from_file(files["clip"]), BertTokenizer.from_file(files["bert"]),
                    GPT2Tokenizer.from_files(files["vocab"], files["merges"]))


def gpt2_ids(tokenizer: GPT2Tokenizer, texts: Sequence[str], length: int) -> np.ndarray:
  """[B, length] int32: <BOS> text <EOS>, cut keeping <EOS> last, padded with <PAD>."""
  out = np.full((len(texts), length), PAD_ID, np.int32)
  for i, text in enumerate(texts):
    ids = [BOS_ID, *tokenizer.encode(text)[:length - 2], EOS_ID]
    out[i, :len(ids)] = ids
  return out


def bert_ids(tokenizer: BertTokenizer, texts: Sequence[str], length: int) -> np.ndarray:
  """[B, length] int32 lower-cased `[CLS] ... [SEP]` ids (CoDi's text-VAE input), 0-padded."""
  out = np.zeros((len(texts), length), np.int32)
  for i, text in enumerate(texts):
    ids = tokenizer.encode(text.lower())
    ids = ids[:length - 1] + [ids[-1]] if len(ids) > length else ids  # keep [SEP]
    out[i, :len(ids)] = ids
  return out


def synthetic_config(config: ml_collections.ConfigDict) -> synthetic.SyntheticConfig:
  """The synthetic dataset a run config trains on (also what `codi-jax cache` encodes)."""
  d = config.data
  return synthetic.SyntheticConfig(
      image_size=max(32, d.image_size), num_frames=d.num_frames,
      audio_seconds=max(0.5, d.audio_samples / 16000), seed=config.seed,
      minimal_pairs=d.minimal_pairs, caption_dropout=d.caption_dropout)


def cache_paths(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """`config.data.cache` as paths (comma-separated; empty: no cache)."""
  return tuple(p.strip() for p in str(config.data.cache).split(",") if p.strip())


def check_cache(config: ml_collections.ConfigDict, params: Mapping[str, Any]) -> None:
  """Refuses a `config.data.cache` that holds something other than what this run's encoders
  (`params`, {part: tree}) compute from its training examples: other input sizes, posterior
  samples instead of the mode, other latent normalisation, other encoder weights
  (`cache.encoder_signature`), or other synthetic examples (its seed, caption dropout, ...)."""
  want = dataclasses.asdict(cache.cache_config_from(config))
  mine = cache.encoder_signature({p: params[p] for p in cache.ENCODERS if p in params})
  folders = {str(pathlib.Path(f).parent) for p in cache_paths(config)
             for f in cache.shard_files(p)}
  for folder in sorted(folders):
    spec = cache.read_spec(folder)
    sizes = spec.get("cache_config", {})
    for field in ("image_size", "num_frames", "audio_frames", "audio_samples", "latent_mode"):
      if sizes.get(field) != want[field]:
        raise ValueError(f"the cache {folder} was made with {field}={sizes.get(field)!r}; this "
                         f"run's training examples need {want[field]!r} (rebuild it with "
                         "`codi-jax cache` and this run's config)")
    for part, (field, _) in latent_stats.LATENT_PARTS.items():
      for name in latent_stats.FIELDS:
        theirs = spec.get("model", {}).get(field, {}).get(name)
        if part in params and (theirs is None or not np.isclose(
            theirs, config.model[field][name], rtol=1e-6)):
          raise ValueError(f"the cache {folder} holds latents with {field}.{name}={theirs}; this "
                           f"run normalises them with {config.model[field][name]} (rebuild it "
                           "with `codi-jax cache --ckpt` on the checkpoints this run starts from)")
    made_from = spec.get("synthetic_config")
    if config.data.source == "synthetic" and made_from is not None:
      mine_data = dataclasses.asdict(synthetic_config(config))
      differ = sorted(k for k in mine_data if made_from.get(k) != mine_data[k])
      if differ:
        raise ValueError(
            f"the cache {folder} holds synthetic examples made with "
            f"{', '.join(f'{k}={made_from.get(k)!r}' for k in differ)}; this run trains on "
            f"{', '.join(f'{k}={mine_data[k]!r}' for k in differ)} (rebuild it with "
            "`codi-jax cache` and this run's config)")
    theirs = spec.get("encoder_signature") or {}
    for part, signature in mine.items():
      if part in theirs and not np.allclose(theirs[part], signature, rtol=1e-4):
        raise ValueError(f"the cache {folder} was made with other {part} weights than this "
                         "run's (their signatures differ); rebuild it with `codi-jax cache "
                         "--ckpt` on the checkpoint this run starts from")
    missing = sorted(set(mine) - set(theirs))
    if missing:
      raise ValueError(f"the cache {folder} records no signature of {missing}: it cannot be "
                       "checked against this run's encoders; rebuild it with `codi-jax cache`")


def cache_examples(run: ml_collections.ConfigDict, ckpt: Sequence[str] | None,
                   source: Sequence[Any], describe: dict[str, Any], out: str | pathlib.Path, *,
                   name: str, seed: int, batch_size: int = 8, limit: int | None = None,
                   shard_size: int = 256, latent: cache.LatentMode = cache.LatentMode.MODE,
                   store_dtype: cache.StoreDtype = cache.StoreDtype.FLOAT32,
                   tokenizers: str | None = None, process_index: int | None = None,
                   process_count: int | None = None, progress: bool = True
                   ) -> cache.CacheSummary:
  """`codi-jax cache`: `source` through the encoders of the checkpoints `ckpt` (random without
  them, for tests), latents normalised as those checkpoints' own (what a run from them
  diffuses), into `out`; the spec records the model config and the encoders' signature, which
  `check_cache` reads. The demo calls it too.
  Raises ValueError on a bad checkpoint, FileNotFoundError on missing vocabularies."""
  if ckpt:
    run = latent_stats.adopt(run, init_sources(list(ckpt)), cache.ENCODERS)
    params = cache.load_encoder_params(run.model, ckpt=list(ckpt))
    weights = "checkpoints " + ", ".join(str(pathlib.Path(d).resolve()) for d in ckpt)
  else:
    logging.warning(
        "cache: no --ckpt, so the encoders have RANDOM weights (seed %d): these latents "
        "and tokens are for testing only, useless for training; pass --ckpt (a converted "
        "checkpoint) for real ones", seed)
    params, weights = cache.load_encoder_params(run.model, seed=seed), "random"
  config = cache.cache_config_from(run, batch_size=batch_size, latent_mode=latent, seed=seed)
  encoders = cache.FrozenEncoders(run.model, params, cache.load_tokenizers(tokenizers), config)
  describe = dict(describe, model=json.loads(run.model.to_json_best_effort()),
                  encoder_weights=weights, encoder_signature=cache.encoder_signature(params))
  if isinstance(source, synthetic.SplitSource):  # what `check_cache` compares with a run's data
    describe["synthetic_config"] = dataclasses.asdict(source.config)
  return cache.build_cache(source, out, encoders, name=name, limit=limit, shard_size=shard_size,
                           store_dtype=store_dtype, describe=describe,
                           process_index=process_index, process_count=process_count,
                           progress=progress)


def sources(config: ml_collections.ConfigDict, split: str = "train") -> list[pipeline.Source]:
  d = config.data
  if split == "train" and cache_paths(config):
    return [pipeline.CacheSource(cache_paths(config))]
  if d.source == "synthetic":
    return [pipeline.SyntheticSource(synthetic_config(config), split=split)]
  if d.source == "records":
    paths = tuple(p.strip() for p in str(d.records).split(",") if p.strip())
    return [pipeline.RecordShards(paths)]
  if d.source == "tfds":
    return [pipeline.TfdsSource(d.tfds_dir, split=split)]
  raise ValueError(f"config.data.source must be synthetic, records or tfds, got {d.source!r}")


def per_process_batch(batch: int) -> int:
  processes = jax.process_count()
  if batch % processes:
    raise ValueError(f"the global batch {batch} does not split over {processes} processes")
  return batch // processes


def build(config: ml_collections.ConfigDict, modalities: Sequence[Modality], seed: int,
          split: str = "train", batch_size: int | None = None) -> grain.IterDataset:
  """This process's infinite stream of global batches of `batch_size` (default
  `config.train.batch_size`) for a phase reading `modalities`."""
  d = config.data
  spec = pipeline.StageData(name="+".join(m.value for m in modalities),
                            modalities=tuple(modalities), sources=tuple(sources(config, split)),
                            image_size=d.image_size, num_frames=d.num_frames,
                            audio_samples=d.audio_samples)
  batch = per_process_batch(batch_size or int(config.train.batch_size))
  return pipeline.build_pipeline(spec, batch_size=batch, seed=seed, num_workers=d.num_workers)


def arrays(batch: Mapping[str, Any], tokenizers: Tokenizers,
           config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The numeric fields of a host batch, text tokenised for every text model."""
  out = {k: np.asarray(v) for k, v in batch.items()
         if k in ARRAY_FIELDS or k.endswith(pipeline.CACHED_SUFFIXES)}
  if "text" in batch:
    texts = list(batch["text"])
    out["clip_ids"] = tokenizers.clip.encode_batch(texts, config.data.clip_length).astype(
        np.int32)
    out["bert_ids"] = bert_ids(tokenizers.bert, texts, config.data.bert_length)
    out["gpt2_ids"] = gpt2_ids(tokenizers.gpt2, texts, config.data.gpt2_length)
  return out


def place(batch: Mapping[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
  """Global arrays over the mesh's batch axes from this process's rows."""
  return place_batch(dict(batch), mesh, rules)


def null_inputs(config: ml_collections.ConfigDict, tokenizers: Tokenizers | None
                ) -> dict[str, np.ndarray]:
  """What the null (unconditional) tokens are encoded from, one row each at the batch's shapes:
  `null_clip_ids` [1, 77] (the empty prompt; zeros without `tokenizers`, where only shapes
  matter), `null_image` [1, S, S, 3] and `null_video` [1, F, S, S, 3] (grey: zeros in [-1, 1]),
  `null_audio` [1, L] (silence)."""
  d = config.data
  ids = (np.zeros((1, 77)) if tokenizers is None else tokenizers.clip.encode_batch([""]))
  return {"null_clip_ids": ids.astype(np.int32),
          "null_image": np.zeros((1, d.image_size, d.image_size, 3), np.float32),
          "null_video": np.zeros((1, d.num_frames, d.image_size, d.image_size, 3), np.float32),
          "null_audio": np.zeros((1, d.audio_samples), np.float32)}
