"""Host-side CLIP image preprocessing, as CoDi's `FrozenCLIP.encode_vision` runs it.

The original hands `(x + 1) / 2` (float HWC numpy) to transformers 4.26's
`CLIPFeatureExtractor` (CODI_REFERENCE §1.2, fixture README quirk 8): a float image becomes a PIL
image through `* 255` and `astype(uint8)` (truncation, not rounding), its shortest edge is resized
to `size` with PIL's bicubic filter (the other edge `int(size * long / short)`), a `crop_size`
square is cut from the centre (offsets rounded down), and the uint8 result is rescaled by 1/255 and
normalised with the CLIP mean/std. Video frames are processed one by one. PIL resampling is not
an XLA op, so this runs on the host with numpy; the model gets the resulting pixel values.

B batch, F frames, H/W input spatial, S crop side; channels last (3 = RGB).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {int(m): m for m in Image.Resampling}


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """`preprocessor_config.json` of openai/clip-vit-large-patch14 (resize, crop, normalise)."""

  size: int = 224  # shortest edge after resizing
  crop_size: int = 224
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD
  resample: int = int(Image.Resampling.BICUBIC)

  def __post_init__(self):
    object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
    object.__setattr__(self, "std", tuple(float(v) for v in self.std))
    if self.size < 1 or self.crop_size < 1:
      raise ValueError(f"PreprocessConfig: size {self.size} and crop_size {self.crop_size} must "
                       "be positive")
    if self.crop_size > self.size:
      raise ValueError(f"PreprocessConfig: crop_size {self.crop_size} exceeds the resized "
                       f"shortest edge {self.size}")
    if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
      raise ValueError(f"PreprocessConfig: mean {self.mean} / std {self.std} need 3 entries, "
                       "std > 0")
    if self.resample not in _RESAMPLE:
      raise ValueError(f"PreprocessConfig: unknown PIL resample filter {self.resample}")


def _edge(value: Any, name: str, keys: tuple[str, ...]) -> int:
  """An int, or a transformers size dict ({"shortest_edge": n} / {"height": n, "width": n})."""
  if isinstance(value, Mapping):
    sides = {value.get(k) for k in keys}
    if len(sides) != 1 or None in sides:
      raise ValueError(f"processor_config.{name} must give one square size via {keys}, "
                       f"got {dict(value)}")
    value = sides.pop()
  return int(value)


def preprocess_config_from_original(d: Mapping[str, Any]) -> PreprocessConfig:
  """The original processor's config dict (fixture `processor_config`) -> PreprocessConfig."""
  for flag in ("do_resize", "do_center_crop", "do_normalize"):
    if not d.get(flag, True):
      raise ValueError(f"processor_config.{flag}=False is not supported; CoDi's CLIP always "
                       "resizes, centre-crops and normalises")
  return PreprocessConfig(
      size=_edge(d.get("size", 224), "size", ("shortest_edge",)),
      crop_size=_edge(d.get("crop_size", 224), "crop_size", ("height", "width")),
      mean=tuple(d.get("image_mean", CLIP_MEAN)),
      std=tuple(d.get("image_std", CLIP_STD)),
      resample=int(d.get("resample", Image.Resampling.BICUBIC)),
  )


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
  """(height, width) after resizing the shortest edge to `size` (long edge truncated)."""
  short, long = min(height, width), max(height, width)
  if short == size:
    return height, width
  long = int(size * long / short)
  return (long, size) if width <= height else (size, long)


def crop_box(height: int, width: int, crop: int) -> tuple[int, int]:
  """(top, left) of a centred crop x crop window."""
  return (height - crop) // 2, (width - crop) // 2


def _frame(x: np.ndarray, config: PreprocessConfig) -> np.ndarray:
  """One [-1, 1] image [H, W, 3] -> normalised pixel values [S, S, 3] float32."""
  unit = (x.astype(np.float32) + np.float32(1)) / np.float32(2)  # [H, W, 3] in [0, 1]
  pil = Image.fromarray((unit * np.float32(255)).astype(np.uint8))
  h, w = resized_shape(x.shape[0], x.shape[1], config.size)
  resized = np.asarray(pil.resize((w, h), resample=_RESAMPLE[config.resample]))  # [h, w, 3]
  top, left = crop_box(h, w, config.crop_size)
  crop = resized[top:top + config.crop_size, left:left + config.crop_size]  # [S, S, 3] uint8
  mean, std = np.asarray(config.mean), np.asarray(config.std)
  return ((crop * (1 / 255) - mean) / std).astype(np.float32)


def preprocess(x: np.ndarray, config: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
  """Images [B, H, W, 3] or videos [B, F, H, W, 3] in [-1, 1] -> pixel values [..., S, S, 3].

  Values must lie in [-1, 1]: the original's uint8 cast wraps anything else around.
  """
  x = np.asarray(x)
  if x.ndim not in (4, 5):
    raise ValueError(f"CLIP preprocessing expects images [B, H, W, 3] or videos "
                     f"[B, F, H, W, 3], got shape {x.shape}")
  if x.shape[-1] != 3:
    raise ValueError(f"CLIP preprocessing expects 3 (RGB) channels last, got shape {x.shape}")
  if 0 in x.shape:
    raise ValueError(f"CLIP preprocessing got an empty batch, frame or image: shape {x.shape}")
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"CLIP preprocessing expects floating values in [-1, 1], got {x.dtype}")
  # (x+1)/2*255 must truncate into [0, 255]: x within [-1, 1] up to a fraction of one level.
  lo, hi = float(x.min()), float(x.max())
  if not (np.isfinite(lo) and np.isfinite(hi) and lo > -1 - 2 / 255 and hi < 1 + 2 / 255):
    raise ValueError(f"CLIP preprocessing expects values in [-1, 1], got range [{lo}, {hi}]")
  frames = x.reshape((-1,) + x.shape[-3:])  # [B*F, H, W, 3]
  out = np.stack([_frame(f, config) for f in frames])  # [B*F, S, S, 3]
  return out.reshape(x.shape[:-3] + out.shape[1:])
