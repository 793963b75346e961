"""The jnp audio front-end: STFT, mel filterbank and AudioLDM's `wav_to_fbank`."""

import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.audio import (fbank_frames, hann_window, mel_filterbank, mel_spectrogram, stft,
                            wav_to_fbank)
from codi_jax.parity.fixtures import load_fixture


@pytest.fixture(scope="module")
def audioldm(fixtures_dir):
  return load_fixture(fixtures_dir / "audioldm_vae.npz")


def test_mel_filterbank_equals_original_buffer(audioldm):
  ours = mel_filterbank(16000, 1024, 64, 0.0, 8000.0)
  assert ours.dtype == np.float32 and ours.shape == (64, 513)
  np.testing.assert_allclose(ours, audioldm.weights["fn_STFT.mel_basis"], rtol=0, atol=1e-7)


@pytest.mark.parametrize("htk", [False, True])
def test_unnormalised_triangles_partition_unity(htk):
  sr, n_fft, n_mels, fmin, fmax = 22050, 512, 20, 100.0, 6000.0
  tri = mel_filterbank(sr, n_fft, n_mels, fmin, fmax, htk=htk, norm=None)
  assert tri.max() <= 1.0 and tri.min() >= 0.0
  freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
  nonzero_lo = freqs[np.argmax(tri[0] > 0)]
  nonzero_hi = freqs[len(freqs) - 1 - np.argmax(tri[-1][::-1] > 0)]
  # Between the first and the last centre, neighbouring triangles sum to one.
  first_peak, last_peak = freqs[tri[0].argmax()], freqs[tri[-1].argmax()]
  inside = (freqs > first_peak) & (freqs < last_peak)
  np.testing.assert_allclose(tri[:, inside].sum(0), 1.0, atol=1e-6)
  assert fmin <= nonzero_lo and nonzero_hi <= fmax
  slaney = mel_filterbank(sr, n_fft, n_mels, fmin, fmax, htk=htk)
  ratio = slaney.sum(1) / tri.sum(1)  # slaney scales band i by 2 / (its width in Hz)
  assert np.all(ratio > 0) and np.all(np.diff(ratio) <= 1e-6 * ratio.max())  # bands widen


def test_hann_window():
  np.testing.assert_allclose(hann_window(16, periodic=False), np.hanning(16), atol=1e-15)
  np.testing.assert_allclose(hann_window(16), np.hanning(17)[:-1], atol=1e-15)


@pytest.mark.parametrize("method", ["fft", "dft"])
@pytest.mark.parametrize("center,pad_mode,win_length", [
    (True, "reflect", None), (True, "constant", 48), (False, "reflect", 64)])
def test_stft_matches_numpy_rfft(center, pad_mode, win_length, method):
  n_fft, hop = 64, 20
  x = np.random.default_rng(0).normal(size=(2, 3, 300)).astype(np.float32)
  real, imag = stft(jnp.asarray(x), n_fft, hop, win_length, center=center, pad_mode=pad_mode,
                    method=method)
  win_length = win_length or n_fft
  window = np.zeros(n_fft)
  window[(n_fft - win_length) // 2:][:win_length] = hann_window(win_length)
  xp = np.pad(x, ((0, 0), (0, 0), (n_fft // 2,) * 2), mode=pad_mode) if center else x
  frames = 1 + (xp.shape[-1] - n_fft) // hop
  framed = np.stack([xp[..., i * hop:i * hop + n_fft] for i in range(frames)], axis=-2)
  expected = np.fft.rfft(framed.astype(np.float64) * window, axis=-1)  # [2, 3, N, 33]
  assert real.shape == imag.shape == expected.shape
  np.testing.assert_allclose(real, expected.real, atol=2e-5)
  np.testing.assert_allclose(imag, expected.imag, atol=2e-5)


@pytest.mark.parametrize("output,wave", [("fbank", "waveform"),
                                         ("fbank_of_short_wave", "waveform_short")])
def test_wav_to_fbank_matches_original(audioldm, output, wave):
  frames = fbank_frames(audioldm.config["params"]["audio_time"])
  ours = wav_to_fbank(jnp.asarray(audioldm.inputs[wave]), frames)
  expected = audioldm.outputs[output][:, 0]  # [B, T, 64]
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)
  # a [B, 1, T] mono batch is the same clip
  np.testing.assert_array_equal(wav_to_fbank(jnp.asarray(audioldm.inputs[wave])[:, None],
                                             frames), ours)


def test_mel_spectrogram_shapes_and_energy():
  t = np.arange(3200) / 16000.0
  wave = jnp.asarray(0.5 * np.sin(2 * np.pi * 440.0 * t)[None], jnp.float32)
  mel, log_mag, energy = mel_spectrogram(wave)
  assert mel.shape == (1, 64, 21) and log_mag.shape == (1, 513, 21) and energy.shape == (1, 21)
  np.testing.assert_allclose(energy, jnp.sqrt(jnp.sum(jnp.exp(2 * log_mag), axis=1)), rtol=1e-4)
  # a 440 Hz tone peaks in the STFT bin nearest 440 Hz (bin 28 of 513 at 15.6 Hz spacing)
  assert int(jnp.argmax(log_mag[0, :, 10])) == 28


def test_fbank_frames():
  assert fbank_frames(0.625) == 64 and fbank_frames(10.0) == 1024 and fbank_frames(2.0) == 204


@pytest.mark.parametrize("call,match", [
    (lambda: wav_to_fbank(jnp.zeros((1, 4000)), 16, sample_rate=44100), "16000 Hz"),
    (lambda: wav_to_fbank(jnp.zeros((1, 2, 4000)), 16), "mono"),
    (lambda: wav_to_fbank(jnp.zeros((4000,)), 16), r"\[B, T\]"),
    (lambda: wav_to_fbank(jnp.zeros((1, 50)), 16), "too short"),
    (lambda: wav_to_fbank(jnp.zeros((1, 4000)), 0), "target_length"),
    (lambda: mel_spectrogram(jnp.zeros((4000,))), "mono batch"),
    (lambda: stft(jnp.zeros((100,)), 0, 10), "positive"),
    (lambda: stft(jnp.zeros((100,)), 32, 8, win_length=64), "win_length"),
    (lambda: stft(jnp.zeros((100,)), 32, 8, pad_mode="edge"), "pad_mode"),
    (lambda: stft(jnp.zeros((100,)), 32, 8, method="fast"), "method"),
    (lambda: stft(jnp.zeros((10,)), 32, 8), "reflect padding"),
    (lambda: stft(jnp.zeros((10,)), 32, 8, center=False), "shorter than one frame"),
    (lambda: mel_filterbank(16000, 1024, 64, 0.0, 8000.0, norm="l2"), "norm"),
    (lambda: mel_filterbank(16000, 1024, 64, 9000.0, 8000.0), "fmin < fmax"),
    (lambda: fbank_frames(0.001), "no mel frames"),
])
def test_bad_inputs_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()
