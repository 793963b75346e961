r"""The sampling-job manifest: one JSON request per line, every line validated before any sampling.

  {"id": "dog", "inputs": {"text": "a dog barks", "image": "dog.png"}, "outputs": ["image"],
   "weights": {"text": 2, "image": 1}, "seed": 3, "guidance_scale": 7.5, "ddim_steps": 50}

Fields: `id` (unique; letters, digits, `.`, `_`, `-`; default: the line number) names the item's
output folder. `inputs` maps modalities to a text prompt or to media files (image PNG/JPEG, audio
WAV/FLAC, video MP4), relative to the manifest's folder and inside it (an absolute path or one
climbing out with `..`, or a link leading out, fails its line unless the job allows it:
`--allow_outside_media`). `outputs` is a list of modalities (or "image,audio"). Optional:
`weights` per input, `seed`, `guidance_scale`, `ddim_steps`, `eta`, `num_samples`, `image_size`,
`num_frames`, `audio_seconds`, `alignment`, as in `codi-jax generate` (defaults: the job's).
Blank lines are skipped.

A bad line (not JSON, an unknown field or modality, a missing media file, a bad option, an id used
twice) becomes a `Failure` naming its line; media are decoded when the item is prepared, so a
corrupt file fails its item then (`load_inputs`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import re
from typing import Any, Callable, Mapping

from codi_jax.audio.mel import SAMPLE_RATE
from codi_jax.data import media
from codi_jax.modality import Modality
from codi_jax.pipeline import Program, Settings

OPTIONS = ("seed", "guidance_scale", "ddim_steps", "eta", "num_samples", "image_size",
           "num_frames", "audio_seconds", "alignment")
FIELDS = ("id", "inputs", "outputs", "weights") + OPTIONS
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclasses.dataclass(frozen=True)
class Item:
  """One valid request: its settings (`CoDiPipeline.plan`) and where its inputs are."""

  id: str
  line: int  # 1-based line number in the manifest
  settings: Settings
  text: str | None  # the text prompt, if text is an input
  files: dict[Modality, pathlib.Path]  # media inputs

  @property
  def program(self) -> Program:
    return Program.of(self.settings)

  def fingerprint(self) -> str:
    """A digest of everything the item's outputs depend on: its settings, its text and the bytes
    of its media files. An output made from other settings or inputs has another fingerprint."""
    digest = hashlib.sha256(json.dumps(self.settings.as_json(), sort_keys=True).encode())
    digest.update(json.dumps(self.text).encode())
    for modality, path in sorted(self.files.items()):
      digest.update(modality.value.encode())
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Failure:
  """A request that could not be (or was not) completed, and why."""

  id: str | None
  line: int
  error: str  # exception type name
  message: str

  @classmethod
  def of(cls, id_: str | None, line: int, error: BaseException) -> Failure:
    return cls(id_, line, type(error).__name__, str(error))

  def as_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _item_id(obj: Mapping[str, Any], line: int) -> str:
  value = obj.get("id", str(line))
  if isinstance(value, int) and not isinstance(value, bool):
    value = str(value)
  if not isinstance(value, str) or not _ID.fullmatch(value):
    raise ValueError(f"id {value!r} must be 1-128 letters, digits, '.', '_' or '-', starting "
                     "with a letter or digit (it names the output folder)")
  return value


def _parse(obj: Any, line: int, folder: pathlib.Path, plan: Callable[..., Settings],
           defaults: Mapping[str, Any], allow_outside: bool) -> Item:
  """A decoded line -> Item, or ValueError saying what is wrong."""
  item_id = _item_id(obj, line)
  unknown = sorted(set(obj) - set(FIELDS))
  if unknown:
    raise ValueError(f"unknown field(s) {unknown}; fields are {list(FIELDS)}")
  inputs = obj.get("inputs")
  if not isinstance(inputs, dict) or not inputs:
    raise ValueError('"inputs" must be a non-empty object, e.g. {"text": "a dog barks"}')
  text, files = None, {}
  for key, value in inputs.items():
    m = Modality.parse(key)
    if m is Modality.TEXT:
      if not isinstance(value, str) or not value.strip():
        raise ValueError("the text input must be a non-empty string")
      text = value
      continue
    if not isinstance(value, str) or not value:
      raise ValueError(f"the {m.value} input must be a file path, got {value!r}")
    inside = not os.path.isabs(value) and os.path.normpath(value).split(os.sep)[0] != ".."
    if not inside and not allow_outside:
      raise ValueError(f"{m.value} file {value!r} is not inside the manifest's folder {folder} "
                       "(paths are relative to it; --allow_outside_media lifts this)")
    path = folder / value
    if not path.is_file():
      raise ValueError(f"{m.value} file {value} does not exist (looked for {path})")
    # A symbolic link inside the folder may point out of it: where it leads must be inside too.
    if not allow_outside and not path.resolve().is_relative_to(folder.resolve()):
      raise ValueError(f"{m.value} file {value!r} leads out of the manifest's folder {folder} "
                       f"(a link to {path.resolve()}; --allow_outside_media lifts this)")
    files[m] = path
  outputs = obj.get("outputs")
  if isinstance(outputs, str):
    outputs = [o.strip() for o in outputs.split(",") if o.strip()]
  if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
    raise ValueError('"outputs" must be a list of modalities, e.g. ["image", "audio"]')
  weights = obj.get("weights")
  if weights is not None and not isinstance(weights, dict):
    raise ValueError('"weights" must be an object, e.g. {"text": 2, "image": 1}')
  options = {**defaults, **{k: obj[k] for k in OPTIONS if k in obj}}
  settings = plan(list(inputs), outputs, weights=weights, **options)
  return Item(item_id, line, settings, text, files)


def default_options(config: Any, seed: int | None = None) -> dict[str, Any]:
  """Options for lines that leave them out: the run config's `sample` section, one sample per
  item, and `seed` (default: the config's)."""
  sample = config.sample
  return dict(seed=config.seed if seed is None else seed, guidance_scale=sample.guidance_scale,
              ddim_steps=sample.ddim_steps, eta=sample.eta, num_samples=1)


def read_manifest(path: str | os.PathLike, plan: Callable[..., Settings],
                  defaults: Mapping[str, Any] | None = None, *, allow_outside: bool = False
                  ) -> tuple[list[Item], list[Failure]]:
  """Every line of a manifest -> (valid items, failures), both in line order.

  plan: `CoDiPipeline.plan` (validates the settings); defaults: option values for lines that do
  not give them. Lines whose id is used more than once all fail. Media paths must stay inside
  the manifest's folder (relative, not climbing out with `..`, no link leading out) unless
  `allow_outside`.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"manifest {path} does not exist")
  folder = path.parent
  parsed: list[Item | Failure] = []
  lines_of: dict[str, list[int]] = {}
  for line, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
    if not raw.strip():
      continue
    item_id = None
    try:
      try:
        obj = json.loads(raw)
      except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e}") from None
      if not isinstance(obj, dict):
        raise ValueError(f"a line must be a JSON object, got {type(obj).__name__}")
      item_id = _item_id(obj, line)
      lines_of.setdefault(item_id, []).append(line)
      parsed.append(_parse(obj, line, folder, plan, dict(defaults or {}), allow_outside))
    except (ValueError, TypeError) as e:
      parsed.append(Failure.of(item_id, line, e))
  items, failures = [], []
  for entry in parsed:
    repeated = lines_of.get(entry.id, []) if entry.id is not None else []
    if len(repeated) > 1:
      error = ValueError(f"duplicate id {entry.id!r} (lines {', '.join(map(str, repeated))})")
      entry = Failure.of(entry.id, entry.line, error)
    (items if isinstance(entry, Item) else failures).append(entry)
  return items, failures


def read_input_file(modality: Modality, path: str | os.PathLike, num_frames: int
                    ) -> tuple[Any, str | None]:
  """A media input file -> (what `CoDiPipeline` takes, a note or None).

  Images: uint8 [H, W, 3]. Audio: float32 mono [S] at 16 kHz (other channel counts and rates are
  mixed down and resampled, with a note). Video: `num_frames` frames sampled evenly.
  Raises ValueError (`media.MediaError`) for a missing, corrupt or unsupported file.
  """
  import soundfile

  m, path = Modality.parse(modality), pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"{m.value} file {path} does not exist")
  data = path.read_bytes()
  try:
    if m is Modality.IMAGE:
      return media.decode_image(data), None
    if m is Modality.VIDEO:
      return media.decode_video(data, num_frames), None
    if m is not Modality.AUDIO:
      raise ValueError(f"{m.value} inputs are not files")
    wave = media.decode_audio(data, target_rate=SAMPLE_RATE)  # validates, raises MediaError
  except media.MediaError as e:
    raise e.about(f"{m.value} file {path}") from None
  info = soundfile.info(io.BytesIO(data))
  note = None
  if info.channels != 1 or info.samplerate != SAMPLE_RATE:
    note = (f"{path.name} is {info.channels} channel(s) at {info.samplerate} Hz; mixed to mono "
            f"and resampled to {SAMPLE_RATE} Hz")
  return wave, note


def load_inputs(item: Item) -> tuple[dict[Modality, Any], list[str]]:
  """An item's inputs, decoded: ({modality: data}, notes)."""
  inputs: dict[Modality, Any] = {}
  notes = []
  if item.text is not None:
    inputs[Modality.TEXT] = item.text
  for m, path in item.files.items():
    inputs[m], note = read_input_file(m, path, item.settings.num_frames)
    if note:
      notes.append(note)
  return inputs, notes
