"""Stage quality checks: what each training stage produced, scored on held-out data.

A stage is done when what it trained is measured good, not when its loss went down. Each check
reads the synthetic dataset's held-out test split through the trained parts and scores the result
with the dataset's analyzers (`codi_jax.data.analyzers`) against a fixed bar:

  autoencoders    image/<attr>       image -> VAE (posterior mode) -> image, analysed
                  video/<attr>       the same frame by frame, motion included
                  audio/...          `codi_jax.quality.audio`: the decoder on the true log-mel, and
                                     wave -> log-mel -> VAE -> decoder -> wave
                  text/...           `codi_jax.quality.text`: caption -> Optimus -> greedy decode
                  latent_std/<m>     std of the normalised diffusion target per modality
  align_encoders  probe/<m>/<attr>   nearest class centroid on the prompt tokens of modality m
                                     (centroids from the train split, scored on test)
                  retrieval/<m>      m's token -> nearest caption token among 64, top-1
  diffuse_<out>   condition/<out>/t<t>  `codi_jax.quality.conditioning`: the diffuser's noise
                                     prediction with each example's own condition token against
                                     another example's, at t = 100, 250, 500
  latent_align    environment/<a>-<b>/t<t>, partner/<out>+<other>/t<t>
                                     `codi_jax.quality.alignment`: paired environment codes
                                     retrieve each other; the connectors use the other output

Every check is `{"value": float, "bar": float or [low, high], "met": bool}` under its name
(`Check.as_json`); `run_stage_checks` returns them in order, `format_table` prints them.
The bars are the targets of the from-scratch recipe; do not lower them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from codi_jax.data import analyzers
from codi_jax.data import synthetic as syn
from codi_jax.data.preprocess import from_unit_range, to_unit_range
from codi_jax.modality import Modality
from codi_jax.models import autoencoder
from codi_jax.train import data as train_data
from codi_jax.train import objectives
from codi_jax.train import stages

PyTree = Any
ROUND_TRIP_BAR = 0.95
PROBE_BAR = 0.9
RETRIEVAL_BAR = 0.5
RETRIEVAL_GROUP = 64
LATENT_STD_RANGE = (0.7, 1.4)
BATCH = 16  # rows per compiled call (the last batch is padded)


@dataclasses.dataclass(frozen=True)
class Check:
  """A measured value and its bar: a minimum, or a [low, high] range."""

  value: float
  bar: float | tuple[float, float]

  @property
  def met(self) -> bool:
    if isinstance(self.bar, tuple):
      return bool(self.bar[0] <= self.value <= self.bar[1])
    return bool(self.value >= self.bar)

  def as_json(self) -> dict[str, Any]:
    bar = list(self.bar) if isinstance(self.bar, tuple) else self.bar
    return {"value": float(self.value), "bar": bar, "met": self.met}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> Check:
    bar = d["bar"]
    return cls(float(d["value"]), tuple(bar) if isinstance(bar, list) else float(bar))


@dataclasses.dataclass
class Context:
  """What the checks read: the model (config, modules, host parameters), held-out examples and,
  for the probes, training examples."""

  config: ml_collections.ConfigDict
  params: Mapping[str, PyTree]
  tokenizers: train_data.Tokenizers
  test: Sequence[syn.SyntheticExample]
  train: Sequence[syn.SyntheticExample]

  def __post_init__(self):
    self.models = objectives.Models.from_config(self.config.model)


def host_batch(ctx: Context, examples: Sequence[syn.SyntheticExample]) -> dict[str, np.ndarray]:
  """The numeric batch training reads (`train.data.arrays`) from examples at the model's sizes."""
  raw = {"index": np.arange(len(examples), dtype=np.int32),
         "image": np.stack([to_unit_range(e.image) for e in examples]),
         "video": np.stack([to_unit_range(e.video) for e in examples]),
         "audio": np.stack([e.audio for e in examples]).astype(np.float32),
         "text": [e.text for e in examples]}
  return train_data.arrays(raw, ctx.tokenizers, ctx.config)


def batched(fn: Callable[[Mapping, Mapping], Any], ctx: Context,
            examples: Sequence[syn.SyntheticExample]) -> list[Any]:
  """fn(params, batch) jitted over fixed batches of BATCH examples; one host output per example
  (a pytree of arrays with the batch first)."""
  jitted = jax.jit(fn)
  out = []
  for start in range(0, len(examples), BATCH):
    chunk = list(examples[start:start + BATCH])
    pad = BATCH - len(chunk)
    result = jax.device_get(jitted(ctx.params, host_batch(ctx, chunk + chunk[:1] * pad)))
    out += [jax.tree_util.tree_map(lambda x, i=i: np.asarray(x[i]), result)
            for i in range(len(chunk))]
  return out


def accuracy(analyses: Sequence[Mapping[str, str]], examples: Sequence[syn.SyntheticExample],
             names: Sequence[str], prefix: str, bar: float = ROUND_TRIP_BAR
             ) -> dict[str, Check]:
  """{prefix/name: share of analyses that read the example's true value}."""
  hits = [analyzers.attribute_accuracy(a, e.attributes, names)
          for a, e in zip(analyses, examples)]
  return {f"{prefix}/{n}": Check(float(np.mean([h[n] for h in hits])), bar) for n in names}


# ---------------------------------------------------------------------------------------------
# Autoencoders.


def image_round_trip(ctx: Context) -> dict[str, Check]:
  """Image and video through the image VAE (posterior mode), read by the analyzers."""
  vae = ctx.models.image_vae

  def fn(params, batch):
    def trip(x):
      z = autoencoder.encode_image(vae, params["autokl"], x)
      return autoencoder.decode_image(vae, params["autokl"], z)
    return {"image": trip(batch["image"]), "video": trip(batch["video"])}

  out = batched(fn, ctx, ctx.test)
  images = [analyzers.analyze_image(from_unit_range(o["image"])) for o in out]
  videos = [analyzers.analyze_video(from_unit_range(o["video"])) for o in out]
  return {**accuracy(images, ctx.test, analyzers.ATTRIBUTES_BY_MODALITY[Modality.IMAGE], "image"),
          **accuracy(videos, ctx.test, analyzers.ATTRIBUTES_BY_MODALITY[Modality.VIDEO], "video")}


def latent_std(ctx: Context) -> dict[str, Check]:
  """Std of the normalised diffusion target of every modality whose encoder the model holds."""
  needs = {Modality.IMAGE: "autokl", Modality.VIDEO: "autokl", Modality.AUDIO: "audioldm_vae",
           Modality.TEXT: "optimus"}
  modalities = [m for m, part in needs.items() if part in ctx.params]
  fn = lambda params, batch: {m.value: objectives.latent(ctx.models, params, batch, m)
                              for m in modalities}
  out = batched(fn, ctx, ctx.test)
  return {f"latent_std/{m.value}": Check(float(np.std(np.stack([o[m.value] for o in out]))),
                                         LATENT_STD_RANGE) for m in modalities}


# ---------------------------------------------------------------------------------------------
# Prompt encoders.


def prompt_tokens(ctx: Context, examples: Sequence[syn.SyntheticExample]
                  ) -> dict[Modality, np.ndarray]:
  """Unit-norm prompt tokens [N, D] of every modality (CLIP text/vision, CLAP)."""
  fn = lambda params, batch: {m.value: objectives.condition_token(ctx.models, params, batch, m)
                              for m in Modality}
  out = batched(fn, ctx, examples)
  return {m: np.stack([o[m.value] for o in out]) for m in Modality}


def probe(train_tokens: np.ndarray, train_values: Sequence[str], test_tokens: np.ndarray,
          test_values: Sequence[str]) -> float:
  """Nearest-class-centroid accuracy (cosine) of test tokens, centroids from the train tokens."""
  classes = sorted(set(train_values))
  centroids = np.stack([train_tokens[[v == c for v in train_values]].mean(0) for c in classes])
  centroids /= np.maximum(np.linalg.norm(centroids, axis=-1, keepdims=True), 1e-12)
  guess = np.argmax(test_tokens @ centroids.T, axis=-1)
  return float(np.mean([classes[g] == v for g, v in zip(guess, test_values)]))


def retrieval(queries: np.ndarray, captions: np.ndarray, group: int = RETRIEVAL_GROUP) -> float:
  """Top-1 accuracy of each query's own caption among the `group` captions of its group."""
  hits = []
  for start in range(0, len(queries) - group + 1, group):
    q, c = queries[start:start + group], captions[start:start + group]
    hits += list(np.argmax(q @ c.T, axis=-1) == np.arange(group))
  if not hits:
    raise ValueError(f"retrieval needs at least {group} examples, got {len(queries)}")
  return float(np.mean(hits))


def encoder_checks(ctx: Context) -> dict[str, Check]:
  """Per-attribute probes of every modality's tokens, and cross-modal retrieval to captions."""
  train, test = prompt_tokens(ctx, ctx.train), prompt_tokens(ctx, ctx.test)
  truth = lambda examples, name: [e.attributes.as_dict()[name] for e in examples]
  checks = {}
  for m in (Modality.TEXT, Modality.IMAGE, Modality.VIDEO, Modality.AUDIO):
    for name in analyzers.ATTRIBUTES_BY_MODALITY[m]:
      checks[f"probe/{m.value}/{name}"] = Check(
          probe(train[m], truth(ctx.train, name), test[m], truth(ctx.test, name)), PROBE_BAR)
  for m in (Modality.IMAGE, Modality.VIDEO, Modality.AUDIO):
    checks[f"retrieval/{m.value}"] = Check(retrieval(test[m], test[Modality.TEXT]),
                                           RETRIEVAL_BAR)
  return checks


# ---------------------------------------------------------------------------------------------
# The stages.


def _autoencoder_checks(ctx: Context) -> dict[str, Check]:
  checks = {}
  if "autokl" in ctx.params:
    checks.update(image_round_trip(ctx))
  if "audioldm_vae" in ctx.params:
    from codi_jax.quality import audio  # pylint: disable=import-outside-toplevel
    checks.update(audio.checks(ctx))
  if "optimus" in ctx.params:
    from codi_jax.quality import text  # pylint: disable=import-outside-toplevel
    checks.update(text.checks(ctx))
  checks.update(latent_std(ctx))
  return checks


def _condition_checks(stage: str) -> Callable[[Context], dict[str, Check]]:
  def run(ctx: Context) -> dict[str, Check]:
    from codi_jax.quality import conditioning  # pylint: disable=import-outside-toplevel
    return conditioning.checks(ctx, stage)
  return run


def _latent_align_checks(ctx: Context) -> dict[str, Check]:
  from codi_jax.quality import alignment  # pylint: disable=import-outside-toplevel
  return alignment.checks(ctx)


# Stage -> (the parts its checks read, the checks). The autoencoders' checks skip the parts a
# model does not hold; the other stages' need all of theirs.
STAGE_CHECKS: dict[str, tuple[tuple[str, ...], Callable[[Context], dict[str, Check]]]] = {
    "autoencoders": (("autokl", "audioldm_vae", "hifigan_vocoder", "optimus"),
                     _autoencoder_checks),
    "align_encoders": (("clip", "clap"), encoder_checks),
    **{name: (stages.diffusion_stage(name).parts, _condition_checks(name))
       for name in stages.DIFFUSION_STAGES},
    "latent_align": (stages.LATENT_ALIGN_PARTS, _latent_align_checks),
}


def applicable_stages(present: Sequence[str]) -> list[str]:
  """The stages whose checks a model holding the parts `present` can run: the autoencoders' if
  it holds any of their parts, every other stage's if it holds all of its parts."""
  present = set(present)
  return [s for s, (parts, _) in STAGE_CHECKS.items()
          if (present & set(parts) if s == "autoencoders" else set(parts) <= present)]


def run_stage_checks(ctx: Context, stages: Sequence[str]) -> dict[str, Check]:
  """Every check of `stages`, in order (a stage's checks skip parts the model does not hold)."""
  checks = {}
  for stage in stages:
    if stage not in STAGE_CHECKS:
      raise ValueError(f"stage {stage!r} has no quality checks; stages with checks: "
                       f"{list(STAGE_CHECKS)}")
    checks.update(STAGE_CHECKS[stage][1](ctx))
  return checks


def check_model(model_dir: str, stages: Sequence[str], *, num_examples: int,
                tokenizers: train_data.Tokenizers) -> dict[str, Check]:
  """The checks of `stages` on a model checkpoint folder: `num_examples` held-out (test split)
  examples, and as many training examples for the probes' centroids."""
  from codi_jax import checkpoint, evaluate  # pylint: disable=import-outside-toplevel
  present = checkpoint.saved_parts(model_dir)
  needed = {p for s in stages for p in STAGE_CHECKS[s][0] if s in STAGE_CHECKS}
  parts = [p for p in present if p in needed]
  config, params = checkpoint.load_model(model_dir, parts)
  ctx = Context(config, params, tokenizers,
                test=evaluate.load_examples(config, "test", num_examples),
                train=evaluate.load_examples(config, "train", num_examples))
  return run_stage_checks(ctx, stages)


def as_json(checks: Mapping[str, Check]) -> dict[str, dict[str, Any]]:
  return {name: c.as_json() for name, c in checks.items()}


def format_table(checks: Mapping[str, Check]) -> str:
  width = max([len(k) for k in checks] + [5])
  lines = [f"{'check':<{width}}  {'value':>7}  {'bar':>11}  met"]
  for name, c in checks.items():
    bar = f"[{c.bar[0]:g}, {c.bar[1]:g}]" if isinstance(c.bar, tuple) else f">= {c.bar:g}"
    lines.append(f"{name:<{width}}  {c.value:7.3f}  {bar:>11}  {'yes' if c.met else 'NO'}")
  met = sum(c.met for c in checks.values())
  lines.append(f"{met} of {len(checks)} checks met")
  return "\n".join(lines)
