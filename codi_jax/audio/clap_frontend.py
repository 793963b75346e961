"""CLAP's audio front-end: repeat-pad/crop, torchlibrosa log-mel, and the spectrogram image.

Stateless pieces of the original `CLAPAudioEmbeddingClassifierFreev2` path (CODI_REFERENCE §1.2):
* `repeat_pad` is `training/data.py` `get_audio_features(data_filling="repeatpad")`: a clip
  shorter than the target is tiled a whole number of times, then zero-padded;
* `log_mel_spectrogram` is torchlibrosa 0.0.9 `Spectrogram` (power STFT, periodic Hann,
  centred with reflect padding) followed by `LogmelFilterBank` (librosa slaney filters,
  `10 log10(max(mel, amin)) - 10 log10(max(amin, ref))`, no top_db clipping), as HTSAT's
  `init_spec` builds them;
* `bicubic_resize` is `F.interpolate(mode="bicubic", align_corners=True)` along one axis and
  `spectrogram_to_image` is HTSAT's `reshape_wav2img`.

B batch, S samples, T frames, M mel bins, K = n_fft // 2 + 1 frequency bins, R freq_ratio.
"""

from __future__ import annotations

import functools

import einops
import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.audio.mel import mel_filterbank
from codi_jax.audio.stft import stft

# torch's bicubic convolution constant (`upsample_bicubic2d`, Keys with a = -0.75).
_CUBIC_A = -0.75


def repeat_pad(wave: jax.Array, length: int) -> jax.Array:
  """[B, S] -> [B, length]: "repeatpad" filling, or a crop of the first `length` samples.

  The original crops a longer clip at a random offset (`np.random.randint`); we always take the
  start so that conditioning is deterministic.
  """
  if wave.ndim != 2:
    raise ValueError(f"repeat_pad: expected [B, S], got shape {wave.shape}")
  samples = wave.shape[1]
  if samples == 0:
    raise ValueError("repeat_pad: empty waveform (0 samples)")
  if length < 1:
    raise ValueError(f"repeat_pad: target length must be positive, got {length}")
  if samples >= length:
    return wave[:, :length]
  tiled = jnp.tile(wave, (1, length // samples))  # [B, (length // S) * S]
  return jnp.pad(tiled, ((0, 0), (0, length - tiled.shape[1])))  # [B, length]


@functools.lru_cache(maxsize=8)
def _mel_basis(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
  """torchlibrosa's `melW` [K, M] (the transposed librosa filters), read-only float32."""
  basis = np.ascontiguousarray(mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax).T)
  basis.flags.writeable = False
  return basis


def power_spectrogram(wave: jax.Array, n_fft: int, hop: int) -> jax.Array:
  """torchlibrosa `Spectrogram(power=2)`: [B, S] -> |STFT|^2 [B, T, K], T = S // hop + 1."""
  real, imag = stft(wave, n_fft, hop, n_fft, center=True, pad_mode="reflect")  # [B, T, K]
  return real * real + imag * imag


def log_mel_spectrogram(wave: jax.Array, *, sample_rate: int, n_fft: int, hop: int, n_mels: int,
                        fmin: float, fmax: float, amin: float = 1e-10,
                        ref: float = 1.0) -> jax.Array:
  """HTSAT's log-mel features in dB: [B, S] -> [B, T, M] (no top_db clipping)."""
  if wave.ndim != 2:
    raise ValueError(f"log_mel_spectrogram: expected [B, S], got shape {wave.shape}")
  power = power_spectrogram(wave.astype(jnp.float32), n_fft, hop)  # [B, T, K]
  basis = jnp.asarray(_mel_basis(sample_rate, n_fft, n_mels, float(fmin), float(fmax)))
  mel = jnp.einsum("btk,km->btm", power, basis,
                   precision=jax.lax.Precision.HIGHEST)  # [B, T, M]
  return 10.0 * jnp.log10(jnp.maximum(mel, amin)) - 10.0 * float(np.log10(max(amin, ref)))


@functools.lru_cache(maxsize=16)
def _bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Source indices [out, 4] (clamped to the edge) and float32 weights [out, 4]."""
  f32 = np.float32
  scale = f32(in_size - 1) / f32(out_size - 1) if out_size > 1 else f32(0)
  src = f32(scale) * np.arange(out_size, dtype=f32)  # align_corners=True source positions
  base = np.minimum(np.floor(src), f32(in_size - 1))
  t = np.clip(src - base, 0, 1).astype(f32)

  def near(x):  # |x| <= 1
    return ((f32(_CUBIC_A + 2) * x - f32(_CUBIC_A + 3)) * x * x + f32(1)).astype(f32)

  def far(x):  # 1 < |x| < 2
    a = f32(_CUBIC_A)
    return (((a * x - f32(5) * a) * x + f32(8) * a) * x - f32(4) * a).astype(f32)

  one = f32(1)
  weights = np.stack([far(t + one), near(t), near(one - t), far((one - t) + one)], axis=1)
  index = base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
  return np.clip(index, 0, in_size - 1), weights.astype(f32)


def bicubic_resize(x: jax.Array, size: int, axis: int) -> jax.Array:
  """Resizes one axis to `size` as torch bicubic interpolation with align_corners=True."""
  axis = axis % x.ndim
  if x.shape[axis] == size:
    return x
  index, weights = _bicubic_taps(x.shape[axis], size)
  taps = jnp.take(x, jnp.asarray(index), axis=axis)  # axis -> [size, 4]
  w = jnp.asarray(weights).reshape((1,) * axis + weights.shape + (1,) * (x.ndim - axis - 1))
  return jnp.sum(taps * w, axis=axis + 1)


def spectrogram_to_image(mel: jax.Array, spec_size: int) -> jax.Array:
  """HTSAT `reshape_wav2img`: log-mel [B, T, M] -> a square image [B, spec, spec, 1].

  Time is stretched to R * spec frames and frequency to spec / R bins (R = spec // M); the
  time axis is then cut into R consecutive chunks stacked along frequency, lowest chunk first.
  """
  _, frames, bins = mel.shape
  if spec_size % bins:
    raise ValueError(f"spectrogram_to_image: spec_size {spec_size} is not a multiple of the "
                     f"{bins} mel bins")
  ratio = spec_size // bins
  target_t, target_f = spec_size * ratio, spec_size // ratio
  if frames > target_t or bins > target_f:
    raise ValueError(f"spectrogram_to_image: {frames} frames x {bins} bins exceed the "
                     f"{target_t} x {target_f} the image holds")
  x = bicubic_resize(mel, target_t, axis=1)  # [B, R*spec, M]
  x = bicubic_resize(x, target_f, axis=2)  # [B, R*spec, spec/R]
  x = einops.rearrange(x, "b (r w) f -> b (r f) w 1", r=ratio)  # [B, spec, spec, 1]
  return x
