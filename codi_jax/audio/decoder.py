"""The one log-mel -> waveform step every audio output goes through (`mel_to_wave`).

`config.model.audio_decoder` selects it:
  "hifigan"      the HiFi-GAN vocoder part (`hifigan_vocoder`), as the original CoDi; the default,
                 and what a converted released model (whose config has no such field) uses;
  "griffin_lim"  no parameters: mel inversion + Griffin-Lim (`codi_jax.audio.griffin_lim`); the
                 `tiny` preset's decoder, since a CPU-sized HiFi-GAN does not learn correctly
                 pitched, audible waves within the demo's minutes. The vocoder part is not read.

The pipeline (`codi_jax.pipeline`), the training samples (`codi_jax.train.samples`) and the
quality checks (`codi_jax.quality.audio`) decode through here; evaluation decodes through the
pipeline.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from codi_jax.audio import griffin_lim
from codi_jax.audio.mel import HOP, N_MELS

HIFIGAN = "hifigan"
GRIFFIN_LIM = "griffin_lim"
DECODERS = (HIFIGAN, GRIFFIN_LIM)
VOCODER_PART = "hifigan_vocoder"


def decoder_name(model_config: Mapping[str, Any]) -> str:
  """`config.model.audio_decoder` (default "hifigan"), validated."""
  name = model_config.get("audio_decoder", HIFIGAN)
  if name not in DECODERS:
    raise ValueError(f"config.model.audio_decoder is {name!r}; choose one of {list(DECODERS)}")
  return name


def needs_vocoder(model_config: Mapping[str, Any]) -> bool:
  """Whether decoding audio reads the `hifigan_vocoder` parameters."""
  return decoder_name(model_config) == HIFIGAN


def mel_to_wave(model_config: Mapping[str, Any], mel: jax.Array, vocoder_model: Any = None,
                vocoder_params: Any = None) -> jax.Array:
  """AudioLDM log-mel [B, T, 64] -> 16 kHz wave [B, L] float32, jit-able.

  L = T * 160 for Griffin-Lim and `vocoder_model.config.num_samples(T)` (160 T + 32 for the
  released vocoder) for HiFi-GAN; callers trim to the length they want. `vocoder_model` (a
  `models.vocoder.HiFiGAN`) and `vocoder_params` are needed for "hifigan" only.
  """
  if mel.ndim != 3 or mel.shape[-1] != N_MELS:
    raise ValueError(f"mel_to_wave: expected a log-mel [B, T, {N_MELS}], got shape {mel.shape}")
  name = decoder_name(model_config)
  if name == GRIFFIN_LIM:
    return griffin_lim.mel_to_wave(mel.astype(jnp.float32))
  if vocoder_model is None or vocoder_params is None:
    raise ValueError("mel_to_wave: config.model.audio_decoder is 'hifigan', which needs the "
                     f"vocoder module and its parameters ({VOCODER_PART})")
  from codi_jax.models import vocoder  # pylint: disable=import-outside-toplevel
  return vocoder.mel_to_waveform(vocoder_model, vocoder_params, mel[:, None])[:, 0].astype(
      jnp.float32)


def frames_span(mel_frames: int) -> int:
  """Samples the frames of a log-mel cover (T * 160)."""
  return mel_frames * HOP
