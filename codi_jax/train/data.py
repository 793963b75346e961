"""Training batches: the phase's grain pipeline, tokenised on the host, placed on the mesh.

`config.data` picks the source (the embedded synthetic dataset, our record shards, or a prepared
tfds folder) and the fixed shapes; each process reads its own slice of the one global stream
(`codi_jax.data.pipeline`) and `place` assembles the global batch over the mesh's batch axes with
`jax.make_array_from_process_local_data`. Text becomes fixed-length ids for the three text models
here (CLIP `clip_length`, BERT `bert_length`, GPT-2 `gpt2_length` with <BOS>/<EOS>/<PAD>);
strings and keys stay on the host.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from codi_jax.data import pipeline, synthetic
from codi_jax.modality import Modality
from codi_jax.models.optimus import BOS_ID, EOS_ID, PAD_ID
from codi_jax.parallel.sharding import place_batch
from codi_jax.text import BertTokenizer, CLIPTokenizer, GPT2Tokenizer, vocab_dir

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


def sources(config: ml_collections.ConfigDict, split: str = "train") -> list[pipeline.Source]:
  d = config.data
  if d.source == "synthetic":
    seconds = d.audio_samples / 16000
    return [pipeline.SyntheticSource(synthetic.SyntheticConfig(
        image_size=max(32, d.image_size), num_frames=d.num_frames,
        audio_seconds=max(0.5, seconds), seed=config.seed,
        minimal_pairs=d.minimal_pairs), split=split)]
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
  out = {k: np.asarray(v) for k, v in batch.items() if k in ARRAY_FIELDS}
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


def null_clip_ids(tokenizers: Tokenizers) -> np.ndarray:
  """CLIP ids of the empty prompt [77] (the text null condition)."""
  return tokenizers.clip.encode_batch([""])[0].astype(np.int32)
