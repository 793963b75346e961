"""Per-modality preprocessing of decoded media into the fixed shapes a training stage feeds.

Host-side numpy, run inside the data pipeline's workers. Images and video frames: resize the
shorter side to the target size (PIL bicubic, antialiased when shrinking), crop a square (centre,
or a random offset drawn from the rng), map uint8 to float32 in [-1, 1]. Video: frames sampled
evenly over the clip, one crop shared by every frame. Audio: pad with trailing zeros or crop
(start, or a random offset) to a fixed number of samples.

H/W input spatial, S target image side, F frames, L samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image


def _check_size(name: str, value: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_frames(frames: np.ndarray, what: str) -> None:
  """frames: uint8 [..., H, W, 3]."""
  if frames.dtype != np.uint8 or frames.shape[-1:] != (3,) or 0 in frames.shape:
    raise ValueError(f"{what} must be non-empty uint8 [..., H, W, 3], got {frames.dtype} "
                     f"{frames.shape}")


def crop_box(height: int, width: int, size: int,
             rng: np.random.Generator | None = None) -> tuple[int, int, int, int]:
  """(resized height, resized width, top, left): the shorter side becomes `size`, then a
  `size` x `size` crop at the centre (rng None) or at a uniformly random offset."""
  _check_size("image size", size)
  scale = size / min(height, width)
  new_h = size if height <= width else max(size, round(height * scale))
  new_w = size if width <= height else max(size, round(width * scale))
  if rng is None:
    return new_h, new_w, (new_h - size) // 2, (new_w - size) // 2
  return (new_h, new_w, int(rng.integers(new_h - size + 1)), int(rng.integers(new_w - size + 1)))


def _resize_crop(frame: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
  """frame uint8 [H, W, 3] -> uint8 [S, S, 3]."""
  new_h, new_w, top, left = box
  if frame.shape[:2] != (new_h, new_w):
    frame = np.asarray(Image.fromarray(frame).resize((new_w, new_h), Image.BICUBIC))
  return frame[top:top + size, left:left + size]


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
  return pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def from_unit_range(pixels: np.ndarray) -> np.ndarray:
  """[-1, 1] (clipped) -> uint8, the inverse of `to_unit_range`."""
  return np.round((np.clip(pixels, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def preprocess_image(image: np.ndarray, size: int,
                     rng: np.random.Generator | None = None) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [S, S, 3] in [-1, 1]; random crop when an rng is given."""
  _check_frames(image, "image")
  if image.ndim != 3:
    raise ValueError(f"image must be [H, W, 3], got shape {image.shape}")
  box = crop_box(image.shape[0], image.shape[1], size, rng)
  return to_unit_range(_resize_crop(image, box, size))


def frame_indices(available: int, wanted: int) -> np.ndarray:
  """`wanted` indices spread evenly over `available` frames, first and last included (int64)."""
  _check_size("available frames", available)
  _check_size("wanted frames", wanted)
  if wanted == 1:
    return np.zeros(1, np.int64)
  return np.round(np.linspace(0, available - 1, wanted)).astype(np.int64)


def preprocess_video(video: np.ndarray, size: int, num_frames: int,
                     rng: np.random.Generator | None = None) -> np.ndarray:
  """uint8 [F', H, W, 3] -> float32 [F, S, S, 3] in [-1, 1], one crop for all frames."""
  _check_frames(video, "video")
  if video.ndim != 4:
    raise ValueError(f"video must be [F, H, W, 3], got shape {video.shape}")
  frames = video[frame_indices(video.shape[0], num_frames)]  # [F, H, W, 3]
  box = crop_box(video.shape[1], video.shape[2], size, rng)
  return to_unit_range(np.stack([_resize_crop(f, box, size) for f in frames]))


def fit_audio(wave: np.ndarray, length: int, rng: np.random.Generator | None = None
              ) -> np.ndarray:
  """float [L'] -> float32 [L]: trailing zeros when short; when long, the first `length`
  samples (rng None) or a window at a uniformly random offset."""
  _check_size("audio length", length)
  wave = np.asarray(wave)
  if wave.ndim != 1 or wave.size == 0 or not np.issubdtype(wave.dtype, np.floating):
    raise ValueError(f"audio must be a non-empty float waveform [L], got {wave.dtype} "
                     f"{wave.shape}")
  wave = wave.astype(np.float32)
  if wave.size < length:
    return np.pad(wave, (0, length - wave.size))
  start = 0 if rng is None else int(rng.integers(wave.size - length + 1))
  return wave[start:start + length]


def collate(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Batch of per-example dicts: arrays stacked on a new leading axis [B, ...], strings as a
  list of B strings."""
  if not examples:
    raise ValueError("collate: no examples to batch")
  names = examples[0].keys()
  for e in examples[1:]:
    if e.keys() != names:
      raise ValueError(f"collate: examples have different fields {sorted(names)} and "
                       f"{sorted(e.keys())}")
  batch = {}
  for name in names:
    values = [e[name] for e in examples]
    batch[name] = list(values) if isinstance(values[0], str) else np.stack(values)
  return batch
