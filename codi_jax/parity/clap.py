"""Parity handler for CoDi's CLAP audio encoder: `clap.npz`.

Builds the fixture's tiny HTSAT (sizes registered at run time as "HTSAT-fixture", in the
config's `params`) from its model json, loads the weights through `keymap.CLAP` (any
missing/unexpected key is an error; the stored torchlibrosa mel filters are checked against
ours) and runs `CoDi.clap_encode_audio` on the stored 16 kHz waves and on zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.audio.mel import mel_filterbank
from codi_jax.audio.resample import resample
from codi_jax.models.clap import (ClapAudioEncoder, ClapConfig, clap_config_from_original,
                                  clap_encode_audio, prepare_waveform, variables_from_original)
from codi_jax.parity.diffusion import Produced
from codi_jax.parity.fixtures import Fixture

# Shallow fp32 network on dB-scale features (fixture README: atol 1e-4, rtol 1e-4). The resampler
# is one float32 FIR filter per sample.
CLAP_TOL = (1e-4, 1e-4)
RESAMPLE_TOL = (1e-5, 1e-5)
MEL_FILTER_TOL = 1e-6


def fixture_config(fx: Fixture) -> ClapConfig:
  """The ClapConfig of a CLAP fixture (its own HTSAT sizes and joint width)."""
  p = fx.config["params"]
  sizes = dict(spec_size=p["spec"], embed_dim=p["embed_dim"], depths=tuple(p["depths"]),
               num_heads=tuple(p["heads"]), window_size=p["window"])
  return clap_config_from_original(fx.config["model_cfg"],
                                   joint_embed_shape=fx.config["clap_cfg"]["args"][
                                       "joint_embed_shape"], htsat_sizes=sizes)


def _check_mel_filters(fx: Fixture, config: ClapConfig) -> None:
  stored = fx.weights.get("model.audio_branch.logmel_extractor.melW")
  if stored is None:
    return
  a = config.audio
  ours = mel_filterbank(a.sample_rate, a.window_size, a.mel_bins, a.fmin, a.fmax).T
  err = float(np.abs(ours - stored).max())
  if ours.shape != stored.shape or err > MEL_FILTER_TOL:
    raise ValueError(f"recomputed logmel_extractor.melW differs from the stored one by {err}")


def clap_outputs(fx: Fixture) -> Produced:
  """clap_encode_audio (stored waves and zeros), logmel, htsat_embedding, resampled wave."""
  config = fixture_config(fx)
  _check_mel_filters(fx, config)
  variables = variables_from_original(fx.weights, config)
  model = ClapAudioEncoder(config)
  wave = jnp.asarray(fx.inputs["waveform_16k"])  # [B, 1, S]

  @jax.jit
  def intermediates(v, w):
    clip = prepare_waveform(w, config)  # [B, clip_samples] at 48 kHz
    mel = model.apply(v, clip, method=ClapAudioEncoder.log_mel)  # [B, T, M]
    return mel, model.apply(v, clip, method=ClapAudioEncoder.branch).embedding

  mel, embedding = intermediates(variables, wave)
  resampled = resample(wave[0, 0], config.input_sample_rate, config.audio.sample_rate)
  return {
      "clap_encode_audio": (np.asarray(clap_encode_audio(variables, wave, config)), CLAP_TOL),
      "clap_encode_audio_zeros": (
          np.asarray(clap_encode_audio(variables, jnp.zeros_like(wave), config)), CLAP_TOL),
      "logmel": (np.asarray(mel)[:, None], CLAP_TOL),
      "htsat_embedding": (np.asarray(embedding), CLAP_TOL),
      "resampled_48k_b0_first48000": (np.asarray(resampled[:48000]), RESAMPLE_TOL),
  }
