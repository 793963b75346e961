"""The any-to-any benchmark (`codi-jax eval`): CoDi scored on held-out examples of the embedded
synthetic dataset by the dataset's own analyzers (`codi_jax.data.analyzers`).

Three sections, each a table:
  single  every input -> output pair over text, image, video and audio (16, same modality
          included): accuracy of every attribute the output carries that the input determines.
  multi   two inputs mixed (`MULTI`) -> one output, next to each input alone (its single pair).
  joint   text -> two outputs generated together (`JOINT`), with `alignment=others`, `self`, and
          no connectors (each output alone from the same seed: the single pairs' outputs); per
          attribute the agreement of the two outputs (`analyzers.agreement`) and each one's
          accuracy against the text.
All inputs of a request come from one example, so every output is scored against that example's
ground truth (`Attributes.as_dict`, all eight attributes). The summary sets each attribute's
accuracy (mean over the single pairs that score it) against fixed accuracy bars: colour and
pitch >= 0.9, every other attribute >= 0.7, and mean joint agreement with `others` above `self`.
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
import html
import os
import pathlib
import re
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from codi_jax.audio.mel import SAMPLE_RATE
from codi_jax.data import analyzers, media, preprocess
from codi_jax.data import synthetic as syn
from codi_jax.io_utils import atomic_write_bytes, atomic_write_png, atomic_write_text
from codi_jax.modality import Alignment, Modality
from codi_jax.outputs import VIDEO_FPS
from codi_jax.pipeline import CoDiPipeline, Program, Rows, Settings

TEXT, IMAGE, VIDEO, AUDIO = Modality.TEXT, Modality.IMAGE, Modality.VIDEO, Modality.AUDIO
MODALITIES = (TEXT, IMAGE, VIDEO, AUDIO)
ATTRIBUTES = tuple(syn.ATTRIBUTE_VALUES)  # the table columns, visual ones first
# The accuracy bars of the single pairs (what a trained model must reach); do not lower them.
BARS = {"colour": 0.9, "pitch": 0.9}
DEFAULT_BAR = 0.7
UNREADABLE_BAR = 0.02  # at most this share of an output modality's outputs unreadable
NONE = "none"  # the joint column whose outputs were generated alone


@dataclasses.dataclass(frozen=True)
class Task:
  """What one request of every example asks: its inputs, its outputs and, for joint outputs, the
  alignment (None: the model's own, which a single output never uses)."""

  inputs: tuple[Modality, ...]
  outputs: tuple[Modality, ...]
  alignment: Alignment | None = None

  @property
  def key(self) -> str:
    name = f"{'+'.join(m.value for m in self.inputs)}->{'+'.join(m.value for m in self.outputs)}"
    return name if self.alignment is None else f"{name} [{self.alignment.value}]"


SINGLE = tuple(Task((i,), (o,)) for i in MODALITIES for o in MODALITIES)
MULTI = (Task((TEXT, AUDIO), (IMAGE,)), Task((IMAGE, AUDIO), (TEXT,)),
         Task((TEXT, IMAGE), (AUDIO,)), Task((VIDEO, AUDIO), (IMAGE,)))
JOINT = (((TEXT,), (IMAGE, AUDIO)), ((TEXT,), (VIDEO, AUDIO)))
ALIGNMENTS = (Alignment.OTHERS, Alignment.SELF)
TASKS = SINGLE + MULTI + tuple(Task(i, o, a) for i, o in JOINT for a in ALIGNMENTS)


@dataclasses.dataclass(frozen=True)
class Request:
  """One task on one example: its inputs are the example's media, its noise from `seed`."""

  task: Task
  index: int  # the example's position in the evaluated list
  example: syn.SyntheticExample
  seed: int

  def inputs(self) -> dict[Modality, Any]:
    return {m: getattr(self.example, m.value) for m in self.task.inputs}


# One {output modality: media} per request, in request order: image uint8 [H, W, 3], video uint8
# [F, H, W, 3], audio float32 [S] at 16 kHz, text a string.
Generate = Callable[[Sequence[Request]], list[Mapping[Modality, Any]]]


# ---------------------------------------------------------------------------------------------
# Examples.


def dataset_config(config: ml_collections.ConfigDict) -> syn.SyntheticConfig:
  """The synthetic dataset as the training stages read it (`codi_jax.train.data.sources`)."""
  d = config.data
  return syn.SyntheticConfig(image_size=max(32, d.image_size), num_frames=d.num_frames,
                             audio_seconds=max(0.5, d.audio_samples / SAMPLE_RATE),
                             seed=config.seed)


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


def score(examples: Sequence[syn.SyntheticExample], analyses: Analyses) -> dict[str, Any]:
  """The three sections and the summary from every task's analyses (see the module docstring)."""
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
  return dict(single=single, multi=multi, joint=joint, summary=_summary(single, joint))


def _summary(single: Mapping[str, Any], joint: Mapping[str, Any]) -> dict[str, Any]:
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
  return dict(attributes=attributes, outputs=outputs, joint_agreement=agreement,
              all_met=(all(a["met"] for a in attributes.values()) and agreement["met"]
                       and all(o["met"] for o in outputs.values())))


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
      rows = stack_rows([self.pipe.prepare(settings[i], requests[i].inputs()) for i in members],
                        slots)
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
  requests = [Request(task, i, ex, seeds[i]) for task in TASKS for i, ex in enumerate(examples)]
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
  result = score(examples, analyses)
  d = config.data
  result["settings"] = dict(
      num_examples=num_examples, seed=seed, split=split, image_size=int(d.image_size),
      num_frames=int(d.num_frames), audio_seconds=int(d.audio_samples) / SAMPLE_RATE,
      dataset=dataclasses.asdict(dataset_config(config)), **dict(settings or {}))
  result["chance"] = dict(analyzers.CHANCE)
  result["examples"] = [dict(index=i, key=ex.key, seed=seeds[i], text=ex.text,
                             attributes=ex.attributes.as_dict()) for i, ex in enumerate(examples)]
  result["analyses"] = analyses
  result["seconds"] = dict(generate=generate_s, total=time.perf_counter() - start)
  if gallery is not None:
    shown = [(r, out) for r, out in zip(requests, generated) if r.index < gallery_examples]
    write_gallery(gallery, result, examples[:gallery_examples], shown)
  return result


def evaluate(pipeline: CoDiPipeline, *, num_examples: int = 32, ddim_steps: int = 25,
             guidance_scale: float = 7.5, seed: int = 0, split: str = "test",
             progress: bool = True, batch_size: int = 16,
             gallery: str | os.PathLike | None = None, gallery_examples: int = 2
             ) -> dict[str, Any]:
  """The benchmark of `pipeline` (see the module docstring); a JSON-able dict, printable with
  `format_report`. `gallery`: a folder for `index.html` with the first `gallery_examples`."""
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


# ---------------------------------------------------------------------------------------------
# Report.


def _cells(values: Mapping[str, float | None], width: int = 9) -> str:
  return "".join(f"{'-' if values.get(a) is None else f'{values[a]:.2f}':>{width}}"
                 for a in ATTRIBUTES)


def _header(title: str, width: int) -> str:
  return f"{title:<{width}}" + "".join(f"{a:>9}" for a in ATTRIBUTES)


def format_report(result: Mapping[str, Any]) -> str:
  """The three tables and the summary against the bars, as printable text."""
  s = result["settings"]
  lines = [f"Any-to-any benchmark: {s['num_examples']} {s['split']} examples, seed {s['seed']}"
           + (f", {s['ddim_steps']} DDIM steps, guidance {s['guidance_scale']}"
              if "ddim_steps" in s else ""), ""]
  w = 26
  lines += ["1. Single input -> single output: attribute accuracy ('-': not scored)",
            _header("pair", w), f"{'chance':<{w}}" + _cells(result["chance"])]
  lines += [f"{k:<{w}}" + _cells(e["accuracy"]) for k, e in result["single"].items()]
  lines += ["", "2. Multi-input conditioning versus each input alone",
            _header("inputs -> output", w)]
  for key, e in result["multi"].items():
    lines.append(f"{key:<{w}}" + _cells(e["accuracy"]))
    lines += [f"{'  ' + m + ' alone':<{w}}" + _cells(acc) for m, acc in e["alone"].items()]
  lines += ["", "3. Joint generation: agreement of the outputs and each one's accuracy "
            "(none: each output alone)", _header("task / alignment", w)]
  for key, e in result["joint"].items():
    lines.append(key)
    for col, c in e["alignments"].items():
      lines.append(f"{'  ' + col + ' agreement':<{w}}" + _cells(c["agreement"]))
      lines += [f"{'  ' + col + ' ' + m:<{w}}" + _cells(acc) for m, acc in c["accuracy"].items()]
    lines.append("  mean agreement: " + ", ".join(
        f"{col} {c['mean_agreement']:.2f}" for col, c in e["alignments"].items()))
  lines += ["", "4. Single pairs: share of outputs the analyzers could not read (counted wrong "
            "above)", _header("pair", w)]
  lines += [f"{k:<{w}}" + _cells(e["unreadable"]) for k, e in result["single"].items()]
  lines += ["", "Summary: accuracy = mean over the single pairs scoring the attribute; unread = "
            "the share unreadable; readable = accuracy among the readable; bar = the accuracy "
            "required",
            f"{'attribute':<10}{'accuracy':>9}{'unread':>8}{'readable':>9}{'chance':>8}{'bar':>6}"
            "  status"]
  for name, a in result["summary"]["attributes"].items():
    status = "met" if a["met"] else "NOT met"
    readable = "-" if a["readable_accuracy"] is None else f"{a['readable_accuracy']:.2f}"
    lines.append(f"{name:<10}{a['accuracy']:>9.2f}{a['unreadable']:>8.2f}{readable:>9}"
                 f"{a['chance']:>8.2f}{a['bar']:>6.2f}  {status} ({a['gap']:+.2f}; worst "
                 f"{a['worst_pair']} {a['worst_accuracy']:.2f})")
  for m, o in result["summary"]["outputs"].items():
    accuracy = ", ".join(f"{n} {v:.2f}" for n, v in o["accuracy"].items())
    lines.append(f"{m} outputs: {o['unreadable']:.2f} unreadable (bar <= {o['unreadable_bar']:.2f}"
                 f": {'met' if o['met'] else 'NOT met'}); accuracy from every input: {accuracy}")
  j = result["summary"]["joint_agreement"]
  lines.append(f"joint agreement: others {j['others']:.2f} vs self {j['self']:.2f} (none "
               f"{j['none']:.2f}): {'met' if j['met'] else 'NOT met'} ({j['gap']:+.2f}; bar: "
               "others > self)")
  lines.append("all bars met" if result["summary"]["all_met"] else "some bars NOT met")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Gallery.


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", text.lower().replace("->", " to ")).strip("_")


def _write_media(folder: pathlib.Path, name: str, m: Modality, value: Any) -> str | None:
  """One medium to `folder/name.<ext>` (atomically); returns its file name (None for text)."""
  if m is IMAGE:
    return atomic_write_png(folder / f"{name}.png", np.asarray(value, np.uint8)).name
  if m is VIDEO:
    data = media.encode_mp4(np.asarray(value, np.uint8), VIDEO_FPS, lossless=False)
    return atomic_write_bytes(folder / f"{name}.mp4", data).name
  if m is AUDIO:
    data = media.encode_wav(np.asarray(value, np.float32), SAMPLE_RATE)
    return atomic_write_bytes(folder / f"{name}.wav", data).name
  return None


def _figure(m: Modality, value: Any, src: str | None, caption: str) -> str:
  if m is TEXT:
    body = f"<blockquote>{html.escape(value)}</blockquote>"
  elif m is IMAGE:
    body = f'<img src="{html.escape(src)}" alt="{html.escape(src)}">'
  elif m is VIDEO:
    body = f'<video src="{html.escape(src)}" controls loop muted></video>'
  else:
    body = f'<audio src="{html.escape(src)}" controls></audio>'
  return f"<figure>{body}<figcaption>{caption}</figcaption></figure>"


def _marks(analysis: Mapping[str, str], truth: Mapping[str, str], names: Sequence[str]) -> str:
  items = []
  for n in names:
    ok = analysis.get(n) == truth[n]
    items.append(f"<li class={'ok' if ok else 'bad'}>{html.escape(n)}: "
                 f"{html.escape(str(analysis.get(n)))} {'&#10003;' if ok else '&#10007;'}</li>")
  return f"<ul>{''.join(items)}</ul>"


def write_gallery(directory: str | os.PathLike, result: Mapping[str, Any],
                  examples: Sequence[syn.SyntheticExample],
                  shown: Sequence[tuple[Request, Mapping[Modality, Any]]]) -> pathlib.Path:
  """`directory/index.html`: per example its inputs, then every task's outputs with their
  analysed attributes, a tick or cross per scored attribute; the report on top. Media files are
  written atomically under `media/`, the page last."""
  directory = pathlib.Path(directory)
  folder = directory / "media"
  sections = []
  for i, ex in enumerate(examples):
    truth = ex.attributes.as_dict()
    inputs = []
    for m in MODALITIES:
      name = _write_media(folder, f"example{i}_input_{m.value}", m, getattr(ex, m.value))
      inputs.append(_figure(m, getattr(ex, m.value), name and f"media/{name}", f"input {m.value}"))
    rows = []
    for request, out in shown:
      if request.index != i:
        continue
      task = request.task
      cells = []
      for m in task.outputs:
        name = _write_media(folder, f"example{i}_{_slug(task.key)}_{m.value}", m, out[m])
        analysis = result["analyses"][task.key][i][m.value]
        marks = _marks(analysis, truth, scored_attributes(task.inputs, m))
        cells.append(_figure(m, out[m], name and f"media/{name}", f"{m.value}{marks}"))
      rows.append(f"<tr><th>{html.escape(task.key)}</th><td>{''.join(cells)}</td></tr>")
    facts = ", ".join(f"{k} {v}" for k, v in truth.items())
    sections.append(f"<h2>example {i} (seed {result['examples'][i]['seed']})</h2>"
                    f"<p>{html.escape(facts)}</p><div>{''.join(inputs)}</div><table>{''.join(rows)}"
                    "</table>")
  page = ("<!doctype html><meta charset=utf-8><title>codi-jax eval</title>"
          "<style>body{font-family:sans-serif}figure{display:inline-block;margin:6px;"
          "vertical-align:top}img,video{width:128px;image-rendering:pixelated}"
          "th{text-align:left;vertical-align:top;padding-right:12px}ul{margin:2px;padding-left:"
          "16px;font-size:small}.ok{color:green}.bad{color:#b00}blockquote{max-width:320px}"
          "</style><h1>codi-jax eval: the any-to-any benchmark</h1>"
          f"<pre>{html.escape(format_report(result))}</pre>{''.join(sections)}\n")
  return atomic_write_text(directory / "index.html", page)
