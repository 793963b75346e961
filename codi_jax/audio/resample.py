"""Band-limited resampling, numerically as `torchaudio.functional.resample` (sinc_interp_hann).

CoDi's CLAP conditioning resamples 16 kHz audio to 48 kHz with the torchaudio defaults
(lowpass_filter_width 6, rolloff 0.99; CODI_REFERENCE §1.2). With g = gcd(orig, new), o = orig/g
and n = new/g, output sample j is the Hann-windowed sinc interpolation of the input at time j/n
(in units of o input samples):

  y[j] = sum_i x[i] * (f_c / o) * sinc(pi * f_c * (i/o - j/n)) * cos^2(pi * f_c * (i/o - j/n) / 2w)

with f_c = min(o, n) * rolloff and the argument clamped to [-w, w] (w = lowpass_filter_width).
Every n consecutive outputs reuse the same n filters on an input shifted by o samples, so the
whole resampling is one strided 1-D convolution with an [n, 1, K] polyphase kernel. The kernel
is built in float32 exactly as torchaudio builds it for a float32 waveform.

S input samples, L output samples, P phases (n), K kernel taps.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _check_rates(orig_freq: int, new_freq: int, lowpass_filter_width: int) -> None:
  for name, value in (("orig_freq", orig_freq), ("new_freq", new_freq)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"resample: {name} must be a positive integer sample rate, got {value!r}")
  if lowpass_filter_width <= 0:
    raise ValueError(f"resample: lowpass_filter_width must be positive, got {lowpass_filter_width}")


@functools.lru_cache(maxsize=32)
def sinc_resample_kernel(orig_freq: int, new_freq: int, lowpass_filter_width: int = 6,
                         rolloff: float = 0.99) -> tuple[np.ndarray, int]:
  """The polyphase filter bank [P, K] (float32) and the padding width w of torchaudio's kernel.

  Row p filters the input window [f*o - w, f*o + w + o) into output f*n + p.
  """
  _check_rates(orig_freq, new_freq, lowpass_filter_width)
  g = math.gcd(int(orig_freq), int(new_freq))
  o, n = int(orig_freq) // g, int(new_freq) // g
  base_freq = min(o, n) * rolloff
  width = math.ceil(lowpass_filter_width * o / base_freq)
  f32 = np.float32
  # Same float32 operations, in the same order, as torchaudio for a float32 waveform.
  idx = np.arange(-width, width + o, dtype=f32)[None, :] / f32(o)  # [1, K]
  t = np.arange(0, -n, -1, dtype=f32)[:, None] / f32(n) + idx  # [P, K]
  t = np.clip(t * f32(base_freq), -lowpass_filter_width, lowpass_filter_width).astype(f32)
  window = np.cos(t * f32(math.pi) / f32(lowpass_filter_width) / f32(2)) ** 2
  t = t * f32(math.pi)
  with np.errstate(divide="ignore", invalid="ignore"):
    kernel = np.where(t == 0, f32(1), np.sin(t) / t).astype(f32)
  kernel = kernel * (window * f32(base_freq / o))
  return kernel.astype(f32), width


def resampled_length(length: int, orig_freq: int, new_freq: int) -> int:
  """ceil(length * new / orig), the number of samples `resample` returns."""
  return -(-int(length) * int(new_freq) // int(orig_freq))


def resample(waveform: jax.Array, orig_freq: int, new_freq: int, *,
             lowpass_filter_width: int = 6, rolloff: float = 0.99) -> jax.Array:
  """[..., S] at `orig_freq` -> [..., ceil(S * new / orig)] at `new_freq` (float32)."""
  _check_rates(orig_freq, new_freq, lowpass_filter_width)
  waveform = jnp.asarray(waveform)
  if waveform.ndim == 0:
    raise ValueError("resample: waveform must have a time axis, got a scalar")
  if not jnp.issubdtype(waveform.dtype, jnp.floating):
    raise ValueError(f"resample: waveform must be floating point, got {waveform.dtype}")
  if orig_freq == new_freq:
    return waveform
  kernel, width = sinc_resample_kernel(int(orig_freq), int(new_freq), lowpass_filter_width,
                                       float(rolloff))
  g = math.gcd(int(orig_freq), int(new_freq))
  o = int(orig_freq) // g
  batch_shape, length = waveform.shape[:-1], waveform.shape[-1]
  x = waveform.astype(jnp.float32).reshape(-1, 1, length)  # [N, 1, S]
  x = jnp.pad(x, ((0, 0), (0, 0), (width, width + o)))  # [N, 1, S + K]
  y = jax.lax.conv_general_dilated(
      x, jnp.asarray(kernel)[:, None, :], window_strides=(o,), padding="VALID",
      dimension_numbers=("NCH", "OIH", "NCH"),
      precision=jax.lax.Precision.HIGHEST)  # [N, P, S // o + 1]
  y = jnp.swapaxes(y, 1, 2).reshape(y.shape[0], -1)  # [N, (S // o + 1) * P], phase fastest
  y = y[:, :resampled_length(length, orig_freq, new_freq)]  # [N, L]
  return y.reshape(batch_shape + y.shape[-1:])
