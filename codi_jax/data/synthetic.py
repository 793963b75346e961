"""A procedural paired dataset: one coloured shape on a plain grey background, seen as a caption,
an image, a short video and a ~1 s tone, all agreeing by construction on a few attributes.

Attributes (sampled uniformly and independently per example):
  colour    red, yellow, green, cyan, blue, magenta (fully saturated hues 60 degrees apart)
  shape     circle, square, triangle (apex up), diamond
  size      small, large (half-extent ~0.12 / ~0.19 of the image side)
  position  top-left, top-right, bottom-left, bottom-right (quadrant of the object's centre)
  motion    left, right, up, down (in the video the object drifts 0.08 of the image side)
The sound is keyed to the picture, so audio agrees with the other modalities through a fixed map:
  pitch  <- colour  A3, D#4, A4, D#5, A5, D#6 (a tritone apart; fundamental is the loudest partial)
  timbre <- shape   sine (circle), square (square), triangle (triangle), sawtooth (diamond)
  rhythm <- size    steady (large), pulsed at 3-5 Hz with 50% duty (small)
Modalities carry (see `analyzers.ATTRIBUTES_BY_MODALITY`): text all eight; image colour, shape,
size, position; video those and motion; audio pitch, timbre, rhythm.

Besides its attributes every example varies continuously (object centre and extent, hue, brightness,
background grey, detune, pulse rate and phase, loudness, caption wording), so no two examples are
equal. An example is a pure function of (seed, split, index): its random stream is seeded with
`np.random.SeedSequence((seed, crc32(split), index))`, so splits never share an example.

With `SyntheticConfig.minimal_pairs`, examples 2k and 2k+1 differ in exactly one visual attribute
(chosen uniformly, with the sound attribute keyed to it); everything else about them is drawn
independently. A batch holding both members of its pairs (`codi_jax.data.pipeline` keeps them
together) then has, for every example, a negative that only one attribute tells apart: the hard
negatives that contrastive alignment needs to encode position and motion, which a random batch of
128 almost never has (0.5 per example). A curriculum for this dataset only.

The video's trajectory is centred on the image's object position and, for every allowed centre and
extent, stays inside its quadrant; the image is the object at mid-trajectory.

F frames, H/W height/width (both `image_size`), S audio samples.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import zlib
from typing import Sequence

import numpy as np

SPLITS = ("train", "validation", "test")


class Colour(str, enum.Enum):
  RED = "red"
  YELLOW = "yellow"
  GREEN = "green"
  CYAN = "cyan"
  BLUE = "blue"
  MAGENTA = "magenta"


class Shape(str, enum.Enum):
  CIRCLE = "circle"
  SQUARE = "square"
  TRIANGLE = "triangle"
  DIAMOND = "diamond"


class Size(str, enum.Enum):
  SMALL = "small"
  LARGE = "large"


class Position(str, enum.Enum):
  TOP_LEFT = "top-left"
  TOP_RIGHT = "top-right"
  BOTTOM_LEFT = "bottom-left"
  BOTTOM_RIGHT = "bottom-right"


class Motion(str, enum.Enum):
  LEFT = "left"
  RIGHT = "right"
  UP = "up"
  DOWN = "down"


class Pitch(str, enum.Enum):
  A3 = "A3"
  DS4 = "D#4"
  A4 = "A4"
  DS5 = "D#5"
  A5 = "A5"
  DS6 = "D#6"


class Timbre(str, enum.Enum):
  SINE = "sine"
  SQUARE = "square"
  TRIANGLE = "triangle"
  SAWTOOTH = "sawtooth"


class Rhythm(str, enum.Enum):
  STEADY = "steady"
  PULSED = "pulsed"


# The attribute vocabulary, by name; the visual attributes are sampled, the sound ones derived.
VISUAL_ATTRIBUTES: dict[str, type[enum.Enum]] = {
    "colour": Colour, "shape": Shape, "size": Size, "position": Position, "motion": Motion}
SOUND_ATTRIBUTES: dict[str, type[enum.Enum]] = {"pitch": Pitch, "timbre": Timbre, "rhythm": Rhythm}
ATTRIBUTE_VALUES: dict[str, type[enum.Enum]] = {**VISUAL_ATTRIBUTES, **SOUND_ATTRIBUTES}

PITCH_OF_COLOUR = dict(zip(Colour, Pitch))
TIMBRE_OF_SHAPE = {Shape.CIRCLE: Timbre.SINE, Shape.SQUARE: Timbre.SQUARE,
                   Shape.TRIANGLE: Timbre.TRIANGLE, Shape.DIAMOND: Timbre.SAWTOOTH}
RHYTHM_OF_SIZE = {Size.LARGE: Rhythm.STEADY, Size.SMALL: Rhythm.PULSED}
# The visual attribute each sound attribute is keyed to, and the map from its values.
SOUND_SOURCE: dict[str, tuple[str, dict]] = {
    "pitch": ("colour", PITCH_OF_COLOUR), "timbre": ("shape", TIMBRE_OF_SHAPE),
    "rhythm": ("size", RHYTHM_OF_SIZE)}

COLOUR_HUE = {Colour.RED: 0.0, Colour.YELLOW: 60.0, Colour.GREEN: 120.0, Colour.CYAN: 180.0,
              Colour.BLUE: 240.0, Colour.MAGENTA: 300.0}
PITCH_HZ = {p: 220.0 * 2.0 ** (k / 2) for k, p in enumerate(Pitch)}  # A3 up in tritones

# Geometry, as fractions of the image side. SIZE_EXTENT is the half-extent r: the circle's radius,
# half the square's side, half the triangle's base and height, half the diamond's diagonal.
SIZE_EXTENT = {Size.SMALL: 0.12, Size.LARGE: 0.19}
EXTENT_JITTER = 0.005
CENTRE_JITTER = 0.015
MOTION_TRAVEL = 0.08  # first to last frame
MOTION_STEP = {Motion.LEFT: (-1.0, 0.0), Motion.RIGHT: (1.0, 0.0), Motion.UP: (0.0, -1.0),
               Motion.DOWN: (0.0, 1.0)}
QUADRANT_CENTRE = {Position.TOP_LEFT: (0.25, 0.25), Position.TOP_RIGHT: (0.75, 0.25),
                   Position.BOTTOM_LEFT: (0.25, 0.75), Position.BOTTOM_RIGHT: (0.75, 0.75)}
# Area in units of r^2, and the centroid's offset from the bounding-box centre in units of r.
SHAPE_AREA = {Shape.CIRCLE: math.pi, Shape.SQUARE: 4.0, Shape.TRIANGLE: 2.0, Shape.DIAMOND: 2.0}
SHAPE_CENTROID = {Shape.CIRCLE: (0.0, 0.0), Shape.SQUARE: (0.0, 0.0),
                  Shape.TRIANGLE: (0.0, 1.0 / 3.0), Shape.DIAMOND: (0.0, 0.0)}
_SUPERSAMPLE = 4  # anti-aliasing: 4x4 samples per pixel

# Sound.
PULSE_RATE_HZ = (3.0, 5.0)
_RAMP_S = 0.015  # pulse attack/release
_FADE_S = 0.01  # fade in/out of the whole clip
_WAVETABLE = 4096


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Sizes and seed of the synthetic dataset. The clip lasts `audio_seconds`, video included."""

  image_size: int = 32
  num_frames: int = 4
  sample_rate: int = 16000
  audio_seconds: float = 1.0
  seed: int = 0
  train_size: int = 4096
  validation_size: int = 256
  test_size: int = 256
  minimal_pairs: bool = False  # see the module docstring
  # Training split only: each visual attribute is left out of the caption with this probability
  # (independently; at least one stays named). See the module docstring.
  caption_dropout: float = 0.0

  def __post_init__(self):
    ints = {"image_size": self.image_size, "num_frames": self.num_frames,
            "sample_rate": self.sample_rate, "seed": self.seed, "train_size": self.train_size,
            "validation_size": self.validation_size, "test_size": self.test_size}
    for name, value in ints.items():
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"SyntheticConfig.{name} must be an integer, got {value!r}")
    if not (isinstance(self.caption_dropout, (int, float)) and 0.0 <= self.caption_dropout < 1.0):
      raise ValueError(f"SyntheticConfig.caption_dropout must lie in [0, 1), got "
                       f"{self.caption_dropout!r}")
    if not isinstance(self.minimal_pairs, bool):
      raise ValueError(f"SyntheticConfig.minimal_pairs must be a bool, got {self.minimal_pairs!r}")
    if self.image_size < 32:
      raise ValueError(f"SyntheticConfig.image_size must be >= 32, got {self.image_size}")
    if self.num_frames < 2:
      raise ValueError(f"SyntheticConfig.num_frames must be >= 2 (motion needs two frames), "
                       f"got {self.num_frames}")
    # The analyzers read the 3rd harmonic of the highest pitch (~3.8 kHz).
    if self.sample_rate < 8000:
      raise ValueError(f"SyntheticConfig.sample_rate must be >= 8000, got {self.sample_rate}")
    if not self.audio_seconds >= 0.5:
      raise ValueError(f"SyntheticConfig.audio_seconds must be >= 0.5, got {self.audio_seconds}")
    if self.seed < 0:
      raise ValueError(f"SyntheticConfig.seed must be non-negative, got {self.seed}")
    for split in SPLITS:
      if split_size(self, split) <= 0:
        raise ValueError(f"SyntheticConfig.{split}_size must be positive, "
                         f"got {split_size(self, split)}")

  @property
  def num_samples(self) -> int:
    return round(self.audio_seconds * self.sample_rate)

  @property
  def fps(self) -> float:
    """Frame rate that makes the video last as long as the audio."""
    return self.num_frames / self.audio_seconds


@dataclasses.dataclass(frozen=True)
class Attributes:
  """What an example shows; the sound attributes follow from the visual ones."""

  colour: Colour
  shape: Shape
  size: Size
  position: Position
  motion: Motion

  def __post_init__(self):
    for name, kind in VISUAL_ATTRIBUTES.items():
      if not isinstance(getattr(self, name), kind):
        raise ValueError(f"Attributes.{name} must be a {kind.__name__}, "
                         f"got {getattr(self, name)!r}")

  @property
  def pitch(self) -> Pitch:
    return PITCH_OF_COLOUR[self.colour]

  @property
  def timbre(self) -> Timbre:
    return TIMBRE_OF_SHAPE[self.shape]

  @property
  def rhythm(self) -> Rhythm:
    return RHYTHM_OF_SIZE[self.size]

  def as_dict(self) -> dict[str, str]:
    """All eight attributes as name -> value string (the analyzers' output format)."""
    return {name: getattr(self, name).value for name in ATTRIBUTE_VALUES}

  @classmethod
  def from_dict(cls, values: dict[str, str]) -> Attributes:
    """From the five visual attributes' value strings (sound attributes, if given, are ignored)."""
    missing = [name for name in VISUAL_ATTRIBUTES if name not in values]
    if missing:
      raise ValueError(f"Attributes.from_dict: missing {missing}")
    parsed = {}
    for name, kind in VISUAL_ATTRIBUTES.items():
      try:
        parsed[name] = kind(values[name])
      except ValueError:
        options = ", ".join(v.value for v in kind)
        raise ValueError(f"Attributes.from_dict: {name}={values[name]!r} is not one of "
                         f"{options}") from None
    return cls(**parsed)


@dataclasses.dataclass(frozen=True)
class SyntheticExample:
  """One paired example. image uint8 [H, W, 3], video uint8 [F, H, W, 3], audio float32 [S]."""

  key: str
  text: str
  image: np.ndarray
  video: np.ndarray
  audio: np.ndarray
  attributes: Attributes
  # The visual attributes the caption names (all of them unless `caption_dropout` left some out).
  named: tuple[str, ...] = tuple(VISUAL_ATTRIBUTES)


@dataclasses.dataclass(frozen=True)
class _Scene:
  """An example's attributes plus its continuous, non-attribute variation."""

  attributes: Attributes
  centre: tuple[float, float]  # (x, y), fraction of the side, at mid-trajectory
  extent: float  # half-extent r, fraction of the side
  hue: float  # degrees
  value: float  # HSV value of the object colour
  background: int  # grey level
  frequency: float  # Hz, detuned pitch
  pulse_rate: float  # Hz (pulsed rhythm only)
  pulse_phase: float  # cycles
  amplitude: float  # peak of the waveform


def split_size(config: SyntheticConfig, split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
  return getattr(config, f"{split}_size")


MEDIA = ("image", "video", "audio")


class SplitSource:
  """One split as a random-access source (len, [i] -> SyntheticExample), generated on access;
  `media` limits what is rendered (see `generate`)."""

  def __init__(self, config: SyntheticConfig, split: str, media: tuple[str, ...] = MEDIA):
    split_size(config, split)  # validates the split name
    self.config, self.split, self.media = config, split, media

  def __len__(self) -> int:
    return split_size(self.config, self.split)

  def __getitem__(self, index: int) -> SyntheticExample:
    return generate(self.config, self.split, int(index), self.media)


def _example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The random stream of one example (stable across runs and platforms)."""
  return np.random.default_rng(np.random.SeedSequence((seed, zlib.crc32(split.encode()), index)))


def generate(config: SyntheticConfig, split: str, index: int,
             media: tuple[str, ...] = MEDIA) -> SyntheticExample:
  """Example `index` of `split`: a pure function of (config.seed, split, index) and the media
  sizes (the split sizes only bound `index`). Only the `media` named are rendered (a reader of
  text alone need not draw pictures); the others are empty arrays. What is rendered does not
  depend on what else is."""
  unknown = set(media) - set(MEDIA)
  if unknown:
    raise ValueError(f"generate: unknown media {sorted(unknown)}; choose from {MEDIA}")
  size = split_size(config, split)
  if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < size:
    raise ValueError(f"index must be an integer in [0, {size}) for split {split!r}, got {index!r}")
  rng = _example_rng(config.seed, split, int(index))
  if config.minimal_pairs and index % 2:
    partner = _sample_scene(_example_rng(config.seed, split, int(index) - 1)).attributes
    scene = _sample_scene(rng, _one_changed(partner, rng))
  else:
    scene = _sample_scene(rng)
  named = _caption_attributes(config, split, int(index))
  text = caption(scene.attributes, rng, named)
  return SyntheticExample(
      key=f"synthetic-s{config.seed}-{split}-{int(index):07d}",
      text=text,
      image=(_render_frame(scene, config.image_size, scene.centre) if "image" in media
             else np.zeros((0, 0, 3), np.uint8)),
      video=(_render_video(scene, config.image_size, config.num_frames) if "video" in media
             else np.zeros((0, 0, 0, 3), np.uint8)),
      audio=(_render_audio(scene, config.sample_rate, config.num_samples) if "audio" in media
             else np.zeros((0,), np.float32)),
      attributes=scene.attributes,
      named=named,
  )


def _caption_attributes(config: SyntheticConfig, split: str, index: int) -> tuple[str, ...]:
  """The visual attributes example `index`'s caption names: all, or under `caption_dropout`
  (training split) a random subset of at least one, drawn from a stream of its own so the
  example's scene and media are those it has without dropout."""
  if split != "train" or not config.caption_dropout:
    return tuple(VISUAL_ATTRIBUTES)
  rng = np.random.default_rng(np.random.SeedSequence(
      (config.seed, zlib.crc32(split.encode()), index, 1)))
  kept = rng.random(len(VISUAL_ATTRIBUTES)) >= config.caption_dropout
  if not kept.any():
    kept[int(rng.integers(len(VISUAL_ATTRIBUTES)))] = True
  return tuple(name for name, k in zip(VISUAL_ATTRIBUTES, kept) if k)


def _pick(rng: np.random.Generator, options):
  return options[int(rng.integers(len(options)))]


def _one_changed(attributes: Attributes, rng: np.random.Generator) -> Attributes:
  """`attributes` with one visual attribute (chosen uniformly) set to another of its values."""
  name = _pick(rng, list(VISUAL_ATTRIBUTES))
  current = getattr(attributes, name)
  value = _pick(rng, [v for v in VISUAL_ATTRIBUTES[name] if v is not current])
  return dataclasses.replace(attributes, **{name: value})


def _sample_scene(rng: np.random.Generator, attributes: Attributes | None = None) -> _Scene:
  """A scene with the given attributes (drawn uniformly if None) and fresh variation."""
  if attributes is None:
    attributes = Attributes(**{name: _pick(rng, list(kind))
                               for name, kind in VISUAL_ATTRIBUTES.items()})
  qx, qy = QUADRANT_CENTRE[attributes.position]
  jx, jy = rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, size=2)
  return _Scene(
      attributes=attributes,
      centre=(qx + float(jx), qy + float(jy)),
      extent=SIZE_EXTENT[attributes.size] + float(rng.uniform(-EXTENT_JITTER, EXTENT_JITTER)),
      hue=(COLOUR_HUE[attributes.colour] + float(rng.uniform(-4.0, 4.0))) % 360.0,
      value=float(rng.uniform(0.85, 1.0)),
      background=int(rng.integers(32, 65)),
      frequency=PITCH_HZ[attributes.pitch] * float(rng.uniform(0.985, 1.015)),
      pulse_rate=float(rng.uniform(*PULSE_RATE_HZ)),
      pulse_phase=float(rng.uniform(0.0, 1.0)),
      amplitude=float(rng.uniform(0.5, 0.8)),
  )


# ---------------------------------------------------------------------------------------------
# Pictures.


def shape_coverage(shape: Shape, centre_x: float, centre_y: float, extent: float, height: int,
                   width: int) -> np.ndarray:
  """Fraction of each pixel covered by `shape` (float32 [H, W]), from 4x4 samples per pixel.

  Pixel units: pixel (i, j) spans [j, j+1) x [i, i+1); (centre_x, centre_y) is the bounding-box
  centre and `extent` the half-extent r (see SIZE_EXTENT).
  """
  coverage = np.zeros((height, width), np.float32)
  # Only the pixels under the bounding box can be covered.
  y0, y1 = max(0, math.floor(centre_y - extent)), min(height, math.ceil(centre_y + extent))
  x0, x1 = max(0, math.floor(centre_x - extent)), min(width, math.ceil(centre_x + extent))
  if y0 >= y1 or x0 >= x1:
    return coverage
  offsets = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
  ys = (np.arange(y0, y1)[:, None] + offsets).reshape(-1, 1)  # [h*4, 1]
  xs = (np.arange(x0, x1)[:, None] + offsets).reshape(1, -1)  # [1, w*4]
  u = (xs - centre_x) / extent
  v = (ys - centre_y) / extent  # v grows downwards
  if shape == Shape.CIRCLE:
    inside = u * u + v * v <= 1.0
  elif shape == Shape.SQUARE:
    inside = (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
  elif shape == Shape.TRIANGLE:  # apex (0, -1), base from (-1, 1) to (1, 1)
    inside = (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
  elif shape == Shape.DIAMOND:
    inside = np.abs(u) + np.abs(v) <= 1.0
  else:
    raise ValueError(f"unknown shape {shape!r}")
  inside = inside.reshape(y1 - y0, _SUPERSAMPLE, x1 - x0, _SUPERSAMPLE)  # [h, 4, w, 4]
  coverage[y0:y1, x0:x1] = inside.mean(axis=(1, 3), dtype=np.float32)
  return coverage


def _hue_to_rgb(hue: float, value: float = 1.0) -> np.ndarray:
  """Fully saturated colour of `hue` (degrees) and HSV `value`, float64 [3] in [0, 255]."""
  h = (hue % 360.0) / 60.0
  channel = np.clip(np.abs((h - np.array([0.0, 2.0, 4.0])) % 6.0 - 3.0) - 1.0, 0.0, 1.0)
  return channel * value * 255.0


def _render_frame(scene: _Scene, image_size: int, centre: tuple[float, float]) -> np.ndarray:
  s = float(image_size)
  cx, cy = centre
  coverage = shape_coverage(scene.attributes.shape, cx * s, cy * s, scene.extent * s,
                            image_size, image_size)[..., None]  # [H, W, 1]
  colour = _hue_to_rgb(scene.hue, scene.value)
  pixels = scene.background * (1.0 - coverage) + colour * coverage  # [H, W, 3]
  return np.round(pixels).astype(np.uint8)


def _render_video(scene: _Scene, image_size: int, num_frames: int) -> np.ndarray:
  """uint8 [F, H, W, 3]: the object travels MOTION_TRAVEL, centred on the scene's centre."""
  dx, dy = MOTION_STEP[scene.attributes.motion]
  cx, cy = scene.centre
  frames = []
  for t in range(num_frames):
    shift = (t / (num_frames - 1) - 0.5) * MOTION_TRAVEL
    frames.append(_render_frame(scene, image_size, (cx + dx * shift, cy + dy * shift)))
  return np.stack(frames)  # [F, H, W, 3]


# ---------------------------------------------------------------------------------------------
# Sound.


def _harmonic_amplitudes(timbre: Timbre, count: int) -> np.ndarray:
  """Amplitudes of partials 1..count of the band-limited `timbre` waveform, float64 [count]."""
  k = np.arange(1, count + 1, dtype=np.float64)
  odd = k % 2 == 1
  if timbre == Timbre.SINE:
    return (k == 1).astype(np.float64)
  if timbre == Timbre.SQUARE:
    return np.where(odd, 1.0 / k, 0.0)
  if timbre == Timbre.TRIANGLE:
    return np.where(odd, 1.0 / (k * k), 0.0)
  if timbre == Timbre.SAWTOOTH:
    return 1.0 / k
  raise ValueError(f"unknown timbre {timbre!r}")


@functools.lru_cache(maxsize=64)
def _wavetable(timbre: Timbre, count: int) -> np.ndarray:
  """One period of the waveform, peak 1, float64 [_WAVETABLE + 1] (last sample wraps)."""
  phase = np.arange(_WAVETABLE + 1) / _WAVETABLE
  partials = np.sin(2.0 * np.pi * np.arange(1, count + 1)[:, None] * phase)  # [count, L+1]
  table = _harmonic_amplitudes(timbre, count) @ partials
  return table / np.max(np.abs(table))


def _envelope(scene: _Scene, t: np.ndarray, seconds: float) -> np.ndarray:
  fade = np.clip(np.minimum(t, seconds - t) / _FADE_S, 0.0, 1.0)
  if scene.attributes.rhythm == Rhythm.STEADY:
    return fade
  # Pulses on during the first half of each cycle, with raised-cosine attack and release.
  cycle = (scene.pulse_rate * t + scene.pulse_phase) % 1.0
  ramp = np.clip(np.minimum(cycle, 0.5 - cycle) / (_RAMP_S * scene.pulse_rate), 0.0, 1.0)
  return fade * (0.5 - 0.5 * np.cos(np.pi * ramp))


def _render_audio(scene: _Scene, sample_rate: int, num_samples: int) -> np.ndarray:
  """float32 [S] in [-1, 1]: the scene's tone (band-limited below 0.45 * sample_rate)."""
  count = max(1, int(0.45 * sample_rate / scene.frequency))
  t = np.arange(num_samples) / sample_rate
  phase = (scene.frequency * t) % 1.0 * _WAVETABLE
  table = _wavetable(scene.attributes.timbre, count)
  lower = np.minimum(phase.astype(np.int64), _WAVETABLE - 1)
  frac = phase - lower
  wave = table[lower] * (1.0 - frac) + table[lower + 1] * frac  # linear interpolation
  wave *= scene.amplitude * _envelope(scene, t, num_samples / sample_rate)
  return wave.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Captions. Every wording names each visual attribute exactly once, with words from disjoint
# vocabularies, so `analyzers.analyze_text` reads them back.

COLOUR_WORDS = {Colour.RED: ("red", "scarlet"), Colour.YELLOW: ("yellow", "golden"),
                Colour.GREEN: ("green", "emerald"), Colour.CYAN: ("cyan", "turquoise"),
                Colour.BLUE: ("blue", "cobalt"), Colour.MAGENTA: ("magenta", "fuchsia")}
SHAPE_WORDS = {Shape.CIRCLE: ("circle", "disc"), Shape.SQUARE: ("square",),
               Shape.TRIANGLE: ("triangle",), Shape.DIAMOND: ("diamond", "rhombus")}
SIZE_WORDS = {Size.SMALL: ("small", "little", "tiny"), Size.LARGE: ("large", "big")}
VERTICAL_WORDS = {"top": ("top", "upper"), "bottom": ("bottom", "lower")}
# Motion phrases: a verb then a direction, or a verb that carries its direction.
MOTION_VERBS = ("moving", "drifting", "sliding", "gliding", "heading", "travelling")
MOTION_DIRECTIONS = {Motion.LEFT: ("left", "to the left", "leftwards"),
                     Motion.RIGHT: ("right", "to the right", "rightwards"),
                     Motion.UP: ("up", "upwards"), Motion.DOWN: ("down", "downwards")}
MOTION_ONLY_VERBS = {Motion.UP: ("rising", "climbing"), Motion.DOWN: ("sinking", "falling")}
_POSITION_PHRASES = ("in the {v} {h} corner", "in the {v}-{h} corner", "at the {v} {h}",
                     "in the {v} {h} quadrant", "in the {v}-{h} part of the frame")
_TEMPLATES = (
    "A {size} {colour} {shape} {position}, {motion}.",
    "{size} {colour} {shape} {motion} {position}",
    "A {colour} {shape}, {size}, {position} and {motion}.",
    "There is a {size} {colour} {shape} {position}; it is {motion}.",
    "{position}, a {size} {colour} {shape} is {motion} over a grey background.",
    "An animation of a {size} {colour} {shape} {motion} {position}.",
)


# Captions that name only some attributes: the noun phrase (size, colour, then the shape or a
# neutral noun), then where it is, then how it moves, each only when named.
_NEUTRAL_NOUNS = ("shape", "object", "thing")
_PARTIAL_TEMPLATES = ("A {noun}{position}{motion}.", "There is a {noun}{position}{motion}.",
                      "{noun}{position}{motion}")


def caption(attributes: Attributes, rng: np.random.Generator,
            named: Sequence[str] = tuple(VISUAL_ATTRIBUTES)) -> str:
  """A caption naming the visual attributes `named` (default all, at least one), with a random
  template and random synonyms. The others are not named at all: `analyzers.analyze_text`
  reads them as unknown."""
  named = set(named)
  if not named or named - set(VISUAL_ATTRIBUTES):
    raise ValueError(f"caption: named must be a non-empty subset of {list(VISUAL_ATTRIBUTES)}, "
                     f"got {sorted(named)}")
  vertical, horizontal = attributes.position.value.split("-")
  position = _pick(rng, _POSITION_PHRASES).format(v=_pick(rng, VERTICAL_WORDS[vertical]),
                                                   h=horizontal)
  motion_options = [f"{verb} {direction}" for verb in MOTION_VERBS
                    for direction in MOTION_DIRECTIONS[attributes.motion]]
  motion_options += MOTION_ONLY_VERBS.get(attributes.motion, ())
  full = named == set(VISUAL_ATTRIBUTES)
  template = _pick(rng, _TEMPLATES if full else _PARTIAL_TEMPLATES)
  words = dict(size=_pick(rng, SIZE_WORDS[attributes.size]),
               colour=_pick(rng, COLOUR_WORDS[attributes.colour]),
               shape=_pick(rng, SHAPE_WORDS[attributes.shape]),
               position=position, motion=_pick(rng, motion_options))
  if full:
    text = template.format(**words)
  else:
    noun = " ".join([words[a] for a in ("size", "colour") if a in named]
                    + [words["shape"] if "shape" in named else _pick(rng, _NEUTRAL_NOUNS)])
    text = template.format(
        noun=noun, position=f" {position}" if "position" in named else "",
        motion=f", {words['motion']}" if "motion" in named else "")
  return text[0].upper() + text[1:]
