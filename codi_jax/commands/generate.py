r"""codi-jax generate: any-to-any generation from a model checkpoint.

  codi-jax generate --ckpt CKPT --text "a dog barks in the rain" --image dog.png \
      --outputs image,audio,text --out outputs/gen [--weights text=2,image=1] [--seed 0]

Inputs: --text, --image (PNG/JPEG), --audio (WAV/FLAC; mixed to mono and resampled to 16 kHz,
with a note) and --video (MP4; --num_frames frames sampled evenly), any combination. Writes
PNG / 16 kHz WAV / MP4 / TXT per output sample, `result.json` (every setting and the seed) and
`index.html` (inputs beside outputs) to --out, all at once (`codi_jax.outputs`).
"""

from __future__ import annotations

import pathlib

from absl import flags

from codi_jax import checkpoint
from codi_jax.commands import common
from codi_jax.modality import Alignment, Modality
from codi_jax.outputs import write_outputs
from codi_jax.pipeline import CoDiPipeline
from codi_jax.sample.manifest import read_input_file


CKPT = flags.DEFINE_string("ckpt", None, "Model checkpoint folder (`codi_jax.checkpoint`).")
TEXT = flags.DEFINE_string("text", None, "Text prompt.")
IMAGE = flags.DEFINE_string("image", None, "Input image file (PNG or JPEG).")
AUDIO = flags.DEFINE_string("audio", None, "Input audio file (WAV or FLAC).")
VIDEO = flags.DEFINE_string("video", None, "Input video file (MP4).")
OUTPUTS = flags.DEFINE_list("outputs", None, "Output modalities: image, video, audio, text.")
OUT = flags.DEFINE_string("out", None, "Output folder (replaced once the run succeeds).")
WEIGHTS = flags.DEFINE_list("weights", None,
                            "Condition weights per input, e.g. text=2,audio=1 (default: equal).")
GUIDANCE = flags.DEFINE_float("guidance_scale", 7.5, "Classifier-free guidance scale.")
STEPS = flags.DEFINE_integer("ddim_steps", 50, "DDIM steps.")
ETA = flags.DEFINE_float("eta", 0.0, "DDIM eta (0: deterministic updates).")
NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples per output modality.")
IMAGE_SIZE = flags.DEFINE_integer("image_size", None,
                                  "Output image/video side in pixels (default: the config's).")
NUM_FRAMES = flags.DEFINE_integer("num_frames", None,
                                  "Output video frames, and frames read from --video "
                                  "(default: the config's).")
AUDIO_SECONDS = flags.DEFINE_float("audio_seconds", None,
                                   "Output audio length in seconds (default: the config's).")
ALIGNMENT = flags.DEFINE_enum("alignment", None, [a.value for a in Alignment],
                              "Latent alignment of joint outputs (default: the checkpoint's).")
TOKENIZERS = flags.DEFINE_string("tokenizers", None, common.TOKENIZERS_HELP)


def parse_weights(entries: list[str] | None) -> dict[Modality, float] | None:
  """["text=2", "audio=1"] -> {TEXT: 2.0, AUDIO: 1.0}."""
  if not entries:
    return None
  weights = {}
  for entry in entries:
    name, sep, value = entry.partition("=")
    if not sep:
      raise ValueError(f"--weights entry {entry!r} is not modality=weight")
    m = Modality.parse(name.strip())
    try:
      weights[m] = float(value)
    except ValueError:
      raise ValueError(f"--weights entry {entry!r}: {value!r} is not a number") from None
  return weights


def read_inputs(num_frames: int) -> tuple[dict[Modality, object], dict[Modality, str]]:
  """The inputs given on the command line: ({modality: data}, {modality: file path})."""
  inputs, files = {}, {}
  if TEXT.value is not None:
    if not TEXT.value.strip():
      raise ValueError("--text is empty")
    inputs[Modality.TEXT] = TEXT.value
  for m, flag in ((Modality.IMAGE, IMAGE), (Modality.AUDIO, AUDIO), (Modality.VIDEO, VIDEO)):
    if not flag.value:
      continue
    if not pathlib.Path(flag.value).is_file():
      raise ValueError(f"--{flag.name} file {flag.value} does not exist")
    inputs[m], note = read_input_file(m, flag.value, num_frames)
    if note:
      print(f"note: --{flag.name}: {note}")
    files[m] = flag.value
  if not inputs:
    raise ValueError("give at least one input: --text, --image, --audio or --video")
  return inputs, files


def run() -> pathlib.Path:
  if not CKPT.value:
    raise ValueError("--ckpt is required")
  if not OUT.value:
    raise ValueError("--out is required")
  if not OUTPUTS.value:
    raise ValueError("--outputs is required, e.g. --outputs image,audio")
  out = pathlib.Path(OUT.value)
  if out.exists() and not out.is_dir():
    raise ValueError(f"--out {out} exists and is not a folder")
  outputs = [Modality.parse(m.strip()) for m in OUTPUTS.value]
  weights = parse_weights(WEIGHTS.value)
  num_frames = (checkpoint.load_config(CKPT.value).sample.num_frames if NUM_FRAMES.value is None
                else NUM_FRAMES.value)
  if num_frames < 1:
    raise ValueError(f"--num_frames must be a positive integer, got {num_frames}")
  inputs, files = read_inputs(num_frames)  # bad inputs fail before the model loads
  pipe = CoDiPipeline.from_checkpoint(CKPT.value, TOKENIZERS.value)
  seed = pipe.config.seed if common.SEED.value is None else common.SEED.value
  generated = pipe.generate(
      inputs, outputs, weights=weights, guidance_scale=GUIDANCE.value, ddim_steps=STEPS.value,
      eta=ETA.value, seed=seed, num_samples=NUM_SAMPLES.value, image_size=IMAGE_SIZE.value,
      num_frames=num_frames, audio_seconds=AUDIO_SECONDS.value, alignment=ALIGNMENT.value)
  write_outputs(out, generated, files, inputs.get(Modality.TEXT),
                extra=dict(checkpoint=str(pathlib.Path(CKPT.value).resolve()),
                           preset=pipe.config.get("preset")))
  return out


def main(argv: list[str]) -> int:
  del argv
  try:
    out = run()
  except (ValueError, FileNotFoundError) as e:  # media.MediaError is a ValueError
    raise SystemExit(f"codi-jax generate: error: {e}") from None
  print(f"Wrote {out.resolve()}: index.html, result.json and the outputs")
  return 0
