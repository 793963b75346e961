"""Writing a generation run to a folder: media files, `result.json` and an `index.html` viewer.

The folder appears all at once: everything is written into a temporary sibling folder which is
renamed into place only when complete (an existing folder of that name is replaced only then), so
a failed run leaves no half-written output. Layout:

  inputs/<modality>.<ext>       the input files as given (a text input is kept in result.json)
  image_<i>.png                 uint8 [H, W, 3]
  video_<i>.mp4                 H.264, `VIDEO_FPS` frames per second
  audio_<i>.wav                 16 kHz mono PCM-16
  text_<i>.txt                  UTF-8
  result.json                   every setting, the seed and the file list
  index.html                    inputs beside outputs, with audio and video players
"""

from __future__ import annotations

import html
import os
import pathlib
import shutil
from typing import Any, Mapping

from codi_jax.audio.mel import SAMPLE_RATE
from codi_jax.data import media
from codi_jax.io_utils import (atomic_write_bytes, atomic_write_json, atomic_write_png,
                               atomic_write_text, remove_stale_temps, temp_dir)
from codi_jax.modality import Modality
from codi_jax.pipeline import Generated

VIDEO_FPS = 8  # frames per second of written videos


def _write_media(folder: pathlib.Path, generated: Generated) -> dict[str, list[str]]:
  """Each output sample to its file; returns {modality: [file names]}."""
  files: dict[str, list[str]] = {}
  for i, image in enumerate([] if generated.image is None else generated.image):
    files.setdefault("image", []).append(atomic_write_png(folder / f"image_{i}.png", image).name)
  for i, video in enumerate([] if generated.video is None else generated.video):
    data = media.encode_mp4(video, VIDEO_FPS, lossless=False)
    files.setdefault("video", []).append(atomic_write_bytes(folder / f"video_{i}.mp4", data).name)
  for i, wave in enumerate([] if generated.audio is None else generated.audio):
    data = media.encode_wav(wave, SAMPLE_RATE)
    files.setdefault("audio", []).append(atomic_write_bytes(folder / f"audio_{i}.wav", data).name)
  for i, text in enumerate(generated.text or []):
    files.setdefault("text", []).append(atomic_write_text(folder / f"text_{i}.txt",
                                                          text + "\n").name)
  return files


def _player(modality: str, src: str) -> str:
  src = html.escape(src)
  if modality == Modality.IMAGE.value:
    return f'<img src="{src}" alt="{src}">'
  if modality == Modality.VIDEO.value:
    return f'<video src="{src}" controls loop muted></video>'
  if modality == Modality.AUDIO.value:
    return f'<audio src="{src}" controls></audio>'
  return f'<a href="{src}">{src}</a>'


def _page(result: Mapping[str, Any], texts: Mapping[str, list[str]]) -> str:
  """index.html: the inputs on the left, the outputs (one row per sample) on the right."""
  inputs = []
  for modality, entry in result["inputs"].items():
    body = (f"<blockquote>{html.escape(entry)}</blockquote>" if modality == "text"
            else _player(modality, entry))
    inputs.append(f"<figure>{body}<figcaption>input {html.escape(modality)}</figcaption></figure>")
  rows = []
  for i in range(result["settings"]["num_samples"]):
    cells = []
    for modality, names in result["output_files"].items():
      body = (f"<blockquote>{html.escape(texts[modality][i])}</blockquote>"
              f"{_player(modality, names[i])}" if modality == "text"
              else _player(modality, names[i]))
      cells.append(f"<figure>{body}<figcaption>{html.escape(modality)} #{i}</figcaption>"
                   "</figure>")
    rows.append(f"<div class=row>{''.join(cells)}</div>")
  s = result["settings"]
  summary = html.escape(
      f"{', '.join(s['inputs'])} -> {', '.join(s['outputs'])}; weights {s['weights']}; seed "
      f"{s['seed']}, {s['ddim_steps']} DDIM steps (eta {s['eta']}), guidance "
      f"{s['guidance_scale']}, alignment {s['alignment']}")
  return ("<!doctype html><meta charset=utf-8><title>codi-jax generate</title>"
          "<style>body{font-family:sans-serif}main{display:flex;gap:32px}"
          "figure{display:inline-block;margin:8px;vertical-align:top}img,video{max-width:256px}"
          "blockquote{max-width:320px}</style>"
          f"<h1>codi-jax generate</h1><p>{summary}</p><main>"
          f"<section><h2>inputs</h2>{''.join(inputs)}</section>"
          f"<section><h2>outputs</h2>{''.join(rows)}</section></main>\n")


def write_outputs(directory: str | os.PathLike, generated: Generated,
                  input_files: Mapping[Modality | str, str | os.PathLike] | None = None,
                  input_text: str | None = None, extra: Mapping[str, Any] | None = None
                  ) -> dict[str, Any]:
  """Writes a `Generated` (and copies of its input files) to `directory`, atomically.

  input_files: {modality: path} of the media inputs, copied to `inputs/`; input_text: the text
  prompt, if any. extra: more entries for `result.json` (e.g. the checkpoint path).
  Returns the `result.json` contents.
  """
  directory = pathlib.Path(directory)
  directory.parent.mkdir(parents=True, exist_ok=True)
  remove_stale_temps(directory)  # a killed earlier write's
  staging = temp_dir(directory)
  try:
    copied = {}
    for modality, path in (input_files or {}).items():
      m, path = Modality.parse(modality), pathlib.Path(path)
      name = f"inputs/{m.value}{path.suffix.lower()}"
      atomic_write_bytes(staging / name, path.read_bytes())
      copied[m.value] = name
    if input_text is not None:
      copied[Modality.TEXT.value] = input_text
    result = dict(settings=generated.settings.as_json(), inputs=copied,
                  output_files=_write_media(staging, generated), **dict(extra or {}))
    atomic_write_json(staging / "result.json", result)
    atomic_write_text(staging / "index.html",
                      _page(result, {Modality.TEXT.value: generated.text or []}))
    _swap_into_place(staging, directory)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return result


def _swap_into_place(staging: pathlib.Path, directory: pathlib.Path) -> None:
  """Renames the finished `staging` folder to `directory`, replacing an existing one."""
  if not directory.exists():
    os.replace(staging, directory)
    return
  if not directory.is_dir():
    raise ValueError(f"output path {directory} exists and is not a folder")
  old = temp_dir(directory, suffix=".old")
  os.replace(directory, old / "previous")
  os.replace(staging, directory)
  shutil.rmtree(old, ignore_errors=True)
