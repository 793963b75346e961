"""torchaudio-style sinc resampling: a direct float64 reference, signal properties, errors."""

import math

import jax
import numpy as np
import pytest

from codi_jax.audio.resample import resample, resampled_length, sinc_resample_kernel


def _direct_reference(x: np.ndarray, orig: int, new: int, width: int = 6,
                      rolloff: float = 0.99) -> np.ndarray:
  """y[j] = sum_i x[i] (f_c/o) sinc(f_c (i/o - j/n)) hann-window, evaluated per output in f64."""
  g = math.gcd(orig, new)
  o, n = orig // g, new // g
  fc = min(o, n) * rolloff
  out = np.empty(resampled_length(len(x), orig, new))
  i = np.arange(len(x))
  for j in range(len(out)):
    t = np.clip((i / o - j / n) * fc, -width, width)
    kernel = np.sinc(t) * np.cos(np.pi * t / width / 2) ** 2 * fc / o
    out[j] = np.dot(x, kernel)
  return out


@pytest.mark.parametrize("orig,new,length", [(16000, 48000, 200), (44100, 16000, 900),
                                             (48000, 16000, 301), (16000, 44100, 160)])
def test_matches_direct_sinc_reference(orig, new, length):
  x = np.random.default_rng(length).standard_normal(length).astype(np.float32)
  y = np.asarray(resample(x, orig, new))
  ref = _direct_reference(x.astype(np.float64), orig, new)
  assert y.shape == ref.shape == (math.ceil(length * new / orig),)
  # torchaudio (and so our kernel) forms the sinc argument in float32: with o = 441 phases the
  # taps carry ~1e-7 relative rounding of an argument up to ~160, i.e. ~1e-5 on unit signals.
  np.testing.assert_allclose(y, ref, atol=5e-5, rtol=0)


@pytest.mark.parametrize("orig,new", [(16000, 48000), (48000, 16000), (44100, 16000)])
def test_a_1khz_sine_stays_a_1khz_sine(orig, new):
  x = np.sin(2 * np.pi * 1000 * np.arange(orig // 10) / orig).astype(np.float32)  # 0.1 s
  y = np.asarray(resample(x, orig, new))
  assert y.shape == (new // 10,)
  expected = np.sin(2 * np.pi * 1000 * np.arange(len(y)) / new)
  interior = slice(len(y) // 5, -len(y) // 5)  # away from the zero-padded edges
  np.testing.assert_allclose(y[interior], expected[interior], atol=2e-3)
  spectrum = np.abs(np.fft.rfft(y[interior] * np.hanning(len(y[interior]))))
  peak_hz = np.argmax(spectrum) * new / len(y[interior])
  assert abs(peak_hz - 1000) < new / len(y[interior])


@pytest.mark.parametrize("length,orig,new", [(1, 16000, 48000), (7, 48000, 16000),
                                             (441, 44100, 16000), (1000, 44100, 16000)])
def test_length_is_ceil_of_ratio(length, orig, new):
  x = np.ones((2, 3, length), np.float32)
  y = resample(x, orig, new)
  assert y.shape == (2, 3, math.ceil(length * new / orig)) == (2, 3, resampled_length(
      length, orig, new))


def test_batch_rows_are_independent_and_jittable():
  x = np.random.default_rng(0).standard_normal((3, 400)).astype(np.float32)
  batched = np.asarray(jax.jit(lambda a: resample(a, 16000, 48000))(x))
  for row in range(3):
    np.testing.assert_allclose(batched[row], np.asarray(resample(x[row], 16000, 48000)),
                               atol=1e-6)


def test_equal_rates_are_the_identity():
  x = np.random.default_rng(1).standard_normal(50).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(resample(x, 16000, 16000)), x)


@pytest.mark.parametrize("orig,new,phases,width", [(16000, 48000, 3, 7), (44100, 16000, 160, 17)])
def test_kernel_is_the_polyphase_bank(orig, new, phases, width):
  kernel, w = sinc_resample_kernel(orig, new)
  assert w == width and kernel.dtype == np.float32 and kernel.shape[0] == phases
  # Phase 0 is centred on an input sample: symmetric, peak f_c / o = 0.99 (upsampling).
  if orig < new:
    np.testing.assert_allclose(kernel[0], kernel[0, ::-1], atol=1e-7)
    np.testing.assert_allclose(kernel[0, w], 0.99, rtol=1e-6)
  # A low-pass interpolator: every phase passes DC with gain ~1 (windowed-sinc ripple < 1e-3).
  np.testing.assert_allclose(kernel.sum(axis=1), 1.0, atol=1e-3)


@pytest.mark.parametrize("orig,new,match", [(0, 48000, "orig_freq"), (16000, -1, "new_freq"),
                                            (44100.5, 16000, "orig_freq")])
def test_bad_rates_raise(orig, new, match):
  with pytest.raises(ValueError, match=match):
    resample(np.zeros(10, np.float32), orig, new)


def test_bad_waveforms_raise():
  with pytest.raises(ValueError, match="floating point"):
    resample(np.zeros(10, np.int32), 16000, 48000)
  with pytest.raises(ValueError, match="time axis"):
    resample(np.float32(1.0), 16000, 48000)
  with pytest.raises(ValueError, match="lowpass_filter_width"):
    resample(np.zeros(10, np.float32), 16000, 48000, lowpass_filter_width=0)
