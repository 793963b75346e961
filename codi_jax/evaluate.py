"""The any-to-any benchmark (`codi-jax eval`): CoDi scored on held-out examples of the embedded
synthetic dataset by the dataset's own analyzers (`codi_jax.data.analyzers`).

Four sections, each a table:
  single  every input -> output pair over text, image, video and audio (16, same modality
          included): accuracy of every attribute the output carries that the input determines.
  multi   two inputs mixed (`MULTI`) -> one output, next to each input alone (its single pair).
  joint   text -> two outputs generated together (`JOINT`), with `alignment=others`, `self`, and
          no connectors (each output alone from the same seed: the single pairs' outputs); per
          attribute the agreement of the two outputs (`analyzers.agreement`) and each one's
          accuracy against the text.
  unnamed the same joint tasks from a partial caption that leaves out some of the attributes the
          sound is keyed to (`partial_caption`: a random non-empty subset of colour, shape and
          size) and from no prompt at all (the null token: unconditional joint samples); the
          agreement of the two outputs on those unnamed attributes, pooled over examples with a
          95 % Wilson interval. Only latent alignment can make them agree there: the bar is
          `others` >= `self` and no connectors + 0.3, intervals apart.
All inputs of a request come from one example, so every output is scored against that example's
ground truth (`Attributes.as_dict`, all eight attributes). The summary sets each attribute's
accuracy (mean over the single pairs that score it) against fixed accuracy bars: colour and
pitch >= 0.9, size, position and rhythm >= 0.8, shape, motion and timbre >= 0.7, and mean joint
agreement with `others` above `self`.
An output the analyzers cannot read counts as wrong; each single pair and the summary also give
the share unreadable and the accuracy among the readable ones (so "silent" and "wrong" differ),
and per output modality the share of outputs with an unreadable attribute (bar <= 0.02) and the
accuracy from every input.

Generation is one injectable step (`Generate`: requests -> outputs), so the scoring can be checked
with stand-in generators. `PipelineGenerator` is the real one: requests are grouped by compiled
program (`pipeline.Program`: the output set and sizes; inputs, seeds and guidance vary per row)
and run `batch_size` rows per program call, the last batch zero-padded so each program compiles
once; each request is planned, prepared and finished by `CoDiPipeline` as in `codi_jax.sample`.
Every task uses example i's seed (`example_seed`), which is what makes the no-connector column
the single pairs' outputs and keeps a result independent of batching.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import pathlib
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from codi_jax import checkpoint
from codi_jax.audio.mel import SAMPLE_RATE
from codi_jax.data import analyzers, preprocess
from codi_jax.data import synthetic as syn
from codi_jax.modality import Alignment, Modality
from codi_jax.pipeline import CoDiPipeline, Program, Rows, Settings
from codi_jax.train import data as train_data

TEXT, IMAGE, VIDEO, AUDIO = Modality.TEXT, Modality.IMAGE, Modality.VIDEO, Modality.AUDIO
MODALITIES = (TEXT, IMAGE, VIDEO, AUDIO)
ATTRIBUTES = tuple(syn.ATTRIBUTE_VALUES)  # the table columns, visual ones first
# The accuracy bars of the single pairs (what a trained model must reach); do not lower them.
BARS = {"colour": 0.9, "pitch": 0.9, "size": 0.8, "position": 0.8, "rhythm": 0.8}
DEFAULT_BAR = 0.7  # shape, motion, timbre
UNREADABLE_BAR = 0.02  # at most this share of an output modality's outputs unreadable
NONE = "none"  # the joint column whose outputs were generated alone
# The attributes of the picture the sound is keyed to (pitch, timbre, rhythm): where the caption
# does not name them, only latent alignment can make a picture and a sound agree on them.
KEYED = tuple(visual for visual, _ in syn.SOUND_SOURCE.values())
# The joint agreement bar on what the condition does not name: `others` at least this much above
# `self` and above no connectors, with 95 % intervals apart. Do not lower it.
UNNAMED_GAIN_BAR = 0.3


class Prompt(str, enum.Enum):
  """The text a joint request conditions on."""

  FULL = "full"  # the example's caption: every attribute named
  PARTIAL = "partial"  # a caption leaving some keyed attributes out (`partial_caption`)
  NONE = "none"  # nothing: the null token alone (an unconditional joint sample)


@dataclasses.dataclass(frozen=True)
class Task:
  """What one request of every example asks: its inputs, its outputs, for joint outputs the
  alignment (None: the model's own, which a single output never uses), and its text prompt."""

  inputs: tuple[Modality, ...]
  outputs: tuple[Modality, ...]
  alignment: Alignment | None = None
  prompt: Prompt = Prompt.FULL

  @property
  def key(self) -> str:
    name = f"{'+'.join(m.value for m in self.inputs)}->{'+'.join(m.value for m in self.outputs)}"
    name = name if self.alignment is None else f"{name} [{self.alignment.value}]"
    return name if self.prompt is Prompt.FULL else f"{name} ({self.prompt.value} caption)"


SINGLE = tuple(Task((i,), (o,)) for i in MODALITIES for o in MODALITIES)
MULTI = (Task((TEXT, AUDIO), (IMAGE,)), Task((IMAGE, AUDIO), (TEXT,)),
         Task((TEXT, IMAGE), (AUDIO,)), Task((VIDEO, AUDIO), (IMAGE,)))
JOINT = (((TEXT,), (IMAGE, AUDIO)), ((TEXT,), (VIDEO, AUDIO)))
ALIGNMENTS = (Alignment.OTHERS, Alignment.SELF)
# Joint generation from a partial caption or from nothing, with each output alone beside it.
UNNAMED = tuple(Task(i, o, a, p) for p in (Prompt.PARTIAL, Prompt.NONE) for i, o in JOINT
                for a in ALIGNMENTS) + tuple(
    Task((TEXT,), (o,), None, p) for p in (Prompt.PARTIAL, Prompt.NONE)
    for o in dict.fromkeys(o for _, outs in JOINT for o in outs))
TASKS = SINGLE + MULTI + tuple(Task(i, o, a) for i, o in JOINT for a in ALIGNMENTS) + UNNAMED


@dataclasses.dataclass(frozen=True)
class Request:
  """One task on one example: its inputs are the example's media, its noise from `seed`."""

  task: Task
  index: int  # the example's position in the evaluated list
  example: syn.SyntheticExample
  seed: int
  caption: str | None = None  # the text input of a partial-caption task (`partial_caption`)

  def inputs(self) -> dict[Modality, Any]:
    """The request's inputs. An unconditional task still passes the caption, which the
    generator replaces by the null condition (`Prompt.NONE`)."""
    out = {m: getattr(self.example, m.value) for m in self.task.inputs}
    if self.task.prompt is Prompt.PARTIAL:
      out[TEXT] = self.caption
    return out


# One {output modality: media} per request, in request order: image uint8 [H, W, 3], video uint8
# [F, H, W, 3], audio float32 [S] at 16 kHz, text a string.
Generate = Callable[[Sequence[Request]], list[Mapping[Modality, Any]]]


# ---------------------------------------------------------------------------------------------
# Examples.


def dataset_config(config: ml_collections.ConfigDict) -> syn.SyntheticConfig:
  """The synthetic dataset as the training stages read it (`train.data.synthetic_config`),
  without minimal pairs: held-out examples are drawn independently."""
  return dataclasses.replace(train_data.synthetic_config(config), minimal_pairs=False)


def load_examples(config: ml_collections.ConfigDict, split: str, num_examples: int
                  ) -> list[syn.SyntheticExample]:
  """The first `num_examples` of `split`, media at the model's sizes (`config.data`: image side,
  frames, audio samples), cropped as the training pipeline crops held-out data (centre)."""
  d = config.data
  dataset = dataset_config(config)
  size = syn.split_size(dataset, split)
  if isinstance(num_examples, bool) or not isinstance(num_examples, int) \
     or not 1 <= num_examples <= size:
    raise ValueError(f"num_examples must be an integer in [1, {size}] (the {split} split's "
                     f"size), got {num_examples!r}")
  if d.audio_samples < SAMPLE_RATE // 4:
    raise ValueError(f"config.data.audio_samples is {d.audio_samples}: the audio analyzer needs "
                     f"at least {SAMPLE_RATE // 4} (0.25 s at {SAMPLE_RATE} Hz)")
  examples = []
  for i in range(num_examples):
    ex = syn.generate(dataset, split, i)
    image = preprocess.preprocess_image(ex.image, d.image_size)
    video = preprocess.preprocess_video(ex.video, d.image_size, d.num_frames)
    examples.append(dataclasses.replace(
        ex, image=preprocess.from_unit_range(image), video=preprocess.from_unit_range(video),
        audio=preprocess.fit_audio(ex.audio, d.audio_samples)))
  return examples


def partial_caption(example: syn.SyntheticExample, seed: int, index: int
                    ) -> tuple[str, tuple[str, ...]]:
  """(caption, the keyed attributes it leaves out) of example `index` for the partial-caption
  tasks: a random non-empty subset of `KEYED` left out, everything else named; a pure function
  of (seed, index)."""
  rng = np.random.default_rng(np.random.SeedSequence((seed, index, 2)))
  left_out = ()
  while not left_out:
    left_out = tuple(a for a in KEYED if rng.random() < 0.5)
  named = [a for a in syn.VISUAL_ATTRIBUTES if a not in left_out]
  return syn.caption(example.attributes, rng, named), left_out


def example_seed(seed: int, index: int) -> int:
  """The generation seed of every request on example `index` (a 31-bit int from both)."""
  return int(np.random.SeedSequence((seed, index)).generate_state(1)[0] >> 1)


# ---------------------------------------------------------------------------------------------
# Scoring.


def determined(inputs: Iterable[Modality]) -> set[str]:
  """The attributes `inputs` fix: those they carry, each sound attribute with its visual source
  and back (pitch <-> colour, timbre <-> shape, rhythm <-> size)."""
  names = set().union(*(analyzers.ATTRIBUTES_BY_MODALITY[m] for m in inputs))
  for sound, (visual, _) in syn.SOUND_SOURCE.items():
    if sound in names or visual in names:
      names |= {sound, visual}
  return names


def scored_attributes(inputs: Iterable[Modality], output: Modality) -> tuple[str, ...]:
  """The attributes `output` carries that `inputs` determine (what a pair is scored on)."""
  known = determined(inputs)
  return tuple(a for a in analyzers.ATTRIBUTES_BY_MODALITY[output] if a in known)


def analyze(modality: Modality, value: Any) -> dict[str, str]:
  """The analyzer of `modality` on one output (empty text reads as unknown, not an error)."""
  if modality is TEXT:
    if not isinstance(value, str):
      raise ValueError(f"a text output must be a string, got {type(value).__name__}")
    if not value.strip():
      return {a: analyzers.UNKNOWN for a in analyzers.ATTRIBUTES_BY_MODALITY[TEXT]}
    return analyzers.analyze_text(value)
  if modality is IMAGE:
    return analyzers.analyze_image(value)
  if modality is VIDEO:
    return analyzers.analyze_video(value)
  return analyzers.analyze_audio(np.asarray(value), SAMPLE_RATE)


Analyses = dict[str, list[dict[str, dict[str, str]]]]  # task key -> per example {output: analysis}


def _accuracy(analyses: Sequence[dict[str, str]], truths: Sequence[syn.Attributes],
              names: Sequence[str]) -> dict[str, float]:
  hits = [analyzers.attribute_accuracy(a, t, names) for a, t in zip(analyses, truths)]
  return {n: float(np.mean([h[n] for h in hits])) for n in names}


def _readability(analyses: Sequence[dict[str, str]], truths: Sequence[syn.Attributes],
                 names: Sequence[str]) -> dict[str, dict[str, float | None]]:
  """Per attribute: the share of outputs the analyzer could not read, and the accuracy among
  the ones it could (None if it read none): an unreadable output counts as wrong in
  `accuracy`, so these tell "silent" from "wrong"."""
  unread = {n: [a.get(n, analyzers.UNKNOWN) == analyzers.UNKNOWN for a in analyses]
            for n in names}
  hits = [analyzers.attribute_accuracy(a, t, names) for a, t in zip(analyses, truths)]
  readable = {}
  for n in names:
    read = [h[n] for h, u in zip(hits, unread[n]) if not u]
    readable[n] = float(np.mean(read)) if read else None
  return dict(unreadable={n: float(np.mean(u)) for n, u in unread.items()},
              readable_accuracy=readable,
              unreadable_outputs=float(np.mean([any(u[i] for u in unread.values())
                                                for i in range(len(analyses))])))


def _agreement(pairs: Sequence[tuple[dict[str, str], dict[str, str]]]) -> dict[str, float]:
  agree = [analyzers.agreement(a, b) for a, b in pairs]
  return {n: float(np.mean([g[n] for g in agree])) for n in agree[0]}


def _io(task: Task) -> dict[str, list[str]]:
  return dict(inputs=[m.value for m in task.inputs], outputs=[m.value for m in task.outputs])


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """The 95 % (z = 1.96) Wilson score interval of a rate of `hits` in `n`."""
  if n == 0:
    return 0.0, 1.0
  p, z2 = hits / n, z * z
  centre = (p + z2 / (2 * n)) / (1 + z2 / n)
  half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
  return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _rate(outcomes: Sequence[bool], chances: Sequence[float]) -> dict[str, Any]:
  hits, n = int(sum(outcomes)), len(outcomes)
  low, high = wilson_interval(hits, n)
  return dict(agreement=hits / n if n else 0.0, low=low, high=high, hits=hits, n=n,
              chance=float(np.mean(chances)) if n else 0.0)


def _unnamed_agreement(analyses: Analyses, left_out: Sequence[tuple[str, ...]]
                       ) -> dict[str, Any]:
  """Per joint pair and prompt (partial, none): per column (others, self, none) the agreement of
  the two outputs on the keyed attributes the prompt leaves out, pooled over examples."""
  outputs_of = lambda key, m: [a[m.value] for a in analyses[key]]
  section = {}
  for inputs, outputs in JOINT:
    for prompt in (Prompt.PARTIAL, Prompt.NONE):
      names = left_out if prompt is Prompt.PARTIAL else [KEYED] * len(left_out)
      columns = {}
      for alignment in ALIGNMENTS + (None,):
        if alignment is None:
          keys = {o: Task(inputs, (o,), None, prompt).key for o in outputs}
        else:
          keys = dict.fromkeys(outputs, Task(inputs, outputs, alignment, prompt).key)
        a, b = (outputs_of(keys[o], o) for o in outputs)
        agree = [analyzers.agreement(x, y) for x, y in zip(a, b)]
        columns[NONE if alignment is None else alignment.value] = _rate(
            [g[n] for g, ns in zip(agree, names) for n in ns],
            [analyzers.CHANCE[n] for ns in names for n in ns])
      section[Task(inputs, outputs, None, prompt).key] = dict(
          _io(Task(inputs, outputs)), prompt=prompt.value, alignments=columns)
  return section


def _unnamed_summary(section: Mapping[str, Any]) -> dict[str, Any]:
  """The unnamed-attribute agreement pooled over every pair and prompt, against the bar."""
  pooled = {}
  for col in (Alignment.OTHERS.value, Alignment.SELF.value, NONE):
    cells = [e["alignments"][col] for e in section.values()]
    hits, n = sum(c["hits"] for c in cells), sum(c["n"] for c in cells)
    low, high = wilson_interval(hits, n)
    pooled[col] = dict(agreement=hits / n if n else 0.0, low=low, high=high, n=n)
  others = pooled[Alignment.OTHERS.value]
  rivals = [pooled[Alignment.SELF.value], pooled[NONE]]
  gap = others["agreement"] - max(r["agreement"] for r in rivals)
  apart = all(others["low"] > r["high"] for r in rivals)
  return dict(pooled, gap=gap, bar=UNNAMED_GAIN_BAR, intervals_apart=apart,
              met=gap >= UNNAMED_GAIN_BAR and apart)


def score(examples: Sequence[syn.SyntheticExample], analyses: Analyses,
          left_out: Sequence[tuple[str, ...]]) -> dict[str, Any]:
  """The sections and the summary from every task's analyses (see the module docstring);
  `left_out`: per example the keyed attributes its partial caption leaves out."""
  truths = [e.attributes for e in examples]
  outputs_of = lambda key, m: [a[m.value] for a in analyses[key]]
  single = {}
  for task in SINGLE:
    (o,) = task.outputs
    names = scored_attributes(task.inputs, o)
    outputs = outputs_of(task.key, o)
    single[task.key] = dict(_io(task), accuracy=_accuracy(outputs, truths, names),
                            **_readability(outputs, truths, names))
  multi = {}
  for task in MULTI:
    (o,) = task.outputs
    names = scored_attributes(task.inputs, o)
    alone = {m.value: {n: single[Task((m,), (o,)).key]["accuracy"].get(n) for n in names}
             for m in task.inputs}  # None: that input alone does not determine the attribute
    multi[task.key] = dict(_io(task), accuracy=_accuracy(outputs_of(task.key, o), truths, names),
                           alone=alone)
  joint = {}
  for inputs, outputs in JOINT:
    columns = {}
    for alignment in ALIGNMENTS + (None,):
      if alignment is None:  # each output alone: the single tasks, same seeds
        keys = {o: Task(inputs, (o,)).key for o in outputs}
      else:
        keys = dict.fromkeys(outputs, Task(inputs, outputs, alignment).key)
      per_output = {o: outputs_of(keys[o], o) for o in outputs}
      a, b = (per_output[o] for o in outputs)
      agreement = _agreement(list(zip(a, b)))
      columns[NONE if alignment is None else alignment.value] = dict(
          tasks=sorted(set(keys.values())), agreement=agreement,
          mean_agreement=float(np.mean(list(agreement.values()))),
          accuracy={o.value: _accuracy(per_output[o], truths, scored_attributes(inputs, o))
                    for o in outputs})
    joint[Task(inputs, outputs).key] = dict(_io(Task(inputs, outputs)), alignments=columns)
  unnamed = _unnamed_agreement(analyses, left_out)
  return dict(single=single, multi=multi, joint=joint, unnamed=unnamed,
              summary=_summary(single, joint, unnamed))


def _summary(single: Mapping[str, Any], joint: Mapping[str, Any], unnamed: Mapping[str, Any]
             ) -> dict[str, Any]:
  attributes = {}
  for name in ATTRIBUTES:
    scoring = {k: e for k, e in single.items() if name in e["accuracy"]}
    per_pair = {k: e["accuracy"][name] for k, e in scoring.items()}
    accuracy = float(np.mean(list(per_pair.values())))
    bar = BARS.get(name, DEFAULT_BAR)
    worst = min(per_pair, key=per_pair.get)
    readable = [e["readable_accuracy"][name] for e in scoring.values()
                if e["readable_accuracy"][name] is not None]
    attributes[name] = dict(
        accuracy=accuracy, chance=analyzers.CHANCE[name], bar=bar, met=accuracy >= bar,
        gap=accuracy - bar, pairs=len(per_pair), worst_pair=worst,
        worst_accuracy=per_pair[worst],
        unreadable=float(np.mean([e["unreadable"][name] for e in scoring.values()])),
        readable_accuracy=float(np.mean(readable)) if readable else None)
  outputs = {}
  for m in MODALITIES:
    into = [e for e in single.values() if e["outputs"] == [m.value]]
    unreadable = float(np.mean([e["unreadable_outputs"] for e in into]))
    outputs[m.value] = dict(
        unreadable=unreadable, unreadable_bar=UNREADABLE_BAR, met=unreadable <= UNREADABLE_BAR,
        accuracy={n: float(np.mean([e["accuracy"][n] for e in into if n in e["accuracy"]]))
                  for n in analyzers.ATTRIBUTES_BY_MODALITY[m]})
  mean = {col: float(np.mean([e["alignments"][col]["mean_agreement"] for e in joint.values()]))
          for col in (Alignment.OTHERS.value, Alignment.SELF.value, NONE)}
  gap = mean[Alignment.OTHERS.value] - mean[Alignment.SELF.value]
  agreement = dict(mean, met=gap > 0, gap=gap)
  unnamed_agreement = _unnamed_summary(unnamed)
  return dict(attributes=attributes, outputs=outputs, joint_agreement=agreement,
              unnamed_agreement=unnamed_agreement,
              all_met=(all(a["met"] for a in attributes.values()) and agreement["met"]
                       and all(o["met"] for o in outputs.values())
                       and unnamed_agreement["met"]))


# ---------------------------------------------------------------------------------------------
# Generation with the pipeline.


def stack_rows(rows: Sequence[Rows], slots: int) -> Rows:
  """Several requests' rows as one batch of `slots` rows; padding rows are zeros (computed, then
  dropped)."""
  def stack(*parts):
    x = np.concatenate(parts)
    return np.concatenate([x, np.zeros((slots - len(x),) + x.shape[1:], x.dtype)])
  return jax.tree_util.tree_map(stack, *rows)


def _describe(program: Program) -> str:
  return f"{'+'.join(m.value for m in program.outputs)} [{program.alignment.value}]"


class PipelineGenerator:
  """`Generate` on a `CoDiPipeline` at the sizes of its config's data (image side, frames, audio
  samples), batched by compiled program (see the module docstring). `stats` counts the work."""

  def __init__(self, pipe: CoDiPipeline, *, ddim_steps: int, guidance_scale: float,
               batch_size: int = 16, progress: bool = True):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    d = pipe.config.data
    self.pipe, self.batch_size, self.progress = pipe, batch_size, progress
    self.options = dict(ddim_steps=ddim_steps, guidance_scale=guidance_scale,
                        image_size=int(d.image_size), num_frames=int(d.num_frames),
                        audio_seconds=int(d.audio_samples) / SAMPLE_RATE)
    self._fns: dict[Program, Callable] = {}
    self.stats = dict(requests=0, batches=0, padding_rows=0, programs=0, seconds=0.0)

  def plan(self, request: Request) -> Settings:
    return self.pipe.plan(request.task.inputs, request.task.outputs, seed=request.seed,
                          alignment=request.task.alignment, **self.options)

  def _prepare(self, settings: Settings, request: Request) -> Rows:
    """A request's rows; an unconditional one (`Prompt.NONE`) conditions on its null token."""
    rows = self.pipe.prepare(settings, request.inputs())
    return rows._replace(cond=rows.uncond) if request.task.prompt is Prompt.NONE else rows

  def __call__(self, requests: Sequence[Request]) -> list[dict[Modality, Any]]:
    start = time.perf_counter()
    settings = [self.plan(r) for r in requests]  # every request checked before model work
    groups: dict[Program, list[int]] = {}
    for i, s in enumerate(settings):
      groups.setdefault(Program.of(s), []).append(i)
    batches = []
    for program, members in groups.items():
      slots = min(self.batch_size, len(members))
      batches += [(program, members[k:k + slots], slots) for k in range(0, len(members), slots)]
    results: list[dict[Modality, Any]] = [{} for _ in requests]
    bar = tqdm(total=len(batches), desc="eval", unit="batch", disable=not self.progress)
    for program, members, slots in batches:
      bar.set_postfix_str(_describe(program))
      if program not in self._fns:
        self._fns[program] = jax.jit(self.pipe.program_fn(program))
      rows = stack_rows([self._prepare(settings[i], requests[i]) for i in members], slots)
      raw = self._fns[program](self.pipe.program_params(program), rows)
      raw = jax.tree_util.tree_map(np.asarray, raw)
      for k, i in enumerate(members):
        generated = self.pipe.finish(settings[i], {n: v[k:k + 1] for n, v in raw.items()})
        results[i] = {m: getattr(generated, m.value)[0] for m in requests[i].task.outputs}
      self.stats["padding_rows"] += slots - len(members)
      bar.update()
    bar.close()
    self.stats["requests"] += len(requests)
    self.stats["batches"] += len(batches)
    self.stats["programs"] = len(self._fns)
    self.stats["seconds"] += time.perf_counter() - start
    return results


# ---------------------------------------------------------------------------------------------
# The benchmark.


def run_benchmark(config: ml_collections.ConfigDict, generate: Generate, *, num_examples: int,
                  seed: int, split: str = "test", settings: Mapping[str, Any] | None = None,
                  gallery: str | os.PathLike | None = None, gallery_examples: int = 2,
                  progress: bool = True) -> dict[str, Any]:
  """Every task of `TASKS` on the first `num_examples` of `split`, generated by `generate`,
  analysed and scored. Writes the gallery to `gallery` if given. Returns the JSON-able result."""
  start = time.perf_counter()
  examples = load_examples(config, split, num_examples)
  seeds = [example_seed(seed, i) for i in range(num_examples)]
  partial = [partial_caption(ex, seed, i) for i, ex in enumerate(examples)]
  requests = [Request(task, i, ex, seeds[i], partial[i][0])
              for task in TASKS for i, ex in enumerate(examples)]
  generate_start = time.perf_counter()
  generated = generate(requests)
  if len(generated) != len(requests):
    raise ValueError(f"the generator returned {len(generated)} results for {len(requests)} "
                     "requests")
  generate_s = time.perf_counter() - generate_start
  analyses: Analyses = {t.key: [{} for _ in examples] for t in TASKS}
  for r, out in tqdm(zip(requests, generated), total=len(requests), desc="analyse",
                     unit="output", disable=not progress):
    missing = [m.value for m in r.task.outputs if m not in out]
    if missing:
      raise ValueError(f"the generator gave no {missing} for {r.task.key} on example {r.index}")
    analyses[r.task.key][r.index] = {m.value: analyze(m, out[m]) for m in r.task.outputs}
  result = score(examples, analyses, [left_out for _, left_out in partial])
  d = config.data
  result["settings"] = dict(
      num_examples=num_examples, seed=seed, split=split, image_size=int(d.image_size),
      num_frames=int(d.num_frames), audio_seconds=int(d.audio_samples) / SAMPLE_RATE,
      dataset=dataclasses.asdict(dataset_config(config)), **dict(settings or {}))
  result["chance"] = dict(analyzers.CHANCE)
  result["examples"] = [dict(index=i, key=ex.key, seed=seeds[i], text=ex.text,
                             partial_caption=partial[i][0], left_out=list(partial[i][1]),
                             attributes=ex.attributes.as_dict()) for i, ex in enumerate(examples)]
  result["analyses"] = analyses
  result["seconds"] = dict(generate=generate_s, total=time.perf_counter() - start)
  if gallery is not None:
    shown = [(r, out) for r, out in zip(requests, generated) if r.index < gallery_examples]
    from codi_jax.eval_report import write_gallery  # it reads this module's tables
    write_gallery(gallery, result, examples[:gallery_examples], shown)
  return result


def sweep_guidance(pipeline: CoDiPipeline, candidates: Sequence[float], *, num_examples: int,
                   ddim_steps: int, seed: int = 0, split: str = "validation",
                   batch_size: int = 16, progress: bool = True) -> dict[str, Any]:
  """The guidance scale among `candidates` whose single pairs score best on `split` (held-out
  data the benchmark's test split does not share): the mean over attributes of each attribute's
  accuracy (mean over the pairs scoring it), as the summary counts it. Returns {"best",
  "scores": {scale: score}, "unreadable": {scale: share of unreadable outputs}, settings}."""
  if not candidates:
    raise ValueError("sweep_guidance: no candidate guidance scales")
  examples = load_examples(pipeline.config, split, num_examples)
  truths = [e.attributes for e in examples]
  requests = [Request(task, i, ex, example_seed(seed, i)) for task in SINGLE
              for i, ex in enumerate(examples)]
  generate = PipelineGenerator(pipeline, ddim_steps=ddim_steps, guidance_scale=1.0,
                               batch_size=batch_size, progress=progress)
  scores, unreadable = {}, {}
  for scale in candidates:
    # Guidance is a per-row input of the compiled programs: one compile serves every scale.
    generate.options["guidance_scale"] = float(scale)
    outputs = generate(requests)
    hits, unread = {n: [] for n in ATTRIBUTES}, []
    for task in SINGLE:
      (o,) = task.outputs
      names = scored_attributes(task.inputs, o)
      analyses = [analyze(o, out[o]) for r, out in zip(requests, outputs) if r.task == task]
      for n, v in _accuracy(analyses, truths, names).items():
        hits[n].append(v)
      unread.append(_readability(analyses, truths, names)["unreadable_outputs"])
    scores[float(scale)] = float(np.mean([np.mean(v) for v in hits.values() if v]))
    unreadable[float(scale)] = float(np.mean(unread))
  best = max(scores, key=scores.get)
  return dict(best=best, scores=scores, unreadable=unreadable, split=split,
              num_examples=num_examples, ddim_steps=ddim_steps, seed=seed)


def record_guidance(directory: str | os.PathLike, sweep: Mapping[str, Any]) -> None:
  """Writes a sweep's best scale into the checkpoint's `config.sample.guidance_scale` (what
  `generate`, `sample` and `eval` use by default from then on)."""
  config = checkpoint.load_config(directory)
  config.sample.guidance_scale = float(sweep["best"])
  checkpoint.save_config(directory, config)


def evaluate(pipeline: CoDiPipeline, *, num_examples: int = 32, ddim_steps: int = 25,
             guidance_scale: float = 7.5, seed: int = 0, split: str = "test",
             progress: bool = True, batch_size: int = 16,
             gallery: str | os.PathLike | None = None, gallery_examples: int = 2
             ) -> dict[str, Any]:
  """The benchmark of `pipeline` (see the module docstring); a JSON-able dict, printable with
  `eval_report.format_report`. `gallery`: a folder for `index.html` with the first
  `gallery_examples`."""
  generate = PipelineGenerator(pipeline, ddim_steps=ddim_steps, guidance_scale=guidance_scale,
                               batch_size=batch_size, progress=progress)
  settings = dict(ddim_steps=ddim_steps, guidance_scale=guidance_scale, batch_size=batch_size,
                  model_alignment=pipeline.codi_config.alignment.value,
                  preset=pipeline.config.get("preset"))
  result = run_benchmark(pipeline.config, generate, num_examples=num_examples, seed=seed,
                         split=split, settings=settings, gallery=gallery,
                         gallery_examples=gallery_examples, progress=progress)
  result["generation"] = dict(generate.stats)
  return result
