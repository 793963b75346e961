"""Mel filterbank and AudioLDM's log-mel front-end (`TacotronSTFT`, `wav_to_fbank`).

`mel_filterbank` reproduces librosa 0.9.2 `filters.mel` (Slaney mel scale by default, slaney area
normalisation). `mel_spectrogram` is the original `TacotronSTFT.mel_spectrogram`
(`audioldm_modules/audio/stft.py`): STFT magnitudes (not power), mel projection, natural
log of values clamped at 1e-5. `wav_to_fbank` is `audioldm_modules/audio/tools.py`: peak
normalisation, zero-pad/crop to `target_length * hop`, log-mel, first `target_length` frames
(CODI_REFERENCE §1.3, fixture README item 10).

Shapes: B batch, T samples, N STFT frames, K = n_fft // 2 + 1 bins, M mel bands.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.audio.stft import stft

# The AudioLDM / CoDi audio front-end (TacotronSTFT defaults).
SAMPLE_RATE = 16000
N_FFT = 1024
HOP = 160
WIN_LENGTH = 1024
N_MELS = 64
FMIN = 0.0
FMAX = 8000.0
LOG_CLAMP = 1e-5
# Frames per second of audio in the original's `int(time * 102.4)` (= 16000 / 160 * 1.024).
FRAMES_PER_SECOND = 102.4

# Slaney mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above.
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def _hz_to_mel(hz: np.ndarray, htk: bool) -> np.ndarray:
  hz = np.asarray(hz, np.float64)
  if htk:
    return 2595.0 * np.log10(1.0 + hz / 700.0)
  safe = np.maximum(hz, _MIN_LOG_HZ)  # log is only taken where hz >= 1 kHz
  return np.where(hz >= _MIN_LOG_HZ, _MIN_LOG_MEL + np.log(safe / _MIN_LOG_HZ) / _LOGSTEP,
                  hz / _F_SP)


def _mel_to_hz(mel: np.ndarray, htk: bool) -> np.ndarray:
  mel = np.asarray(mel, np.float64)
  if htk:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
  return np.where(mel >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp(_LOGSTEP * (mel - _MIN_LOG_MEL)),
                  _F_SP * mel)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None,
                   htk: bool = False, norm: str | None = "slaney") -> np.ndarray:
  """Triangular mel filters [n_mels, n_fft // 2 + 1] float32, as librosa 0.9.2 `filters.mel`.

  Band edges are `n_mels + 2` points evenly spaced in mel between fmin and fmax (default
  sample_rate / 2); with norm="slaney" each triangle is scaled by 2 / (its width in Hz).
  """
  if sample_rate < 1 or n_fft < 1 or n_mels < 1:
    raise ValueError(f"mel_filterbank: sample_rate, n_fft, n_mels must be positive, got "
                     f"{sample_rate}, {n_fft}, {n_mels}")
  fmax = sample_rate / 2.0 if fmax is None else float(fmax)
  if not 0.0 <= fmin < fmax:
    raise ValueError(f"mel_filterbank: need 0 <= fmin < fmax, got fmin={fmin}, fmax={fmax}")
  if norm not in ("slaney", None):
    raise ValueError(f"mel_filterbank: norm {norm!r} is not supported (use 'slaney' or None)")
  fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)  # [K]
  edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin, htk), _hz_to_mel(fmax, htk), n_mels + 2), htk)
  widths = np.diff(edges)  # [M + 1]
  ramps = edges[:, None] - fft_freqs[None, :]  # [M + 2, K]
  lower = -ramps[:-2] / widths[:-1, None]
  upper = ramps[2:] / widths[1:, None]
  # librosa stores the triangles in float32, then scales them in float64 and stores again.
  weights = np.maximum(0.0, np.minimum(lower, upper)).astype(np.float32)  # [M, K]
  if norm == "slaney":
    weights = (weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]).astype(np.float32)
  return weights


@functools.lru_cache(maxsize=8)
def _cached_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float,
                       fmax: float) -> np.ndarray:
  basis = mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax)
  basis.flags.writeable = False
  return basis


def _log_clamped(x: jax.Array) -> jax.Array:
  return jnp.log(jnp.maximum(x, LOG_CLAMP))


def mel_spectrogram(wave: jax.Array, *, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT,
                    hop: int = HOP, win_length: int = WIN_LENGTH, n_mels: int = N_MELS,
                    fmin: float = FMIN, fmax: float = FMAX
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`TacotronSTFT.mel_spectrogram` of wave [B, T] with samples in [-1, 1].

  Returns (log-mel [B, M, N], log STFT magnitudes [B, K, N], energy [B, N]), the original's
  channels-first layout; energy is the L2 norm of each frame's magnitudes.
  """
  if wave.ndim != 2:
    raise ValueError(f"mel_spectrogram: expected a mono batch [B, T], got shape {wave.shape}")
  # The direct DFT: its log-magnitudes are a parity output (`codi_jax.audio.stft`).
  real, imag = stft(wave, n_fft, hop, win_length, center=True, pad_mode="reflect",
                    method="dft")  # [B, N, K]
  magnitude = jnp.sqrt(real * real + imag * imag)
  basis = jnp.asarray(_cached_filterbank(sample_rate, n_fft, n_mels, float(fmin), float(fmax)))
  mel = jnp.einsum("mk,bnk->bmn", basis, magnitude,
                   precision=jax.lax.Precision.HIGHEST)  # [B, M, N]
  energy = jnp.sqrt(jnp.sum(magnitude * magnitude, axis=-1))  # [B, N]
  log_magnitude = _log_clamped(jnp.swapaxes(magnitude, 1, 2))  # [B, K, N]
  return _log_clamped(mel), log_magnitude, energy


def fbank_frames(time: float) -> int:
  """Log-mel frames AudioLDM takes for `time` seconds: the original's `int(time * 102.4)`."""
  frames = int(time * FRAMES_PER_SECOND)
  if frames < 1:
    raise ValueError(f"audio time {time} s gives no mel frames")
  return frames


def _mono(wave: jax.Array, what: str) -> jax.Array:
  if wave.ndim == 3 and wave.shape[1] == 1:
    return wave[:, 0]
  if wave.ndim == 3:
    raise ValueError(f"{what}: mono audio only, got {wave.shape[1]} channels (shape {wave.shape})")
  if wave.ndim != 2:
    raise ValueError(f"{what}: expected a waveform batch [B, T] (or [B, 1, T]), got shape "
                     f"{wave.shape}")
  return wave


def wav_to_fbank(wave: jax.Array, target_length: int, *,
                 sample_rate: int = SAMPLE_RATE) -> jax.Array:
  """AudioLDM `wav_to_fbank`: 16 kHz mono wave [B, T] -> log-mel [B, target_length, 64].

  Each clip is centred, scaled to peak 0.5 (`/ (max|x| + 1e-8) * 0.5`), then zero-padded or
  cropped to `target_length * 160` samples; its STFT has one frame more than target_length,
  the last is dropped.
  """
  if sample_rate != SAMPLE_RATE:
    raise ValueError(f"wav_to_fbank: AudioLDM needs {SAMPLE_RATE} Hz audio, got {sample_rate} Hz; "
                     "resample first")
  wave = _mono(jnp.asarray(wave, jnp.float32), "wav_to_fbank")
  if target_length < 1:
    raise ValueError(f"wav_to_fbank: target_length must be positive, got {target_length}")
  mel, _, _ = mel_spectrogram(fbank_clip(wave, target_length))  # [B, M, target_length + 1]
  return jnp.swapaxes(mel[:, :, :target_length], 1, 2)  # [B, target_length, M]


def fbank_clip(wave: jax.Array, target_length: int) -> jax.Array:
  """The waveform `wav_to_fbank` analyses: mono [B, T] centred, peak 0.5, zero-padded or cropped
  to target_length * 160 samples, clipped to [-1, 1] -> [B, target_length * 160]."""
  if wave.shape[1] <= 100:  # the original asserts this
    raise ValueError(f"wav_to_fbank: waveform too short ({wave.shape[1]} samples)")
  wave = wave - wave.mean(axis=1, keepdims=True)
  wave = 0.5 * wave / (jnp.max(jnp.abs(wave), axis=1, keepdims=True) + 1e-8)
  segment = target_length * HOP
  wave = wave[:, :segment]
  wave = jnp.pad(wave, ((0, 0), (0, segment - wave.shape[1])))  # [B, segment]
  return jnp.clip(wave, -1.0, 1.0)
