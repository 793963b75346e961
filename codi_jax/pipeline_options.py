"""Where the pipeline may differ from the original CoDi's inference on purpose: typed options.

The original's `model_module_infer` (CODI_REFERENCE §3, `tests/fixtures/codi_e2e/README.md`
"What a reimplementation must match") does a few things a from-scratch model has no reason to
copy. `config.sample` chooses, per preset; the `full` preset (the released weights, converted)
and a config built from the original's own (`convert.original.run_config_from_original`) use the
original's behaviour (`pipeline_options.ORIGINAL`), `tiny` and `small` ours:

  field                 original (full)                               ours (tiny, small)
  pixel_quantization    "truncate": clamp((x + 1) / 2, 0, 1) * 255,   "round": round((clip(x, -1, 1)
                        truncated to uint8 (`ToPILImage`)             + 1) * 127.5), the nearest level
  trim_audio            False: the vocoder's whole output (160 T + 32  True: trimmed to the requested
                        samples for T mel frames)                     audio_seconds
  image_prompt_size     512: an image input goes through              0: the image goes to CLIP's own
                        `regularize_image` first (square crop, PIL    preprocessing as given
                        bicubic resize to 512 x 512, ToTensor, *2-1)
  image_prompt_flip     True: ... and is mirrored with probability    False: never mirrored
                        1/2 (`RandomHorizontalFlip`; here drawn from
                        the request's seed, or fixed per request:
                        `CoDiPipeline.generate(image_flip=...)`)

A config without these fields (a checkpoint written before they existed) gets ours
(`pipeline_options.OURS`), the behaviour it was made with. The square crop of a non-square image
is at a random offset in the original (`RandomCrop`); here it is drawn from the request's seed.

H/W input spatial, S regularised side.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image


class TextDecoding(str, enum.Enum):
  """How Optimus' GPT-2 picks each next token (`CoDiPipeline.generate(text_decoding=...)`)."""

  SAMPLE = "sample"  # the original: a draw from the softmax (top_k 0, top_p 1.0, temperature 1)
  GREEDY = "greedy"  # argmax: deterministic (the original's decode with the draw an argmax)


class PixelQuantization(str, enum.Enum):
  """How decoded images/videos in [-1, 1] become uint8."""

  TRUNCATE = "truncate"  # the original: clamp((x + 1) / 2, 0, 1), * 255, truncated
  ROUND = "round"  # the nearest of the 256 levels


def quantize_pixels(x: jax.Array, mode: PixelQuantization) -> jax.Array:
  """Decoder output (~[-1, 1], any shape) -> uint8, as `mode` says (jit-able; float32 ops in the
  original's order, so truncation boundaries fall where its do)."""
  x = x.astype(jnp.float32)
  if mode is PixelQuantization.TRUNCATE:
    return jnp.floor(jnp.clip((x + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(jnp.uint8)
  return jnp.round((jnp.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
  """The pipeline's choices where ours and the original's differ (see the module docstring)."""

  pixel_quantization: PixelQuantization = PixelQuantization.ROUND
  trim_audio: bool = True
  image_prompt_size: int = 0  # 0: off
  image_prompt_flip: bool = False

  def __post_init__(self):
    object.__setattr__(self, "pixel_quantization",
                       PixelQuantization(self.pixel_quantization))
    for name in ("trim_audio", "image_prompt_flip"):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        raise ValueError(f"config.sample.{name} must be true or false, got "
                         f"{getattr(self, name)!r}")
    size = self.image_prompt_size
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
      raise ValueError(f"config.sample.image_prompt_size must be a non-negative integer (0: off), "
                       f"got {size!r}")
    if self.image_prompt_flip and not size:
      raise ValueError("config.sample.image_prompt_flip needs image_prompt_size > 0 (the flip is "
                       "part of the original's image regularisation)")

  @classmethod
  def from_config(cls, sample: Mapping[str, Any]) -> PipelineOptions:
    """`config.sample`'s fields; absent ones take ours (the defaults, `OURS`)."""
    return cls(**{f.name: sample.get(f.name, f.default) for f in dataclasses.fields(cls)})

  def as_config(self) -> dict[str, Any]:
    """The `config.sample` fields (plain values)."""
    return {f.name: (v.value if isinstance(v, enum.Enum) else v)
            for f in dataclasses.fields(self) for v in (getattr(self, f.name),)}


ORIGINAL = PipelineOptions(PixelQuantization.TRUNCATE, trim_audio=False, image_prompt_size=512,
                           image_prompt_flip=True)
OURS = PipelineOptions()


def regularize_image(image: np.ndarray, size: int, *, flip: bool, offset: int = 0) -> np.ndarray:
  """The original's `regularize_image`: uint8 [H, W, 3] -> float32 [S, S, 3] in [-1, 1].

  The min(H, W) square at `offset` along the longer side (the original's `RandomCrop` draws it;
  square inputs have only offset 0), PIL bicubic resize to size x size, mirrored left-right if
  `flip`, then u8 / 255 * 2 - 1 in float32 (`ToTensor`, `* 2 - 1`).
  """
  h, w = image.shape[:2]
  side = min(h, w)
  if not 0 <= offset <= max(h, w) - side:
    raise ValueError(f"crop offset {offset} is outside [0, {max(h, w) - side}] for a {h}x{w} "
                     "image")
  top, left = (offset, 0) if h > w else (0, offset)
  square = np.ascontiguousarray(image[top:top + side, left:left + side])  # [side, side, 3]
  resized = np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BICUBIC))
  if flip:
    resized = resized[:, ::-1]
  return (resized.astype(np.float32) / np.float32(255)) * np.float32(2) - np.float32(1)
