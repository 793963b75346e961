"""Media codecs for dataset records: images (PNG/JPEG via Pillow), audio (WAV/FLAC via libsndfile,
bundled with soundfile) and video (MP4/H.264 via the FFmpeg libraries bundled with PyAV).

Records keep media encoded; these functions turn bytes into arrays and back. Every decoding
failure raises `MediaError`, a ValueError with a machine-readable `.reason`, so importers can
count bad records per cause instead of crashing.

F frames, H/W height/width, S audio samples, C audio channels.
"""

from __future__ import annotations

import enum
import fractions
import io
import re

import numpy as np

from codi_jax.audio.resample import resample, resampled_length


class FailureReason(str, enum.Enum):
  """Why a record or a media blob was rejected (the keys of an import report)."""

  EMPTY_DATA = "empty_data"
  CORRUPT_IMAGE = "corrupt_image"
  IMAGE_TOO_LARGE = "image_too_large"
  CORRUPT_AUDIO = "corrupt_audio"
  EMPTY_AUDIO = "empty_audio"
  CORRUPT_VIDEO = "corrupt_video"
  EMPTY_VIDEO = "empty_video"
  TRUNCATED_VIDEO = "truncated_video"
  UNSUPPORTED_FORMAT = "unsupported_format"
  # Record-level causes, raised by importers rather than codecs.
  MISSING_CAPTION = "missing_caption"
  MISSING_MEDIA = "missing_media"
  MISSING_FILE = "missing_file"
  BAD_ROW = "bad_row"
  BAD_METADATA = "bad_metadata"
  DUPLICATE_KEY = "duplicate_key"
  CORRUPT_SHARD = "corrupt_shard"  # An input archive ends early; what came before it is kept.


class MediaError(ValueError):
  """A blob that cannot be decoded; `.reason` is a `FailureReason` value (a str)."""

  def __init__(self, reason: FailureReason | str, message: str):
    reason = FailureReason(reason)
    # Decoders name their in-memory input by its repr ("<_io.BytesIO object at 0x...>").
    message = _IN_MEMORY.sub("the data", message)
    super().__init__(f"{reason.value}: {message}")
    self.reason = reason.value
    self.detail = message

  def about(self, what: str) -> MediaError:
    """The same error, naming what was decoded (e.g. the file)."""
    return MediaError(self.reason, f"{what}: {self.detail}")


_IN_MEMORY = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _check_bytes(data: bytes, what: str) -> bytes:
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise ValueError(f"{what}: expected bytes, got {type(data).__name__}")
  if len(data) == 0:
    raise MediaError(FailureReason.EMPTY_DATA, f"{what}: no bytes")
  return bytes(data)


# ----------------------------------------------------------------------------------------- images


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise ValueError(f"image must be non-empty, got shape {image.shape}")
  return image


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> lossless PNG bytes."""
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(_check_image(image)).save(buf, format="PNG")
  return buf.getvalue()


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
  """uint8 [H, W, 3] -> baseline JPEG bytes (4:4:4, so small synthetic shapes keep their colour)."""
  from PIL import Image

  if not 1 <= quality <= 100:
    raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
  buf = io.BytesIO()
  Image.fromarray(_check_image(image)).save(buf, format="JPEG", quality=quality, subsampling=0)
  return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
  """Any Pillow-readable image (PNG, JPEG, WebP, ...) -> uint8 [H, W, 3] RGB (alpha dropped)."""
  from PIL import Image

  data = _check_bytes(data, "image")
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()  # Decode fully here: a truncated file fails now, not in a data worker later.
      rgb = img.convert("RGB")
  except Image.DecompressionBombError as e:
    raise MediaError(FailureReason.IMAGE_TOO_LARGE, str(e)) from None
  except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError.
    raise MediaError(FailureReason.CORRUPT_IMAGE, str(e) or type(e).__name__) from None
  return np.asarray(rgb, dtype=np.uint8)  # [H, W, 3]


# ------------------------------------------------------------------------------------------ audio


def _check_wave(wave: np.ndarray, sample_rate: int) -> np.ndarray:
  wave = np.asarray(wave)
  if wave.ndim != 1 or wave.shape[0] == 0 or not np.issubdtype(wave.dtype, np.floating):
    raise ValueError(f"audio must be a non-empty float waveform [S], got {wave.dtype} {wave.shape}")
  if not np.all(np.isfinite(wave)):
    raise ValueError("audio contains NaN or infinite samples")
  if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) \
      or sample_rate <= 0:
    raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
  # PCM has no room above full scale; clip explicitly rather than let the encoder wrap around.
  return np.clip(wave.astype(np.float32), -1.0, 1.0)


def _encode_audio(wave: np.ndarray, sample_rate: int, fmt: str, subtype: str) -> bytes:
  import soundfile

  wave = _check_wave(wave, sample_rate)
  buf = io.BytesIO()
  soundfile.write(buf, wave, int(sample_rate), format=fmt, subtype=subtype)
  return buf.getvalue()


def encode_wav(wave: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> bytes:
  """float32 [S] in [-1, 1] (clipped) -> mono WAV bytes."""
  return _encode_audio(wave, sample_rate, "WAV", subtype)


def encode_flac(wave: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> bytes:
  """float32 [S] in [-1, 1] (clipped) -> mono FLAC bytes (lossless at `subtype` depth)."""
  return _encode_audio(wave, sample_rate, "FLAC", subtype)


def read_audio(data: bytes) -> tuple[np.ndarray, int]:
  """WAV/FLAC/OGG/MP3 bytes -> (float32 [S] mono mix at the file's own rate, that rate)."""
  import soundfile

  data = _check_bytes(data, "audio")
  try:
    wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)  # [S, C]
  except soundfile.LibsndfileError as e:
    reason = (FailureReason.UNSUPPORTED_FORMAT if "not recognised" in str(e).lower()
              else FailureReason.CORRUPT_AUDIO)
    raise MediaError(reason, str(e)) from None
  except (RuntimeError, TypeError, ValueError) as e:
    raise MediaError(FailureReason.CORRUPT_AUDIO, str(e)) from None
  if wave.shape[0] == 0 or wave.shape[1] == 0:
    raise MediaError(FailureReason.EMPTY_AUDIO, "audio has no samples")
  if not np.all(np.isfinite(wave)):
    raise MediaError(FailureReason.CORRUPT_AUDIO, "audio contains NaN or infinite samples")
  return wave.mean(axis=1).astype(np.float32), int(rate)  # [S]


def _bucket(length: int) -> int:
  """Next power of two (at least 4096): resampling only ever compiles for a few lengths."""
  return max(4096, 1 << (int(length) - 1).bit_length())


def decode_audio(data: bytes, target_rate: int | None = 16000) -> np.ndarray:
  """Audio bytes -> float32 [S] mono, resampled to `target_rate` (None keeps the file's rate).

  Resampling is `codi_jax.audio.resample.resample` (torchaudio's sinc_interp_hann). The wave is
  zero-padded to a power-of-two length first: the resampler itself pads with zeros, so the
  first ceil(S * new / old) outputs are unchanged while XLA sees only a handful of shapes.
  """
  wave, rate = read_audio(data)
  if target_rate is None or rate == target_rate:
    return wave
  if isinstance(target_rate, bool) or not isinstance(target_rate, (int, np.integer)) \
      or target_rate <= 0:
    raise ValueError(f"target_rate must be a positive integer or None, got {target_rate!r}")
  length = wave.shape[0]
  padded = np.pad(wave, (0, _bucket(length) - length))  # [S']
  out = np.asarray(resample(padded, rate, int(target_rate)))  # [ceil(S' * new / old)]
  return out[:resampled_length(length, rate, int(target_rate))].astype(np.float32)  # [S_new]


# ------------------------------------------------------------------------------------------ video


def encode_mp4(frames: np.ndarray, fps: float, lossless: bool = True) -> bytes:
  """uint8 [F, H, W, 3] -> H.264 MP4 bytes.

  lossless: 4:4:4 chroma at qp 0 (any H, W; exact up to RGB<->YUV rounding, a level or two),
  which keeps small synthetic shapes exact. Otherwise the widely playable 4:2:0 at crf 18 (H and W
  must be even).
  """
  import av

  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
    raise ValueError(f"video must be non-empty uint8 [F, H, W, 3], got {frames.dtype} "
                     f"{frames.shape}")
  if isinstance(fps, bool) or not isinstance(fps, (int, float, np.number, fractions.Fraction)) \
      or not 0 < fps < float("inf"):
    raise ValueError(f"fps must be a positive number, got {fps!r}")
  _, height, width, _ = frames.shape
  if not lossless and (height % 2 or width % 2):
    raise ValueError(f"4:2:0 H.264 needs even frame sizes, got {height}x{width}")
  buf = io.BytesIO()
  with av.open(buf, mode="w", format="mp4") as container:
    # A rational rate: e.g. 4 frames over 1.5 s of audio is 8/3 fps.
    stream = container.add_stream("libx264", rate=fractions.Fraction(fps).limit_denominator(1001))
    stream.width, stream.height = width, height
    stream.pix_fmt = "yuv444p" if lossless else "yuv420p"
    # One thread: identical bytes on every machine for the same frames.
    stream.options = {"qp": "0", "threads": "1"} if lossless else {"crf": "18", "threads": "1"}
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():  # Flush the encoder's delayed frames.
      container.mux(packet)
  return buf.getvalue()


def decode_video(data: bytes, num_frames: int | None = None) -> np.ndarray:
  """Video bytes (any FFmpeg container) -> uint8 [F, H, W, 3] RGB.

  num_frames: None returns every frame; otherwise that many frames at evenly spaced indices over
  the whole clip (a clip shorter than num_frames repeats frames).
  """
  import av

  data = _check_bytes(data, "video")
  if num_frames is not None and (isinstance(num_frames, bool) or num_frames <= 0):
    raise ValueError(f"num_frames must be a positive integer or None, got {num_frames!r}")
  decoded = []
  try:
    with av.open(io.BytesIO(data), mode="r") as container:
      if container.format.name == "image2" or container.format.name.endswith("_pipe"):
        raise MediaError(FailureReason.UNSUPPORTED_FORMAT,
                         f"a still image ({container.format.name}), not a video")
      if not container.streams.video:
        raise MediaError(FailureReason.CORRUPT_VIDEO, "no video stream")
      stream = container.streams.video[0]
      declared = stream.frames
      for frame in container.decode(stream):
        decoded.append(frame.to_ndarray(format="rgb24"))  # [H, W, 3]
  except av.FFmpegError as e:
    # Failing after some good frames is what a cut-off download looks like.
    reason = FailureReason.TRUNCATED_VIDEO if decoded else FailureReason.CORRUPT_VIDEO
    raise MediaError(reason, f"after {len(decoded)} frames: {e}") from None
  if not decoded:
    raise MediaError(FailureReason.EMPTY_VIDEO, "video has no decodable frames")
  if declared and len(decoded) < declared:
    raise MediaError(FailureReason.TRUNCATED_VIDEO,
                     f"decoded {len(decoded)} of {declared} declared frames")
  video = np.stack(decoded)  # [F, H, W, 3]
  if num_frames is None:
    return video
  index = np.round(np.linspace(0, len(decoded) - 1, num_frames)).astype(np.int64)  # [num_frames]
  return video[index]
