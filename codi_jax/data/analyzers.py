"""Analyzers that read the synthetic dataset's attributes back from any image, video, audio clip or
caption, real or generated (see `synthetic` for the attributes and how each modality shows them).

They are exact on clean generator output and robust to mild corruption (Gaussian pixel noise of
0.1 of the range, slight blur, brightness shifts; additive noise at 10 dB SNR and gain changes;
case and punctuation changes), so they can score any-to-any generation: accuracy of an output's
attributes against the prompt's, and agreement between jointly generated outputs.

  image  the object is the largest connected region of high chroma (max - min channel) against
         the grey background. Colour: nearest palette hue of its mean colour. Shape: the
         anti-aliased template (same area, same centroid) that best fits its soft mask. Size: its
         half-extent implied by area and shape. Position: quadrant of its centroid.
  video  the same per frame, pooled over frames; motion: dominant axis and sign of the centroid's
         least-squares velocity.
  audio  pitch: the palette pitch whose band holds the most energy (the fundamental is the loudest
         partial of every timbre). Timbre: 2nd and 3rd partials relative to the fundamental.
         Rhythm: quiet-to-loud ratio of 20 ms frame RMS (pulsed tones are silent half the time).
  text   words from each attribute's vocabulary, after lower-casing and dropping punctuation.

An attribute that cannot be read (no object, silence, no matching word) is UNKNOWN, which never
counts as correct nor as agreement.

F frames, H/W height/width, S audio samples.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import numpy as np

from codi_jax.data import synthetic as syn
from codi_jax.modality import Modality

UNKNOWN = "unknown"

ATTRIBUTES_BY_MODALITY: dict[Modality, tuple[str, ...]] = {
    Modality.TEXT: tuple(syn.ATTRIBUTE_VALUES),
    Modality.IMAGE: ("colour", "shape", "size", "position"),
    Modality.VIDEO: ("colour", "shape", "size", "position", "motion"),
    Modality.AUDIO: ("pitch", "timbre", "rhythm"),
}
# Accuracy of a uniform guess: attributes are sampled uniformly and independently.
CHANCE: dict[str, float] = {name: 1.0 / len(kind) for name, kind in syn.ATTRIBUTE_VALUES.items()}

_MIN_CONTRAST = 48.0  # chroma (0-255) an object must stand out by
_SIZE_THRESHOLD = math.sqrt(syn.SIZE_EXTENT[syn.Size.SMALL] * syn.SIZE_EXTENT[syn.Size.LARGE])
_TEMPLATE_BLURS = 2  # shape templates are also fitted after one and two [1, 2, 1] blurs
_MIN_RMS = 1e-4
_PITCH_BAND = 1.08  # +-8%: bands of neighbouring pitches (a tritone apart) do not overlap
_PARTIAL_HALF_WIDTH_HZ = 30.0  # captures the pulse envelope's sidebands of each partial
_SAWTOOTH_2ND = 0.25  # sawtooth's 2nd partial is 1/2 of the fundamental, the others' 0
_SQUARE_3RD = 0.2  # square 1/3, triangle 1/9, sine 0
_TRIANGLE_3RD = 0.055
_RMS_FRAME_S = 0.02
_PULSED_RATIO = 0.4  # 10th / 90th percentile of frame RMS: pulsed ~0 (noise), steady ~1


def _unknown(names: Iterable[str]) -> dict[str, str]:
  return {name: UNKNOWN for name in names}


# ---------------------------------------------------------------------------------------------
# Pictures.


def _check_image(image: np.ndarray, what: str) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"{what} must be [H, W, 3], got shape {image.shape}")
  if image.shape[0] < 8 or image.shape[1] < 8:
    raise ValueError(f"{what} must be at least 8x8 pixels, got {image.shape[:2]}")
  if image.dtype != np.uint8:
    raise ValueError(f"{what} must be uint8, got {image.dtype}")
  return image.astype(np.float64)


def _pool_max(values: np.ndarray) -> np.ndarray:
  """3x3 max-pooling with zero padding, same shape."""
  h, w = values.shape
  padded = np.zeros((h + 2, w + 2), values.dtype)
  padded[1:-1, 1:-1] = values
  pooled = values.copy()
  for i in range(3):
    for j in range(3):
      np.maximum(pooled, padded[i:i + h, j:j + w], out=pooled)
  return pooled


def _blur(image: np.ndarray) -> np.ndarray:
  """Separable [1, 2, 1] / 4 blur, edges repeated."""
  out = image.copy()
  for axis in (0, 1):
    x = np.moveaxis(out, axis, 0)
    y = x.copy()
    y[1:-1] = 0.25 * x[:-2] + 0.5 * x[1:-1] + 0.25 * x[2:]
    y[0] = 0.75 * x[0] + 0.25 * x[1]
    y[-1] = 0.25 * x[-2] + 0.75 * x[-1]
    out = np.moveaxis(y, 0, axis)
  return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
  """The largest 8-connected region of a boolean mask (labels spread by 3x3 max-pooling)."""
  h, w = mask.shape
  labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
  while True:
    spread = np.where(mask, _pool_max(labels), 0)
    if np.array_equal(spread, labels):
      break
    labels = spread
  counts = np.bincount(labels.ravel())
  counts[0] = 0
  return labels == np.argmax(counts)


class _Blob:
  """The object found in one frame: soft mask [H, W], area, centroid (x, y), mean colour and
  the fit error of every shape template (sum of squares over a window around the object)."""

  def __init__(self, pixels: np.ndarray):
    chroma = pixels.max(axis=-1) - pixels.min(axis=-1)  # [H, W]
    background = float(np.median(chroma))
    # The object covers more than 1% of the frame, so the 99th percentile lies inside it.
    peak = float(np.percentile(chroma, 99))
    self.found = peak - background >= _MIN_CONTRAST
    if not self.found:
      return
    region = _largest_component(chroma > (background + peak) / 2)
    level = float(np.percentile(chroma[region], 90))
    soft = np.clip((chroma - background) / max(level - background, 1e-6), 0.0, 1.0)
    self.mask = np.where(_pool_max(region), soft, 0.0)  # [H, W]
    self.area = float(self.mask.sum())
    ys, xs = np.indices(chroma.shape) + 0.5
    self.centre = (float((self.mask * xs).sum() / self.area),
                   float((self.mask * ys).sum() / self.area))
    core = region & (soft > 0.75)
    self.colour = pixels[core if core.any() else region].mean(axis=0)  # [3]
    # Templates are compared in a window around the object: the widest candidate (a triangle or
    # diamond of the same area, 1.25x a circle's radius) and its blurred rim fit inside it.
    half = math.ceil(1.5 * math.sqrt(self.area / 2.0)) + 3
    self._origin = (max(0, math.floor(self.centre[0]) - half),
                    max(0, math.floor(self.centre[1]) - half))
    x0, y0 = self._origin
    self._window = self.mask[y0:math.floor(self.centre[1]) + half + 1,
                             x0:math.floor(self.centre[0]) + half + 1]
    self.errors = {shape: self._fit(shape) for shape in syn.Shape}

  def extent(self, shape: syn.Shape) -> float:
    """Half-extent (pixels) of `shape` with the blob's area."""
    return math.sqrt(self.area / syn.SHAPE_AREA[shape])

  def _fit(self, shape: syn.Shape) -> float:
    r = self.extent(shape)
    ox, oy = syn.SHAPE_CENTROID[shape]
    x0, y0 = self._origin
    template = syn.shape_coverage(shape, self.centre[0] - ox * r - x0,
                                  self.centre[1] - oy * r - y0, r, *self._window.shape)
    # A slightly blurred picture rounds small shapes' corners: also try blurred templates.
    errors = []
    for _ in range(_TEMPLATE_BLURS + 1):
      errors.append(float(np.sum((template - self._window) ** 2)))
      template = _blur(template)
    return min(errors)


def _hue(rgb: np.ndarray) -> float:
  """HSV hue in degrees of an RGB colour."""
  r, g, b = rgb
  top, bottom = max(rgb), min(rgb)
  if top - bottom <= 0:
    return 0.0
  if top == r:
    h = ((g - b) / (top - bottom)) % 6.0
  elif top == g:
    h = (b - r) / (top - bottom) + 2.0
  else:
    h = (r - g) / (top - bottom) + 4.0
  return 60.0 * h


def _nearest_colour(rgb: np.ndarray) -> syn.Colour:
  hue = _hue(rgb)
  distance = {c: abs((hue - h + 180.0) % 360.0 - 180.0) for c, h in syn.COLOUR_HUE.items()}
  return min(distance, key=distance.get)


def _describe(blobs: list[_Blob], height: int, width: int) -> dict[str, str]:
  """Colour, shape, size and position pooled over the blobs of one image or video."""
  colour = _nearest_colour(np.mean([b.colour for b in blobs], axis=0))
  shape = min(syn.Shape, key=lambda s: sum(b.errors[s] for b in blobs))
  extent = np.mean([b.extent(shape) for b in blobs]) / math.sqrt(height * width)
  size = syn.Size.LARGE if extent > _SIZE_THRESHOLD else syn.Size.SMALL
  cx, cy = np.mean([b.centre for b in blobs], axis=0)
  vertical = "top" if cy < height / 2 else "bottom"
  horizontal = "left" if cx < width / 2 else "right"
  return {"colour": colour.value, "shape": shape.value, "size": size.value,
          "position": f"{vertical}-{horizontal}"}


def analyze_image(image: np.ndarray) -> dict[str, str]:
  """Colour, shape, size and position of the object in a uint8 [H, W, 3] image."""
  pixels = _check_image(image, "analyze_image: image")
  blob = _Blob(pixels)
  if not blob.found:
    return _unknown(ATTRIBUTES_BY_MODALITY[Modality.IMAGE])
  return _describe([blob], *pixels.shape[:2])


def analyze_video(frames: np.ndarray) -> dict[str, str]:
  """Colour, shape, size, position (pooled over frames) and motion of uint8 [F, H, W, 3] frames."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[0] < 1:
    raise ValueError(f"analyze_video: frames must be [F, H, W, 3] with F >= 1, "
                     f"got shape {frames.shape}")
  names = ATTRIBUTES_BY_MODALITY[Modality.VIDEO]
  found = []  # (frame index, blob)
  for t, frame in enumerate(frames):
    blob = _Blob(_check_image(frame, f"analyze_video: frame {t}"))
    if blob.found:
      found.append((t, blob))
  if not found:
    return _unknown(names)
  result = _describe([b for _, b in found], *frames.shape[1:3])
  result["motion"] = UNKNOWN
  if len(found) >= 2:
    times = np.array([t for t, _ in found], np.float64)
    centres = np.array([b.centre for _, b in found])  # [F', 2] (x, y)
    velocity = np.polyfit(times, centres, 1)[0]  # [2] pixels per frame
    axis = int(np.argmax(np.abs(velocity)))
    if axis == 0:
      result["motion"] = (syn.Motion.RIGHT if velocity[0] > 0 else syn.Motion.LEFT).value
    else:
      result["motion"] = (syn.Motion.DOWN if velocity[1] > 0 else syn.Motion.UP).value
  return result


# ---------------------------------------------------------------------------------------------
# Sound.


def analyze_audio(wave: np.ndarray, sample_rate: int) -> dict[str, str]:
  """Pitch, timbre and rhythm of a mono float waveform [S]."""
  wave = np.asarray(wave)
  if wave.ndim != 1:
    raise ValueError(f"analyze_audio: wave must be mono [S], got shape {wave.shape}")
  if not np.issubdtype(wave.dtype, np.floating):
    raise ValueError(f"analyze_audio: wave must be floating point, got {wave.dtype}")
  if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) \
      or sample_rate < 8000:
    raise ValueError(f"analyze_audio: sample_rate must be an integer >= 8000, got {sample_rate!r}")
  if wave.shape[0] < sample_rate // 4:
    raise ValueError(f"analyze_audio: need at least 0.25 s of audio, got {wave.shape[0]} samples "
                     f"at {sample_rate} Hz")
  names = ATTRIBUTES_BY_MODALITY[Modality.AUDIO]
  wave = wave.astype(np.float64)
  wave = wave - wave.mean()
  if not np.all(np.isfinite(wave)) or np.sqrt(np.mean(wave ** 2)) < _MIN_RMS:
    return _unknown(names)
  power = np.abs(np.fft.rfft(wave * np.hanning(wave.shape[0]))) ** 2  # [S/2 + 1]
  freqs = np.fft.rfftfreq(wave.shape[0], 1.0 / sample_rate)

  def band(low: float, high: float) -> np.ndarray:
    return (freqs >= low) & (freqs <= high)

  energy = {p: power[band(hz / _PITCH_BAND, hz * _PITCH_BAND)].sum()
            for p, hz in syn.PITCH_HZ.items()}
  pitch = max(energy, key=energy.get)
  in_band = np.flatnonzero(band(syn.PITCH_HZ[pitch] / _PITCH_BAND,
                                syn.PITCH_HZ[pitch] * _PITCH_BAND))
  f0 = freqs[in_band[np.argmax(power[in_band])]]
  partial = [power[band(k * f0 - _PARTIAL_HALF_WIDTH_HZ, k * f0 + _PARTIAL_HALF_WIDTH_HZ)].sum()
             for k in (1, 2, 3)]
  second, third = (math.sqrt(p / max(partial[0], 1e-30)) for p in partial[1:])
  if second > _SAWTOOTH_2ND:
    timbre = syn.Timbre.SAWTOOTH
  elif third > _SQUARE_3RD:
    timbre = syn.Timbre.SQUARE
  elif third > _TRIANGLE_3RD:
    timbre = syn.Timbre.TRIANGLE
  else:
    timbre = syn.Timbre.SINE

  frame = max(1, int(_RMS_FRAME_S * sample_rate))
  count = wave.shape[0] // frame
  rms = np.sqrt(np.mean(wave[:count * frame].reshape(count, frame) ** 2, axis=1))  # [frames]
  ratio = np.percentile(rms, 10) / max(np.percentile(rms, 90), 1e-30)
  rhythm = syn.Rhythm.PULSED if ratio < _PULSED_RATIO else syn.Rhythm.STEADY
  return {"pitch": pitch.value, "timbre": timbre.value, "rhythm": rhythm.value}


# ---------------------------------------------------------------------------------------------
# Text.


def _alternation(phrases: Iterable[str]) -> str:
  return "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))


def _word_matcher(words: dict) -> tuple[re.Pattern, dict[str, object]]:
  lookup = {word: value for value, options in words.items() for word in options}
  return re.compile(rf"\b({_alternation(lookup)})\b"), lookup


def _motion_matcher() -> tuple[re.Pattern, dict[str, syn.Motion]]:
  lookup = {}
  for motion, directions in syn.MOTION_DIRECTIONS.items():
    for verb in syn.MOTION_VERBS:
      for direction in directions:
        lookup[f"{verb} {direction}"] = motion
  for motion, verbs in syn.MOTION_ONLY_VERBS.items():
    lookup.update({verb: motion for verb in verbs})
  return re.compile(rf"\b({_alternation(lookup)})\b"), lookup


_COLOUR_WORDS = _word_matcher(syn.COLOUR_WORDS)
_SHAPE_WORDS = _word_matcher(syn.SHAPE_WORDS)
_SIZE_WORDS = _word_matcher(syn.SIZE_WORDS)
_VERTICAL_WORDS = _word_matcher(syn.VERTICAL_WORDS)
_HORIZONTAL_WORDS = _word_matcher({"left": ("left",), "right": ("right",)})
_MOTION_WORDS = _motion_matcher()


def _normalize_text(text: str) -> str:
  """Lower case, every run of non-letters a single space."""
  text = re.sub(r"[^a-z]+", " ", text.lower())
  # "top-left" without its hyphen.
  text = re.sub(r"\b(top|upper|bottom|lower)(left|right)\b", r"\1 \2", text)
  return " ".join(text.split())


def _read(text: str, matcher: tuple[re.Pattern, dict]) -> object | None:
  """The one value the text names (several distinct values or none: None)."""
  pattern, lookup = matcher
  values = {lookup[m] for m in pattern.findall(text)}
  return values.pop() if len(values) == 1 else None


def analyze_text(caption: str) -> dict[str, str]:
  """All eight attributes named by a caption (sound attributes follow from the visual ones)."""
  if not isinstance(caption, str):
    raise ValueError(f"analyze_text: caption must be a str, got {type(caption).__name__}")
  if not caption.strip():
    raise ValueError("analyze_text: caption is empty")
  text = _normalize_text(caption)
  motion = _read(text, _MOTION_WORDS)
  # Position words ("left", "right") also end motion phrases: read them without those.
  rest = _MOTION_WORDS[0].sub(" ", text)
  vertical, horizontal = _read(rest, _VERTICAL_WORDS), _read(rest, _HORIZONTAL_WORDS)
  visual = {
      "colour": _read(text, _COLOUR_WORDS),
      "shape": _read(text, _SHAPE_WORDS),
      "size": _read(text, _SIZE_WORDS),
      "position": (syn.Position(f"{vertical}-{horizontal}")
                   if vertical is not None and horizontal is not None else None),
      "motion": motion,
  }
  result = {name: UNKNOWN if value is None else value.value for name, value in visual.items()}
  for name, (source, mapping) in syn.SOUND_SOURCE.items():
    result[name] = UNKNOWN if visual[source] is None else mapping[visual[source]].value
  return result


# ---------------------------------------------------------------------------------------------
# Scores.


def attribute_accuracy(predicted: dict[str, str], truth: syn.Attributes,
                       names: Iterable[str]) -> dict[str, bool]:
  """Whether each named attribute was read correctly (a missing or UNKNOWN one is wrong)."""
  expected = truth.as_dict()
  result = {}
  for name in names:
    if name not in expected:
      raise ValueError(f"attribute_accuracy: unknown attribute {name!r}; expected one of: "
                       f"{', '.join(expected)}")
    result[name] = predicted.get(name) == expected[name]
  return result


def _as_visual(values: dict[str, str]) -> dict[str, str]:
  """Sound attributes translated to the visual attributes they stand for; an attribute read
  directly wins over one inferred from its sound."""
  result = {name: value for name, value in values.items() if name in syn.VISUAL_ATTRIBUTES}
  for name, (source, mapping) in syn.SOUND_SOURCE.items():
    if name in values and source not in result:
      back = {sound.value: visual.value for visual, sound in mapping.items()}
      result[source] = back.get(values[name], UNKNOWN)
  return result


def agreement(a: dict[str, str], b: dict[str, str]) -> dict[str, bool]:
  """Whether two analyses agree on each attribute they share, compared as visual attributes
  (pitch as colour, timbre as shape, rhythm as size). UNKNOWN agrees with nothing."""
  a, b = _as_visual(a), _as_visual(b)
  return {name: a[name] == b[name] != UNKNOWN for name in syn.VISUAL_ATTRIBUTES
          if name in a and name in b}
