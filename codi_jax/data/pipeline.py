"""grain input pipelines per training stage: weighted mixtures of paired sources -> fixed-shape
numpy batches, sharded by process, prefetched by worker processes, checkpointable.

A `StageData` names the modalities a stage needs (`STAGE_MODALITIES`), their fixed shapes and a
weighted mixture of sources: `SyntheticSource` (the embedded procedural dataset, no files),
`RecordShards` (our ArrayRecord shards, media decoded with `codi_jax.data.media`) and `TfdsSource`
(a prepared tfds dataset of `codi_jax.data.builders`, read from its folder) and `CacheSource`
(`codi-jax cache` output: latents and condition tokens, for stages whose encoders are frozen).

Order of the pipeline (all `MapDataset`s, so an iterator's state is a few indices):

  source i -> decode (None when the example lacks a needed modality or its media do not decode)
           -> shuffle(seed_i) -> repeat()          each epoch of a source is a fresh permutation
                                                   (of pairs, for minimal-pair synthetic data)
  mix(weights) -> random_map(preprocess)           per global position: crops differ per epoch
  -> [process_index::process_count]                processes split the one global sequence
  -> to_iter_dataset (skips Nones) -> batch(B) -> mp_prefetch(num_workers)

Examples lacking a needed modality are skipped where they are met (a deterministic filter), so a
mixture may list sources that only partly fit a stage (weights then count draws, skipped ones
included). Records whose media fail to decode are skipped with a logged warning. Because the
processes take interleaved positions of one global sequence, together they see every example of a
source's epoch exactly once. With worker processes each worker batches its own slice, so batch order
depends on `num_workers` (still deterministic); a checkpoint restores onto the same `num_workers`.

Batches: `key`/`source`: B strings; `index` int64 [B], each example's position in the global
stream; `image` float32 [B, S, S, 3] and `video` [B, F, S, S, 3] in
[-1, 1]; `audio` float32 [B, L]; `text`: B strings, plus `text_tokens` int32 [B, T] when a
tokenizer is given; from a `CacheSource` instead `<m>_latent` and `<m>_token` float32 [B, ...] of
each modality m. B batch, S image side, F frames, L audio samples, T text tokens.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import pathlib
from collections.abc import Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np

from codi_jax.audio.resample import resample
from codi_jax.data import media, preprocess, records, synthetic
from codi_jax.modality import Modality, _ParsedEnum


class Crop(_ParsedEnum):
  """Where image/video crops and audio windows are taken: the centre/start, or at random."""

  CENTER = "center"
  RANDOM = "random"


STAGE_MODALITIES: dict[str, tuple[Modality, ...]] = {
    "autoencode_image": (Modality.IMAGE,),
    "autoencode_video": (Modality.VIDEO,),
    "autoencode_audio": (Modality.AUDIO,),
    "autoencode_text": (Modality.TEXT,),
    "diffuse_image": (Modality.IMAGE, Modality.TEXT),
    "diffuse_video": (Modality.VIDEO, Modality.TEXT),
    "diffuse_audio": (Modality.AUDIO, Modality.TEXT),
    "diffuse_text": (Modality.TEXT, Modality.IMAGE),
    "latent_align_text_image": (Modality.TEXT, Modality.IMAGE),
    "latent_align_audio_text": (Modality.AUDIO, Modality.TEXT),
    "latent_align_audio_video": (Modality.AUDIO, Modality.VIDEO),
}


class Tokenizer(Protocol):
  """What the pipeline needs of a `codi_jax.text` tokenizer: ids [B, <= length] for B texts.
  Rows shorter than `length` (BertTokenizer pads to the longest text only) are right-padded with
  `pad_id`; CLIPTokenizer's rows always have `length` ids."""

  def encode_batch(self, texts: Sequence[str], length: int) -> np.ndarray: ...


def _fixed_length_ids(tokenizer: Tokenizer, text: str, length: int) -> np.ndarray:
  """int32 [T] ids of one text, cut or padded to T = length."""
  ids = np.asarray(tokenizer.encode_batch([text], length), np.int32)[0, :length]  # [<= T]
  if ids.shape[0] < length:
    pad_id = getattr(tokenizer, "pad_id", None)
    if pad_id is None:
      raise ValueError(f"tokenizer {type(tokenizer).__name__} returned {ids.shape[0]} < "
                       f"{length} ids and has no pad_id to pad with")
    ids = np.pad(ids, (0, length - ids.shape[0]), constant_values=pad_id)
  return ids


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
  """One split of the embedded procedural dataset (every example has all four modalities)."""

  config: synthetic.SyntheticConfig = dataclasses.field(default_factory=synthetic.SyntheticConfig)
  split: str = "train"
  weight: float = 1.0

  def __post_init__(self):
    if self.split not in synthetic.SPLITS:
      raise ValueError(f"SyntheticSource: unknown split {self.split!r}; expected one of "
                       f"{', '.join(synthetic.SPLITS)}")
    _check_weight(self.weight, self.name)

  @property
  def name(self) -> str:
    return f"synthetic/{self.split}"

  @property
  def in_pairs(self) -> bool:
    """Whether examples come as minimal pairs that must stay in one batch."""
    return self.config.minimal_pairs


@dataclasses.dataclass(frozen=True)
class RecordShards:
  """Our ArrayRecord shards: files, folders of them, or glob patterns (expanded and sorted)."""

  paths: tuple[str, ...]
  weight: float = 1.0
  name: str = "records"

  def __post_init__(self):
    if isinstance(self.paths, (str, os.PathLike)):
      raise TypeError("RecordShards: paths must be a sequence of paths or globs, not one string")
    object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
    if not self.paths:
      raise ValueError("RecordShards: no record paths given")
    _check_weight(self.weight, self.name)

  def files(self) -> list[str]:
    """Paths for `records.read_records`, globs expanded in sorted order; raises if a pattern
    matches nothing."""
    found = []
    for pattern in self.paths:
      matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
      if not matches:
        raise ValueError(f"RecordShards {self.name!r}: no files match {pattern!r}")
      found += matches
    return found


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """A split of a prepared `codi_jax.data.builders` dataset, by its folder (the one holding
  `dataset_info.json`, e.g. `<data_dir>/codi_synthetic/default/1.0.0`)."""

  builder_dir: str
  split: str = "train"
  weight: float = 1.0

  def __post_init__(self):
    object.__setattr__(self, "builder_dir", str(self.builder_dir))
    if not os.path.isfile(os.path.join(self.builder_dir, "dataset_info.json")):
      raise ValueError(f"TfdsSource: {self.builder_dir} is not a prepared tfds dataset folder "
                       "(no dataset_info.json)")
    _check_weight(self.weight, self.name)

  @property
  def name(self) -> str:
    dataset = pathlib.Path(self.builder_dir).parents[1].name  # <dataset>/<config>/<version>
    return f"tfds:{dataset}/{self.split}"

  def open(self):
    import tensorflow_datasets as tfds  # only tfds-backed pipelines need it

    from codi_jax.data import builders
    return builders.data_source(tfds.builder_from_directory(self.builder_dir), self.split)


@dataclasses.dataclass(frozen=True)
class CacheSource:
  """`codi-jax cache` output (`codi_jax.data.cache`): per example the frozen encoders' latents
  and condition tokens instead of media. A stage reads `<m>_latent` and `<m>_token` of each of
  its modalities; examples lacking one are skipped."""

  paths: tuple[str, ...]
  weight: float = 1.0
  name: str = "cache"

  def __post_init__(self):
    if isinstance(self.paths, (str, os.PathLike)):
      raise TypeError("CacheSource: paths must be a sequence of folders, files or globs")
    object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
    if not self.paths:
      raise ValueError("CacheSource: no cache paths given")
    _check_weight(self.weight, self.name)

  def open(self):
    from codi_jax.data import cache  # only cache-backed pipelines need the encoders' module

    return cache.CacheReader([f for p in self.paths for f in cache.shard_files(p)])


Source = SyntheticSource | RecordShards | TfdsSource | CacheSource


def _check_weight(weight: float, name: str) -> None:
  if not (isinstance(weight, (int, float)) and np.isfinite(weight) and weight > 0):
    raise ValueError(f"source {name!r}: weight must be a positive finite number, got {weight!r}")


@dataclasses.dataclass(frozen=True)
class StageData:
  """The data one training stage consumes: modalities, their fixed shapes and the sources.

  image_size: side S of images and video frames; num_frames: F; audio_samples: L at
  sample_rate Hz; text_length: T token ids when a tokenizer is used.
  """

  name: str
  modalities: tuple[Modality, ...]
  sources: tuple[Source, ...]
  image_size: int = 32
  num_frames: int = 4
  audio_samples: int = 16000
  sample_rate: int = 16000
  text_length: int = 77
  crop: Crop = Crop.RANDOM

  def __post_init__(self):
    modalities = tuple(Modality.parse(m) for m in self.modalities)
    if not modalities or len(set(modalities)) != len(modalities):
      raise ValueError(f"StageData {self.name!r}: modalities must be non-empty and distinct, "
                       f"got {self.modalities!r}")
    object.__setattr__(self, "modalities", modalities)
    object.__setattr__(self, "crop", Crop.parse(self.crop))
    sources = tuple(self.sources)
    if not sources:
      raise ValueError(f"StageData {self.name!r}: no sources")
    for s in sources:
      if not isinstance(s, (SyntheticSource, RecordShards, TfdsSource, CacheSource)):
        raise TypeError(f"StageData {self.name!r}: unknown source {s!r}")
    object.__setattr__(self, "sources", sources)
    for field in ("image_size", "num_frames", "audio_samples", "sample_rate", "text_length"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"StageData {self.name!r}: {field} must be a positive integer, "
                         f"got {value!r}")

  def needs(self, modality: Modality) -> bool:
    return modality in self.modalities


def stage_data(stage: str, sources: Sequence[Source], **shapes: Any) -> StageData:
  """The `StageData` of a named stage (see `STAGE_MODALITIES`); `shapes` are StageData fields."""
  if stage not in STAGE_MODALITIES:
    raise ValueError(f"unknown stage {stage!r}; expected one of: {', '.join(STAGE_MODALITIES)}")
  return StageData(name=stage, modalities=STAGE_MODALITIES[stage], sources=tuple(sources),
                   **shapes)


# Decoding: a source's examples -> dicts of decoded media (uint8 pixels, float32 audio at the
# stage's sample rate), or None for an example the stage cannot use.



def _resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
  if rate == target:
    return wave
  return np.asarray(resample(wave, rate, target), np.float32)


class _DecodeSynthetic(grain.transforms.Map):
  """SyntheticExample -> dict of the needed modalities, audio resampled to the stage's rate."""

  def __init__(self, spec: StageData, name: str, sample_rate: int):
    self._spec = spec
    self._name = name
    self._rate = sample_rate

  def map(self, example: synthetic.SyntheticExample) -> dict[str, Any]:
    spec, out = self._spec, {"key": example.key, "source": self._name}
    if spec.needs(Modality.TEXT):
      out["text"] = example.text
    if spec.needs(Modality.IMAGE):
      out["image"] = example.image
    if spec.needs(Modality.VIDEO):
      out["video"] = example.video
    if spec.needs(Modality.AUDIO):
      out["audio"] = _resample(example.audio, self._rate, spec.sample_rate)
    return out


class _DecodeRecord(grain.transforms.Map):
  """Example -> decoded dict, or None (logged with the reason) when the stage cannot use it."""

  def __init__(self, spec: StageData, name: str):
    self._spec = spec
    self._name = name

  def map(self, example: records.Example) -> dict[str, Any] | None:
    spec = self._spec
    if not {m.value for m in spec.modalities} <= records.modalities(example):
      return None  # not paired the way this stage needs: skipped by design
    out = {"key": example.key, "source": self._name}
    try:
      if spec.needs(Modality.TEXT):
        out["text"] = example.text
      if spec.needs(Modality.IMAGE):
        out["image"] = media.decode_image(example.image)
      if spec.needs(Modality.VIDEO):
        out["video"] = media.decode_video(example.video, spec.num_frames)
      if spec.needs(Modality.AUDIO):
        out["audio"] = media.decode_audio(example.audio, target_rate=spec.sample_rate)
    except media.MediaError as e:
      logging.warning("data pipeline: skipping %s/%s (%s: %s)", self._name, example.key,
                      e.reason, e)
      return None
    return out


CACHED_SUFFIXES = ("_latent", "_token")  # a cached feature's name: <modality><suffix>


def cache_features(modalities: Sequence[Modality]) -> tuple[str, ...]:
  """The cached features a stage reading `modalities` takes: each one's latent and token."""
  return tuple(f"{m.value}{suffix}" for m in modalities for suffix in CACHED_SUFFIXES)


class _DecodeCache(grain.transforms.Map):
  """Cached record -> {key, source, <m>_latent, <m>_token} as float32, or None when the record
  lacks one of them (that example was cached without the modality)."""

  def __init__(self, spec: StageData, name: str):
    self._features = cache_features(spec.modalities)
    self._name = name

  def map(self, record: dict[str, np.ndarray]) -> dict[str, Any] | None:
    if not all(f in record for f in self._features):
      return None
    return {"key": str(record["key"]), "source": self._name,
            **{f: np.asarray(record[f], np.float32) for f in self._features}}


class _Preprocess(grain.transforms.RandomMap):
  """Decoded dict -> fixed shapes (see the module docstring); tokens when a tokenizer is set."""

  def __init__(self, spec: StageData, tokenizer: Tokenizer | None):
    self._spec = spec
    self._tokenizer = tokenizer

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    spec = self._spec
    rng = rng if spec.crop is Crop.RANDOM else None
    out = {k: v for k, v in element.items() if k.endswith(CACHED_SUFFIXES)}
    out.update(key=element["key"], source=element["source"])
    if "image" in element:
      out["image"] = preprocess.preprocess_image(element["image"], spec.image_size, rng)
    if "video" in element:
      out["video"] = preprocess.preprocess_video(element["video"], spec.image_size,
                                                 spec.num_frames, rng)
    if "audio" in element:
      out["audio"] = preprocess.fit_audio(element["audio"], spec.audio_samples, rng)
    if "text" in element:
      out["text"] = element["text"]
      if self._tokenizer is not None:
        out["text_tokens"] = _fixed_length_ids(self._tokenizer, element["text"],
                                               spec.text_length)  # [T]
    return out


class _ShufflePairs(grain.MapDataset):
  """Shuffles the examples in pairs (2k, 2k+1) that stay next to each other: a batch of an even
  size then holds both members of each pair (`synthetic.SyntheticConfig.minimal_pairs`). Each
  epoch is a fresh permutation of the pairs, as `MapDataset.shuffle` does for examples."""

  def __init__(self, parent: grain.MapDataset, seed: int):
    super().__init__(parent)
    self._pairs = grain.MapDataset.range(len(parent) // 2).shuffle(seed=seed)

  def __len__(self) -> int:
    return 2 * len(self._pairs)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    pair = self._pairs[index // 2] % len(self._pairs)
    return self._parent[2 * pair + index % 2]

  def __str__(self) -> str:
    return "ShufflePairs"


def _shuffled(ds: grain.MapDataset, source: Source, seed: int) -> grain.MapDataset:
  """One epoch of a source in a seeded random order (in pairs for minimal-pair synthetic data)."""
  if isinstance(source, SyntheticSource) and source.in_pairs:
    return _ShufflePairs(ds, seed)
  return ds.shuffle(seed=seed)


def _source_dataset(source: Source, spec: StageData) -> grain.MapDataset:
  """One epoch of a source as decoded dicts (None where the stage cannot use an example)."""
  if isinstance(source, SyntheticSource):
    decode = _DecodeSynthetic(spec, source.name, source.config.sample_rate)
    media = tuple(m.value for m in spec.modalities if m.value in synthetic.MEDIA)
    return grain.MapDataset.source(
        synthetic.SplitSource(source.config, source.split, media)).map(decode)
  if isinstance(source, CacheSource):
    return grain.MapDataset.source(source.open()).map(_DecodeCache(spec, source.name))
  examples = source.open() if isinstance(source, TfdsSource) else records.read_records(
      source.files())
  return grain.MapDataset.source(examples).map(_DecodeRecord(spec, source.name))


def _with_index(index: int, element: dict[str, Any] | None) -> dict[str, Any] | None:
  """Adds the example's position in the global stream (before the process split): training keys
  each example's randomness by it, so results do not depend on how batches are split."""
  return None if element is None else {**element, "index": np.int64(index)}


def _derived_seed(seed: int, *path: int) -> int:
  return int(np.random.SeedSequence([seed, *path]).generate_state(1)[0])


def build_pipeline(spec: StageData, *, batch_size: int, seed: int,
                   process_index: int | None = None, process_count: int | None = None,
                   num_workers: int = 0, worker_buffer_size: int = 2, read_threads: int = 2,
                   tokenizer: Tokenizer | None = None) -> grain.IterDataset:
  """An infinite, deterministic `IterDataset` of this process's batches (see module docstring).

  process_index/process_count default to `jax.process_index()`/`jax.process_count()`.
  num_workers: prefetching worker processes (0: in this process, with `read_threads` threads).
  Iterate with `iter(...)`; the iterator's state is saved with `save_iterator_state`.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  if num_workers < 0 or read_threads <= 0 or worker_buffer_size <= 0:
    raise ValueError(f"need num_workers >= 0, read_threads > 0 and worker_buffer_size > 0, got "
                     f"{num_workers}, {read_threads}, {worker_buffer_size}")
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, process_count), got {process_index} of "
                     f"{process_count}")

  if num_workers > 1 and any(isinstance(s, SyntheticSource) and s.in_pairs
                             for s in spec.sources):
    raise ValueError("minimal pairs stay in one batch only with num_workers <= 1 (each worker "
                     f"batches its own slice of the stream), got {num_workers}")
  parts = []
  for i, source in enumerate(spec.sources):
    ds = _source_dataset(source, spec)
    if len(ds) == 0:
      raise ValueError(f"source {source.name!r} of stage {spec.name!r} is empty")
    parts.append(_shuffled(ds, source, _derived_seed(seed, i)).repeat())
  weights = [s.weight for s in spec.sources]
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  ds = ds.random_map(_Preprocess(spec, tokenizer), seed=_derived_seed(seed, len(parts)))
  ds = ds.map_with_index(_with_index)
  ds = ds[process_index::process_count]
  read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * batch_size)
  it = ds.to_iter_dataset(read).batch(batch_size, drop_remainder=True,
                                      batch_fn=preprocess.collate)
  if num_workers:
    from absl import flags

    # grain reads its absl flags when it starts workers; outside an absl app (tests, notebooks)
    # they are unparsed, and the defaults are what we want.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=worker_buffer_size))
  return it


def save_iterator_state(path: str | os.PathLike, iterator: grain.DatasetIterator, *,
                        overwrite: bool = False) -> pathlib.Path:
  """Writes the iterator's state to the folder `path` with orbax (grain's checkpoint handler):
  written under a temporary name, then renamed, so a crash never leaves a half-written state.
  Call it on every JAX process: each writes its own file into the one folder."""
  import orbax.checkpoint as ocp  # heavy; kept out of the worker processes' imports

  # Orbax syncs the processes, then raises ValueError if `path` exists and not `overwrite`.
  path = pathlib.Path(path).absolute()
  with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as checkpointer:
    checkpointer.save(path, args=grain.checkpoint.CheckpointSave(iterator), force=overwrite)
  return path


def restore_iterator_state(path: str | os.PathLike, iterator: grain.DatasetIterator
                           ) -> grain.DatasetIterator:
  """Sets `iterator` (from the same pipeline) to the state saved at `path`; it then yields
  exactly the batches that followed the save. Returns the iterator."""
  import orbax.checkpoint as ocp

  path = pathlib.Path(path).absolute()
  if not path.is_dir():
    raise ValueError(f"no iterator state at {path}")
  with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as checkpointer:
    return checkpointer.restore(path, args=grain.checkpoint.CheckpointRestore(iterator))
