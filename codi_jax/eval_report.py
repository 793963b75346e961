"""What people read of the benchmark (`codi_jax.evaluate`): the report as text (`format_report`,
printed by `codi-jax eval` and in the demo's report) and the gallery (`write_gallery`, the demo's
`gallery/index.html`): per example its inputs, then every task's outputs with their analysed
attributes, a tick or cross per scored attribute, and the report on top."""

from __future__ import annotations

import html
import os
import pathlib
import re
from typing import Any, Mapping, Sequence

import numpy as np

from codi_jax.audio.mel import SAMPLE_RATE
from codi_jax.data import media
from codi_jax.data import synthetic as syn
from codi_jax.evaluate import (ATTRIBUTES, AUDIO, IMAGE, MODALITIES, TEXT, VIDEO, Prompt,
                               Request, scored_attributes)
from codi_jax.io_utils import atomic_write_bytes, atomic_write_png, atomic_write_text
from codi_jax.modality import Modality
from codi_jax.outputs import VIDEO_FPS



def _cells(values: Mapping[str, float | None], width: int = 9) -> str:
  return "".join(f"{'-' if values.get(a) is None else f'{values[a]:.2f}':>{width}}"
                 for a in ATTRIBUTES)


def _header(title: str, width: int) -> str:
  return f"{title:<{width}}" + "".join(f"{a:>9}" for a in ATTRIBUTES)


def format_report(result: Mapping[str, Any]) -> str:
  """The tables and the summary against the bars, as printable text."""
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
  lines += ["", "4. Joint generation on what the prompt does not name: agreement of the two "
            "outputs on the keyed attributes (colour-pitch, shape-timbre, size-rhythm) a partial "
            "caption leaves out, or on all of them with no prompt; [95 % interval], n outcomes"]
  for key, e in result["unnamed"].items():
    cells = ", ".join(f"{col} {c['agreement']:.2f} [{c['low']:.2f}, {c['high']:.2f}]"
                      for col, c in e["alignments"].items())
    first = next(iter(e["alignments"].values()))
    lines.append(f"  {key}: {cells} (n {first['n']}, chance {first['chance']:.2f})")
  lines += ["", "5. Single pairs: share of outputs the analyzers could not read (counted wrong "
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
  u = result["summary"]["unnamed_agreement"]
  lines.append(f"unnamed-attribute agreement: others {u['others']['agreement']:.2f} vs self "
               f"{u['self']['agreement']:.2f} and none {u['none']['agreement']:.2f} (n "
               f"{u['others']['n']}): {'met' if u['met'] else 'NOT met'} ({u['gap']:+.2f}; bar: "
               f"others >= both + {u['bar']:.1f}, 95 % intervals apart: "
               f"{'yes' if u['intervals_apart'] else 'no'})")
  lines.append("all bars met" if result["summary"]["all_met"] else "some bars NOT met")
  return "\n".join(lines)


def format_sweep(sweep: Mapping[str, Any]) -> str:
  """One line per guidance scale of `evaluate.sweep_guidance`, the chosen one marked."""
  lines = [f"Guidance sweep: single pairs on {sweep['num_examples']} {sweep['split']} examples, "
           f"{sweep['ddim_steps']} DDIM steps (score: mean attribute accuracy)"]
  for scale, score in sweep["scores"].items():
    mark = "  <- chosen" if scale == sweep["best"] else ""
    lines.append(f"  guidance {scale:g}: {score:.3f} ({sweep['unreadable'][scale]:.2f} of "
                 f"outputs unreadable){mark}")
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
      prompt = {Prompt.PARTIAL: f"<br><q>{html.escape(request.caption or '')}</q>",
                Prompt.NONE: "<br>(no prompt)"}.get(task.prompt, "")
      rows.append(f"<tr><th>{html.escape(task.key)}{prompt}</th><td>{''.join(cells)}</td></tr>")
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
