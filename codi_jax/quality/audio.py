"""Audio quality checks: are the decoded waves correctly pitched, audible clips?

Two measurements on held-out examples, each a wave -> wave transform scored by the dataset's
audio analyzer (`analyzers.analyze_audio`: pitch, timbre, rhythm; UNKNOWN below its level floor):

  true_mel    wave -> AudioLDM log-mel -> audio decoder -> wave: the decoder alone
              (`config.model.audio_decoder`: the HiFi-GAN vocoder, or Griffin-Lim on tiny)
  round_trip  wave -> log-mel -> audio VAE (posterior mean) -> log-mel -> audio decoder -> wave

`score` gives, per attribute, the share of clips read as the example's true value, and
`readable`, the share the analyzer could read at all (not UNKNOWN). The transforms are pure
functions of (config, params) (`true_mel_transform`, `round_trip_transform`), so `measure` also
takes stand-ins (the identity scores 1.0, silence 0). `checks` is the stage check
(`codi_jax.quality.checks`): each number against its bar (attributes 0.9, readable 0.98).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax import components
from codi_jax.audio import decoder as audio_decoder
from codi_jax.audio.mel import SAMPLE_RATE, wav_to_fbank
from codi_jax.data import analyzers
from codi_jax.data import synthetic as syn
from codi_jax.modality import Modality
from codi_jax.models import autoencoder, vocoder
from codi_jax.train.objectives import audio_frames

PyTree = Any
# wave [B, S] float32 -> wave [B, L] float32 (jit-able).
Transform = Callable[[jax.Array], jax.Array]

ATTRIBUTES = analyzers.ATTRIBUTES_BY_MODALITY[Modality.AUDIO]  # pitch, timbre, rhythm
ATTRIBUTE_BAR = 0.9
READABLE_BAR = 0.98
BATCH = 16  # clips per compiled call (the last batch is padded)


def _decode(config: Mapping, params: Mapping[str, PyTree]) -> Callable[[jax.Array], jax.Array]:
  """log-mel [B, T, M] -> wave [B, L] by the model's audio decoder."""
  model = config["model"]
  if not audio_decoder.needs_vocoder(model):
    return lambda mel: audio_decoder.mel_to_wave(model, mel)
  if audio_decoder.VOCODER_PART not in params:
    raise ValueError(f"config.model.audio_decoder is 'hifigan' but the model has no "
                     f"{audio_decoder.VOCODER_PART} parameters (has {sorted(params)})")
  module = vocoder.HiFiGAN(components.vocoder_config(model))
  vocoder_params = params[audio_decoder.VOCODER_PART]
  return lambda mel: audio_decoder.mel_to_wave(model, mel, module, vocoder_params)


def true_mel_transform(config: Mapping, params: Mapping[str, PyTree]) -> Transform:
  """wave [B, S] -> its log-mel -> the audio decoder -> wave [B, L]."""
  decode = _decode(config, params)
  return lambda wave: decode(wav_to_fbank(wave, audio_frames(wave.shape[1])))


def round_trip_transform(config: Mapping, params: Mapping[str, PyTree]) -> Transform:
  """wave [B, S] -> log-mel -> audio VAE (posterior mean) -> log-mel -> decoder -> wave [B, L]."""
  decode = _decode(config, params)
  vae = autoencoder.AutoencoderKL(components.audio_vae_config(config["model"]))
  variables = {"params": params["audioldm_vae"]}

  def transform(wave: jax.Array) -> jax.Array:
    fbank = wav_to_fbank(wave, audio_frames(wave.shape[1]))[..., None]  # [B, T, M, 1]
    posterior = vae.apply(variables, fbank, method=autoencoder.AutoencoderKL.encode)
    mel = vae.apply(variables, posterior.mean, method=autoencoder.AutoencoderKL.decode)
    return decode(mel[..., 0])

  return transform


def run_transform(transform: Transform, waves: np.ndarray, batch: int = BATCH) -> np.ndarray:
  """`transform` jitted over fixed batches of `batch` clips: waves [N, S] -> [N, L] float32."""
  waves = np.asarray(waves, np.float32)
  if waves.ndim != 2 or not len(waves):
    raise ValueError(f"run_transform: expected waves [N, S] with N >= 1, got shape {waves.shape}")
  jitted = jax.jit(transform)
  out = []
  for start in range(0, len(waves), batch):
    chunk = waves[start:start + batch]
    padded = np.concatenate([chunk, np.repeat(chunk[:1], batch - len(chunk), axis=0)])
    out.append(np.asarray(jitted(jnp.asarray(padded)), np.float32)[:len(chunk)])
  return np.concatenate(out)


def score(waves: Sequence[np.ndarray], attributes: Sequence[syn.Attributes]) -> dict[str, float]:
  """{pitch, timbre, rhythm: share of clips read as the true value; readable: share the
  analyzer could read} of waves [S] at 16 kHz against their examples' attributes."""
  if len(waves) != len(attributes) or not len(waves):
    raise ValueError(f"score: {len(waves)} waves for {len(attributes)} examples (need as many, "
                     "at least one)")
  hits = {name: 0 for name in ATTRIBUTES}
  readable = 0
  for wave, attrs in zip(waves, attributes):
    read = analyzers.analyze_audio(np.asarray(wave, np.float32), SAMPLE_RATE)
    readable += all(read[n] != analyzers.UNKNOWN for n in ATTRIBUTES)
    truth = attrs.as_dict()
    for name in ATTRIBUTES:
      hits[name] += read[name] == truth[name]
  n = len(waves)
  return {**{name: hits[name] / n for name in ATTRIBUTES}, "readable": readable / n}


def measure(transform: Transform, examples: Sequence[syn.SyntheticExample],
            batch: int = BATCH) -> dict[str, float]:
  """`score` of `transform` applied to the examples' clips (all of one length)."""
  waves = np.stack([np.asarray(e.audio, np.float32) for e in examples])
  return score(list(run_transform(transform, waves, batch)), [e.attributes for e in examples])


def measure_model(config: Mapping, params: Mapping[str, PyTree],
                  examples: Sequence[syn.SyntheticExample], batch: int = BATCH
                  ) -> dict[str, dict[str, float]]:
  """{"true_mel": score, "round_trip": score} of a model (`config`, host `params` with
  `audioldm_vae` and, for a HiFi-GAN decoder, `hifigan_vocoder`)."""
  return {"true_mel": measure(true_mel_transform(config, params), examples, batch),
          "round_trip": measure(round_trip_transform(config, params), examples, batch)}


def checks(ctx) -> dict[str, Any]:
  """The stage checks `audio/<true_mel|round_trip>/<pitch|timbre|rhythm|readable>` of a
  `codi_jax.quality.checks.Context`."""
  from codi_jax.quality.checks import Check  # pylint: disable=import-outside-toplevel
  out = {}
  for kind, scores in measure_model(ctx.config, ctx.params, ctx.test).items():
    for name, value in scores.items():
      bar = READABLE_BAR if name == "readable" else ATTRIBUTE_BAR
      out[f"audio/{kind}/{name}"] = Check(float(value), bar)
  return out
