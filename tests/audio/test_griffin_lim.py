"""The parameter-free audio decoder: inverse STFT, mel inversion, Griffin-Lim, and the decoder
switch every audio output goes through."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from codi_jax.audio import decoder as audio_decoder
from codi_jax.audio import griffin_lim as gl
from codi_jax.audio.mel import HOP, N_FFT, WIN_LENGTH, wav_to_fbank
from codi_jax.audio.stft import stft
from codi_jax.data import analyzers


def _tone(hz: float, seconds: float = 0.4, harmonics=(1.0,)) -> np.ndarray:
  t = np.arange(int(seconds * 16000)) / 16000
  wave = sum(a * np.sin(2 * np.pi * (k + 1) * hz * t) for k, a in enumerate(harmonics))
  return (0.5 * wave / np.max(np.abs(wave))).astype(np.float32)


@pytest.mark.parametrize("n_fft,hop,win", [(64, 16, 64), (1024, 160, 1024), (64, 20, 48)])
def test_istft_inverts_stft(n_fft, hop, win):
  x = np.random.default_rng(0).normal(size=(2, 800)).astype(np.float32)
  real, imag = stft(jnp.asarray(x), n_fft, hop, win)
  y = gl.istft(real, imag, n_fft, hop, win, length=800)
  assert y.shape == (2, 800)
  np.testing.assert_allclose(np.asarray(y), x, atol=2e-4)


def test_istft_rejects_bad_shapes():
  with pytest.raises(ValueError, match="istft"):
    gl.istft(jnp.zeros((3, 10)), jnp.zeros((3, 10)), 64, 16)
  with pytest.raises(ValueError, match="mel_to_magnitude"):
    gl.mel_to_magnitude(jnp.zeros((2, 5, 63)))


def test_griffin_lim_decodes_a_tone_at_its_pitch_and_level():
  wave = _tone(440.0, harmonics=(1.0, 0.5, 0.33))  # a sawtooth-like tone
  mel = wav_to_fbank(jnp.asarray(wave[None]), 40)
  out = np.asarray(jax.jit(lambda m: gl.mel_to_wave(m, mel_iterations=50, iterations=16))(mel))
  assert out.shape == (1, 40 * HOP) and np.all(np.isfinite(out))
  rms = float(np.sqrt(np.mean(out ** 2)))
  assert 0.1 < rms < 0.6  # the peak-0.5 clip has rms ~0.3
  spectrum = np.abs(np.fft.rfft(out[0] * np.hanning(out.shape[1])))
  freqs = np.fft.rfftfreq(out.shape[1], 1 / 16000)
  assert abs(freqs[np.argmax(spectrum)] - 440.0) < 15.0
  read = analyzers.analyze_audio(out[0], 16000)
  assert read["pitch"] == analyzers.analyze_audio(wave[:40 * HOP], 16000)["pitch"]


def test_decoder_switch():
  cfg = ml_collections.ConfigDict({"audio_decoder": "griffin_lim"})
  assert not audio_decoder.needs_vocoder(cfg)
  assert audio_decoder.needs_vocoder(ml_collections.ConfigDict({}))  # released: HiFi-GAN
  assert audio_decoder.decoder_name({}) == "hifigan"
  with pytest.raises(ValueError, match="audio_decoder"):
    audio_decoder.decoder_name({"audio_decoder": "wavenet"})
  with pytest.raises(ValueError, match="hifigan"):
    audio_decoder.mel_to_wave({}, jnp.zeros((1, 4, 64)))
  with pytest.raises(ValueError, match="log-mel"):
    audio_decoder.mel_to_wave(cfg, jnp.zeros((1, 4, 32)))
