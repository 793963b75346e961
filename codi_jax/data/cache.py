"""Latent/condition cache: CoDi's frozen encoders run once over a dataset, results on disk.

Training the diffusers never changes the VAEs, Optimus, CLIP or CLAP (CODI_REFERENCE §1), so their
outputs can be computed once. `build_cache` reads a random-access source of examples (our record
shards, `records.read_records`, or the synthetic dataset, `synthetic.SplitSource`), preprocesses
each modality as training does, runs the encoders batched and jitted (fixed batch shapes: one
compile per modality and shape) and writes ArrayRecord shards of one feature record per example:

  key, source                  0-d strings
  caption                      0-d string (when the example has text)
  image_latent [h, w, 4]       image VAE latent of the image (scaled, as the diffuser sees it)
  video_latent [F, h, w, 4]    the same per sampled frame
  audio_latent [t, m, 8]       audio VAE latent of the clip's log-mel fbank
  text_latent  [Z]             Optimus latent of the caption (mu * 4.3108)
  text_token, image_token, video_token, audio_token [D]
                               unit-norm condition tokens (CLIP text / vision / video, CLAP)

Latents are the posterior mode or, with `LatentMode.SAMPLE`, one posterior sample whose noise
comes from `example_rng(seed, key, modality)`: the same whatever the batching or process split.
Media that cannot be decoded or used (a corrupt image, empty audio, an empty caption) drops that
modality from the example and is counted per reason; an example left with nothing is not
written. Output shards hold consecutive source indices (`shard_size` each, so the layout is the
same for any number of processes); process p of P writes shards p, p + P, ...; a shard whose
summary sidecar exists is finished and skipped on a re-run, and every file is written atomically.

Shapes: B batch, S image side, F frames, T samples (16 kHz), Z text latent, D condition width.
"""

from __future__ import annotations

import dataclasses
import enum
import glob
import hashlib
import json
import logging
import os
import pathlib
import time
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from array_record.python import array_record_data_source, array_record_module
from tqdm import tqdm

from codi_jax import checkpoint, components
from codi_jax.audio.mel import FRAMES_PER_SECOND, HOP, SAMPLE_RATE
from codi_jax.data import media, preprocess, records, synthetic
from codi_jax.io_utils import array_bytes, atomic_write_json, read_array_bytes, temp_file
from codi_jax.modality import Modality
from codi_jax.models import autoencoder, optimus
from codi_jax.models.clap import clap_encode_audio
from codi_jax.models.clip import FrozenCLIP
from codi_jax.text import BertTokenizer, CLIPTokenizer, vocab_dir
from codi_jax.text.wordpiece import MAX_LENGTH as BERT_MAX_TOKENS

PyTree = Any

# The encoders the cache runs, by their `components` names.
ENCODERS = ("autokl", "audioldm_vae", "optimus", "clip", "clap")
SHARD_SUFFIX = ".array_record"
SIDECAR_SUFFIX = ".summary.json"
SPEC_FILE = "cache_spec.json"
_MODALITY_SALT = {Modality.IMAGE: 0, Modality.VIDEO: 1, Modality.AUDIO: 2}


class LatentMode(str, enum.Enum):
  MODE = "mode"  # posterior mean: deterministic
  SAMPLE = "sample"  # one posterior sample per example, noise from `example_rng`


class StoreDtype(str, enum.Enum):
  FLOAT16 = "float16"
  FLOAT32 = "float32"


@dataclasses.dataclass(frozen=True)
class CacheConfig:
  """What the encoders compute (input sizes, latent mode, seed) and their batch size."""

  image_size: int = 256  # square side the image VAE sees (f8 -> latent side / 8)
  num_frames: int = 8  # frames sampled evenly from each video
  audio_frames: int = 1024  # AudioLDM fbank frames (160 samples each at 16 kHz)
  # 16 kHz samples each clip is cropped or zero-padded to (None: the fbank's span, frames x 160;
  # a training run's cache takes its `config.data.audio_samples`).
  audio_samples: int | None = None
  batch_size: int = 8
  latent_mode: LatentMode = LatentMode.MODE
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "latent_mode", LatentMode(self.latent_mode))
    if self.audio_samples is None:
      object.__setattr__(self, "audio_samples", self.audio_frames * HOP)
    for name in ("image_size", "num_frames", "audio_frames", "audio_samples", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"CacheConfig.{name} must be positive, got {getattr(self, name)}")

  @property
  def audio_time(self) -> float:
    """`time` argument of `autoencoder.encode_audio` giving `audio_frames` frames (half a frame
    of slack so the original's `int(time * 102.4)` cannot round down)."""
    return (self.audio_frames + 0.5) / FRAMES_PER_SECOND


def cache_config_from(config: Any, **overrides: Any) -> CacheConfig:
  """The cache settings of a run config (`configs/codi.py`): the VAE input sizes that give the
  diffusers' latent sizes (`config.sample`), clips of the training length
  (`config.data.audio_samples`), seed = config.seed; `overrides` win."""
  model, sample = config.model, config.sample
  image_f = components.image_vae_config(model).downsample_factor
  audio_f = components.audio_vae_config(model).downsample_factor
  fields = dict(image_size=sample.image_latent_size * image_f, num_frames=sample.num_frames,
                audio_frames=sample.audio_latent_frames * audio_f,
                audio_samples=config.data.audio_samples, seed=config.seed)
  return CacheConfig(**{**fields, **overrides})


def encoder_signature(params: Mapping[str, PyTree]) -> dict[str, list[float]]:
  """{part: [leaf count, sum, sum of squares]} of encoder weights: cheap (reductions run where
  the weights lie, sharded or not) and enough to tell one set of weights from another. A cache
  records its encoders' signature; training on the cache checks its own against it."""
  out = {}
  for name, tree in params.items():
    leaves = jax.tree_util.tree_leaves(nn.meta.unbox(tree))
    out[name] = [float(len(leaves)),
                 sum(float(jnp.sum(jnp.asarray(x, jnp.float32))) for x in leaves),
                 sum(float(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32)))) for x in leaves)]
  return out


def read_spec(path: str | os.PathLike) -> dict[str, Any]:
  """The `cache_spec.json` of a cache folder (or of the folder holding a shard file)."""
  path = pathlib.Path(path)
  spec = (path if path.is_dir() else path.parent) / SPEC_FILE
  if not spec.is_file():
    raise ValueError(f"{spec} does not exist: is {path} a `codi-jax cache` folder?")
  return json.loads(spec.read_text())


# --- parameters and tokenizers --------------------------------------------------------------------

def random_encoder_params(model: Mapping, seed: int) -> dict[str, PyTree]:
  """Random stand-in weights of every encoder (`checkpoint.random_params`); tests and demos."""
  return checkpoint.random_params(model, seed, ENCODERS)


def load_encoder_params(model: Mapping, params: Mapping[str, PyTree] | None = None, *,
                        seed: int = 0,
                        ckpt: str | os.PathLike | Sequence[str | os.PathLike] | None = None
                        ) -> dict[str, PyTree]:
  """The one place encoder weights come from: `params` ({component name: tree}) or the encoder
  parts of the checkpoints `ckpt` (one or several, e.g. the autoencoders' and the aligned prompt
  encoders'; each part from the last one holding it, `checkpoint.load_model`), checked against
  the config's shapes, or random (`random_encoder_params`, for tests and demos) when neither is
  given. CLAP's tree is {"params", "batch_stats"}. Raises ValueError naming a missing part or a
  mismatched leaf."""
  if ckpt is not None:
    if params is not None:
      raise ValueError("load_encoder_params: give params or ckpt, not both")
    dirs = [ckpt] if isinstance(ckpt, (str, os.PathLike)) else list(ckpt)
    params = {}
    for d in dirs:
      if not pathlib.Path(d).is_dir():
        raise ValueError(f"checkpoint directory {d} does not exist")
      held = [p for p in ENCODERS if p in checkpoint.saved_parts(pathlib.Path(d))]
      params.update(checkpoint.load_model(d, held)[1] if held else {})
    missing = [p for p in ENCODERS if p not in params]
    if missing:
      raise ValueError(f"no checkpoint of {[str(d) for d in dirs]} holds {missing}")
  if params is None:
    return random_encoder_params(model, seed)
  if set(params) != set(ENCODERS):
    raise ValueError(f"encoder params must be given for exactly {list(ENCODERS)}, got "
                     f"{sorted(params)}")
  out = {}
  for name in ENCODERS:
    checkpoint.check_params(model, name, params[name])
    out[name] = nn.meta.unbox(params[name])
  return out


class Tokenizers(NamedTuple):
  clip: CLIPTokenizer
  bert: BertTokenizer


def load_tokenizers(directory: str | os.PathLike | None = None) -> Tokenizers:
  """CLIP BPE and BERT WordPiece vocabularies from one folder (`vocab_dir`: `directory`,
  $CODI_TOKENIZERS or the bundled ones)."""
  directory = vocab_dir(directory)
  return Tokenizers(CLIPTokenizer.from_file(directory / "clip_bpe_simple_vocab_16e6.txt.gz"),
                    BertTokenizer.from_file(directory / "bert-base-cased-vocab.txt"))


# --- preprocessing (host side, `data.preprocess` as the training pipeline) -----------------------

@dataclasses.dataclass
class Prepared:
  """One example's preprocessed inputs; a modality is None when absent or unusable."""

  key: str
  source: str
  caption: str | None = None
  image: np.ndarray | None = None  # [S, S, 3] in [-1, 1]
  video: np.ndarray | None = None  # [F, S, S, 3] in [-1, 1]
  audio: np.ndarray | None = None  # [T] 16 kHz
  failures: list[str] = dataclasses.field(default_factory=list)  # reasons, one per lost modality


def _check_caption(text: str, bert: BertTokenizer) -> str | None:
  """The failure reason of a caption the text VAE cannot take, or None."""
  tokens = bert.tokenize(text.lower())
  if not tokens:
    return "empty_text"
  return "text_too_long" if len(tokens) + 2 > BERT_MAX_TOKENS else None


def prepare(item: Any, config: CacheConfig, tokenizers: Tokenizers) -> Prepared:
  """A `synthetic.SyntheticExample` or a `records.Example` -> `Prepared` (never raises on bad
  media: the failing modality is dropped and its reason kept)."""
  if isinstance(item, records.Example):
    out = Prepared(item.key, item.source, item.text)
    decoders = {
        "image": (item.image, lambda b: media.decode_image(b)),
        "video": (item.video, lambda b: media.decode_video(b, config.num_frames)),
        "audio": (item.audio, lambda b: media.decode_audio(b, target_rate=SAMPLE_RATE))}
  elif isinstance(item, synthetic.SyntheticExample):  # 16 kHz audio: checked by build_cache
    out = Prepared(item.key, "synthetic", item.text)
    decoders = {name: (getattr(item, name), lambda x: x) for name in ("image", "video", "audio")}
  else:
    raise TypeError(f"cannot cache a {type(item).__name__}; expected a records.Example or a "
                    "synthetic.SyntheticExample")
  for name, (data, decode) in decoders.items():
    if data is None:
      continue
    try:
      x = decode(data)
      if name == "image":
        out.image = preprocess.preprocess_image(x, config.image_size)
      elif name == "video":
        out.video = preprocess.preprocess_video(x, config.image_size, config.num_frames)
      else:
        if np.size(x) == 0:
          raise media.MediaError(media.FailureReason.EMPTY_AUDIO, "audio has no samples")
        out.audio = preprocess.fit_audio(x, config.audio_samples)
    except media.MediaError as e:
      out.failures.append(e.reason)
  if out.caption is not None:
    reason = _check_caption(out.caption, tokenizers.bert)
    if reason:
      out.caption = None
      out.failures.append(reason)
  return out


# --- the encoders --------------------------------------------------------------------------------

def _example_hash(key: str) -> int:
  return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:4], "little") & 0x7FFFFFFF


def example_rng(seed: int, key: str, modality: Modality | str) -> jax.Array:
  """The posterior-sampling key of one example's modality (depends on nothing else)."""
  base = jax.random.fold_in(jax.random.key(seed), _MODALITY_SALT[Modality.parse(modality)])
  return jax.random.fold_in(base, _example_hash(key))


def _bucket(length: int) -> int:
  """Padded BERT length: the next power of two >= length (>= 16), so few shapes compile."""
  return min(BERT_MAX_TOKENS, max(16, 1 << (length - 1).bit_length()))


class FrozenEncoders:
  """The cache's encoders with their weights: `__call__(prepared)` -> one feature dict each.

  Every modality runs on a fixed [batch_size, ...] shape (absent rows zero-filled), so each
  jitted function compiles once per shape (text: once per padded length bucket).
  """

  def __init__(self, model: Mapping, params: Mapping[str, PyTree], tokenizers: Tokenizers,
               config: CacheConfig):
    self.config = config
    self.tokenizers = tokenizers
    self.params = jax.tree_util.tree_map(jnp.asarray, dict(params))
    image_vae = autoencoder.AutoencoderKL(components.image_vae_config(model))
    audio_vae = autoencoder.AutoencoderKL(components.audio_vae_config(model))
    text_vae = optimus.Optimus(components.optimus_config(model))
    self.clip = FrozenCLIP(components.clip_config(model), self.params["clip"])
    self.clap_config = components.clap_config(model)
    sample = config.latent_mode is LatentMode.SAMPLE
    time_s = config.audio_time

    def per_example(encode, params, x, keys):
      if not sample:
        return encode(params, x, None)
      return jax.vmap(lambda xi, k: encode(params, xi[None], k)[0])(x, keys)

    self._image = jax.jit(lambda p, x, keys: per_example(
        lambda p, x, r: autoencoder.encode_image(image_vae, p, x, r), p, x, keys))
    self._audio = jax.jit(lambda p, x, keys: per_example(
        lambda p, x, r: autoencoder.encode_audio(audio_vae, p, x, time=time_s, rng=r), p, x, keys))
    self._text = jax.jit(lambda p, ids: text_vae.apply({"params": p}, ids,
                                                       method=optimus.Optimus.codi_encode))

  def _keys(self, keys: list[str], modality: Modality) -> jax.Array:
    base = jax.random.fold_in(jax.random.key(self.config.seed), _MODALITY_SALT[modality])
    hashes = np.zeros(self.config.batch_size, np.uint32)
    hashes[:len(keys)] = [_example_hash(k) for k in keys]
    return jax.vmap(lambda h: jax.random.fold_in(base, h))(jnp.asarray(hashes))

  def _rows(self, arrays: list[np.ndarray]) -> np.ndarray:
    """[n, ...] stacked and zero-padded to [batch_size, ...]."""
    x = np.stack(arrays)
    return np.pad(x, [(0, self.config.batch_size - len(x))] + [(0, 0)] * (x.ndim - 1))

  def _text_features(self, captions: list[str]) -> dict[str, np.ndarray]:
    bert = [self.tokenizers.bert.codi_token_ids([c])[0] for c in captions]
    length = _bucket(max(len(ids) for ids in bert))
    ids = self._rows([np.pad(i, (0, length - len(i))) for i in bert])  # [B, length]
    clip_ids = self._rows(list(self.tokenizers.clip.encode_batch(captions)))  # [B, 77]
    return {"text_latent": np.asarray(self._text(self.params["optimus"], jnp.asarray(ids))),
            "text_token": np.asarray(self.clip.encode_text(clip_ids))[:, 0]}

  def __call__(self, batch: Sequence[Prepared]) -> list[dict[str, np.ndarray]]:
    """Features of up to batch_size prepared examples (float32; storage casts later)."""
    if not 0 < len(batch) <= self.config.batch_size:
      raise ValueError(f"a batch holds 1 to {self.config.batch_size} examples, got {len(batch)}")
    features: list[dict[str, np.ndarray]] = [{} for _ in batch]

    def run(attr: str, encode) -> None:
      rows = [i for i, p in enumerate(batch) if getattr(p, attr) is not None]
      if not rows:
        return
      out = encode([getattr(batch[i], attr) for i in rows], [batch[i].key for i in rows])
      for name, values in out.items():
        for j, i in enumerate(rows):
          features[i][name] = values[j]

    run("caption", lambda captions, _: self._text_features(captions))
    run("image", lambda xs, keys: {
        "image_latent": np.asarray(self._image(self.params["autokl"], self._rows(xs),
                                               self._keys(keys, Modality.IMAGE))),
        "image_token": np.asarray(self.clip.encode_vision(self._rows(xs)))[:, 0]})
    run("video", lambda xs, keys: {
        "video_latent": np.asarray(self._image(self.params["autokl"], self._rows(xs),
                                               self._keys(keys, Modality.VIDEO))),
        "video_token": np.asarray(self.clip.encode_vision(self._rows(xs)))[:, 0]})
    run("audio", lambda xs, keys: {
        "audio_latent": np.asarray(self._audio(self.params["audioldm_vae"], self._rows(xs),
                                               self._keys(keys, Modality.AUDIO))),
        "audio_token": np.asarray(clap_encode_audio(
            self.params["clap"], self._rows(xs)[:, None], self.clap_config))[:, 0]})
    return features


# --- sources --------------------------------------------------------------------------------------


# --- the feature records --------------------------------------------------------------------------

def _modality_of(feature: str) -> str:
  return feature.split("_")[0].replace("caption", "text")


def _record(p: Prepared, features: dict[str, np.ndarray], dtype: StoreDtype
            ) -> tuple[dict[str, np.ndarray] | None, list[str]]:
  """The stored record of one example (None if nothing usable is left) and new failure reasons."""
  failures = []
  broken = {_modality_of(k) for k, v in features.items() if not np.all(np.isfinite(v))}
  for modality in sorted(broken):
    failures.append(f"non_finite_{modality}")
  kept = {k: v.astype(dtype.value) for k, v in features.items() if _modality_of(k) not in broken}
  if not kept:
    return None, failures
  record = {"key": np.asarray(p.key), "source": np.asarray(p.source), **kept}
  if "text_latent" in kept:
    record["caption"] = np.asarray(p.caption)
  return record, failures


def _write_array_record(path: pathlib.Path, payloads: Sequence[bytes]) -> None:
  """All payloads into one ArrayRecord file, written under a temporary name then renamed."""
  tmp = temp_file(path)
  try:
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    for payload in payloads:
      writer.write(payload)
    writer.close()
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


class CacheReader:
  """Random-access source over cache shards: `len`, and `[i]` -> {name: numpy array}."""

  def __init__(self, paths: Sequence[str | os.PathLike]):
    self.paths = [str(p) for p in paths]
    self._source = array_record_data_source.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < len(self):
      raise IndexError(f"cache index {index} out of range [0, {len(self)})")
    return read_array_bytes(self._source[index])


def shard_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
  """Cache shard files of a folder, a glob pattern or a list of files (sorted, checked)."""
  if isinstance(paths, (str, os.PathLike)):
    path = pathlib.Path(paths)
    if path.is_dir():
      files = sorted(str(f) for f in path.glob(f"*{SHARD_SUFFIX}"))
    else:
      files = sorted(glob.glob(str(path))) if glob.has_magic(str(path)) else [str(path)]
  else:
    files = [str(p) for p in paths]
  if not files:
    raise ValueError(f"no cache shards found at {paths}")
  missing = [f for f in files if not os.path.isfile(f)]
  if missing:
    raise ValueError(f"cache shards do not exist: {missing[:3]}")
  return files


def read_cache(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> CacheReader:
  """The cached features of a folder / glob / list of shards, as a grain-ready source."""
  return CacheReader(shard_files(paths))


# --- the job --------------------------------------------------------------------------------------

@dataclasses.dataclass
class CacheSummary:
  """Counts of one process's shards (including shards finished by an earlier run)."""

  examples: int = 0  # source examples in this process's shards
  written: int = 0  # feature records written
  dropped: int = 0  # examples with no usable modality left
  shards_written: int = 0
  shards_skipped: int = 0  # already finished
  failures: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count
  features: dict[str, int] = dataclasses.field(default_factory=dict)  # feature -> records
  seconds: float = 0.0  # this run's wall time

  def add(self, shard: Mapping[str, Any]) -> None:
    for name in ("examples", "written", "dropped"):
      setattr(self, name, getattr(self, name) + shard[name])
    for table in ("failures", "features"):
      totals = getattr(self, table)
      for k, v in shard[table].items():
        totals[k] = totals.get(k, 0) + v

  def as_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def shard_name(name: str, shard: int, num_shards: int) -> str:
  return f"{name}-{shard:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def _json_safe(obj: Any) -> Any:
  return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _check_spec(out_dir: pathlib.Path, spec: Mapping[str, Any]) -> None:
  """Record what the cache is made of; refuse to resume a cache made differently."""
  path = out_dir / SPEC_FILE
  spec = _json_safe(spec)
  if path.exists():
    old = json.loads(path.read_text())
    if old != spec:
      changed = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
      raise ValueError(f"{out_dir} holds a cache made with other settings (differing: {changed});"
                       " use a new --out folder")
  else:
    atomic_write_json(path, spec)


def build_cache(source: Sequence[Any], out_dir: str | os.PathLike, encoders: FrozenEncoders, *,
                name: str = "cache", limit: int | None = None, shard_size: int = 256,
                store_dtype: StoreDtype | str = StoreDtype.FLOAT32,
                describe: Mapping[str, Any] | None = None, process_index: int | None = None,
                process_count: int | None = None, progress: bool = True) -> CacheSummary:
  """Cache the first `limit` (default all) examples of `source` into `out_dir`.

  Shard s holds source indices [s * shard_size, (s + 1) * shard_size); this process writes shards
  process_index, process_index + process_count, ... (defaults: JAX's process index and count);
  finished shards are skipped. Features are stored as `store_dtype`. `describe` (e.g. the model
  config and the source) goes into `cache_spec.json` with every setting; a re-run into the same
  folder must match it. Writes `summary-<p>-of-<P>.json` and returns the same summary.
  """
  start = time.perf_counter()
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} must lie in [0, process_count {count})")
  if isinstance(source, synthetic.SplitSource) and source.config.sample_rate != SAMPLE_RATE:
    raise ValueError(f"the cache takes the synthetic audio at {SAMPLE_RATE} Hz, the config "
                     f"generates {source.config.sample_rate} Hz")
  total = len(source) if limit is None else min(int(limit), len(source))
  if total < 1:
    raise ValueError(f"nothing to cache: the source has {len(source)} examples, limit {limit}")
  if shard_size < 1:
    raise ValueError(f"shard_size must be positive, got {shard_size}")
  store_dtype = StoreDtype(store_dtype)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  _check_spec(out_dir, dict(name=name, num_examples=total, shard_size=shard_size,
                            store_dtype=store_dtype.value,
                            cache_config=dataclasses.asdict(encoders.config), **(describe or {})))
  num_shards = -(-total // shard_size)
  mine = range(index, num_shards, count)
  summary = CacheSummary()
  pending = []
  for shard in mine:
    sidecar = out_dir / (shard_name(name, shard, num_shards) + SIDECAR_SUFFIX)
    if sidecar.exists():
      summary.add(json.loads(sidecar.read_text()))
      summary.shards_skipped += 1
    else:
      pending.append(shard)
  job = _Job(source, out_dir, encoders, name, num_shards, total, shard_size, store_dtype)
  todo = sum(len(job.indices(s)) for s in pending)
  bar = tqdm(total=todo, desc=f"cache {name} [{index}/{count}]", unit="ex", disable=not progress)
  for shard in pending:
    summary.add(job.run(shard, bar))
    summary.shards_written += 1
  bar.close()
  summary.seconds = round(time.perf_counter() - start, 3)
  atomic_write_json(out_dir / f"summary-{index:05d}-of-{count:05d}.json", summary.as_json())
  logging.info("cache %s: %s", name, summary)
  return summary


@dataclasses.dataclass(frozen=True)
class _Job:
  """One `build_cache` run's fixed settings; `run(shard)` does one shard."""

  source: Sequence[Any]
  out_dir: pathlib.Path
  encoders: FrozenEncoders
  name: str
  num_shards: int
  total: int
  shard_size: int
  store_dtype: StoreDtype

  def indices(self, shard: int) -> range:
    return range(shard * self.shard_size, min(self.total, (shard + 1) * self.shard_size))

  def run(self, shard: int, bar: tqdm) -> dict[str, Any]:
    """Encodes and writes one shard, then its summary sidecar (which marks it done)."""
    begin = time.perf_counter()
    indices, batch_size = self.indices(shard), self.encoders.config.batch_size
    stats: dict[str, Any] = dict(shard=shard, num_shards=self.num_shards, start=indices.start,
                                 stop=indices.stop, examples=len(indices), written=0, dropped=0,
                                 failures={}, features={})
    count = lambda table, key: stats[table].__setitem__(key, stats[table].get(key, 0) + 1)
    payloads = []
    for first in range(0, len(indices), batch_size):
      batch = [prepare(self.source[i], self.encoders.config, self.encoders.tokenizers)
               for i in indices[first:first + batch_size]]
      for p, features in zip(batch, self.encoders(batch)):
        record, more = _record(p, features, self.store_dtype)
        for reason in p.failures + more:
          count("failures", reason)
        if record is None:
          stats["dropped"] += 1
          continue
        for feature in record.keys() - {"key", "source"}:
          count("features", feature)
        payloads.append(array_bytes(record))
      bar.update(len(batch))
    path = self.out_dir / shard_name(self.name, shard, self.num_shards)
    if payloads:
      _write_array_record(path, payloads)
    stats["written"] = len(payloads)
    stats["seconds"] = round(time.perf_counter() - begin, 3)
    atomic_write_json(path.with_name(path.name + SIDECAR_SUFFIX), stats)
    return stats
