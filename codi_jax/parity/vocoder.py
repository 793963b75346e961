"""Parity handler for the HiFi-GAN vocoder: `hifigan_vocoder.npz`.

Builds the tiny Generator from the fixture's `hifigan_config`, loads its weights through
`keymap.VOCODER` (any missing/unexpected key is an error) and runs
`CoDi.mel_spectrogram_to_waveform` on the stored mel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from codi_jax.convert import keymap
from codi_jax.models.vocoder import (HiFiGAN, mel_to_waveform, param_shapes,
                                     vocoder_config_from_original)
from codi_jax.parity.diffusion import Produced
from codi_jax.parity.fixtures import Fixture

# fp32 conv stack, outputs in [-1, 1] after tanh (fixture README: atol 1e-4, rtol 1e-4).
WAVEFORM_TOL = (1e-4, 1e-4)


def vocoder_outputs(fx: Fixture) -> Produced:
  """`output/waveform` [B, 1, L] from `input/mel` [B, 1, T, M]."""
  config = vocoder_config_from_original(fx.config["hifigan_config"])
  params, report = keymap.VOCODER.to_flax(fx.weights, param_shapes(config))
  report.check()
  params = jax.tree_util.tree_map(jnp.asarray, params)
  waveform = mel_to_waveform(HiFiGAN(config), params, jnp.asarray(fx.inputs["mel"]))
  return {"waveform": (jax.device_get(waveform), WAVEFORM_TOL)}
