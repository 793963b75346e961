"""HiFi-GAN vocoder: parity, full-size shapes against the manifest, lengths, errors, tracing."""

import json

import flax.core.meta
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import parity
from codi_jax.convert import keymap
from codi_jax.models.vocoder import (HiFiGAN, VocoderConfig, mel_to_waveform, param_shapes,
                                     vocoder_config_from_original)
from codi_jax.parity.fixtures import load_fixture


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
  return load_fixture(fixtures_dir / "hifigan_vocoder.npz")


@pytest.fixture(scope="module")
def tiny(fixture):
  """(HiFiGAN, params) of the fixture's tiny vocoder, loaded through the key map."""
  config = vocoder_config_from_original(fixture.config["hifigan_config"])
  params, report = keymap.VOCODER.to_flax(fixture.weights, param_shapes(config))
  report.check()
  return HiFiGAN(config), jax.tree_util.tree_map(jnp.asarray, params)


def test_parity(fixtures_dir):
  rows = parity.check_file(fixtures_dir / "hifigan_vocoder.npz")
  assert set(rows) == {"waveform"}
  for name, row in rows.items():
    assert row.passed, (name, row)


def test_full_size_matches_manifest(fixtures_dir, fixture):
  manifest = json.loads((fixtures_dir / "manifest_full.json").read_text())
  config = vocoder_config_from_original(fixture.config["full_size_config"])
  ours = flax.traverse_util.flatten_dict(flax.core.meta.unbox(param_shapes(config)))
  assert sum(int(np.prod(leaf.shape)) for leaf in ours.values()) == 55_264_897
  assert manifest["parameter_counts_per_component"]["hifigan_vocoder"] == 55_264_897
  prefix = "audioldm.vocoder."
  mapped = {keymap.VOCODER.torch_key(p, prefix): keymap.VOCODER.torch_shape(p, leaf.shape)
            for p, leaf in ours.items()}
  expected = {k: tuple(v["shape"]) for k, v in manifest["components"]["hifigan_vocoder"].items()
              if v.get("kind", "parameter") == "parameter"}
  assert mapped == expected


@pytest.mark.parametrize("frames", [1, 7, 10, 1024])
def test_output_length(frames):
  """torch ConvTranspose1d arithmetic: each odd (k - u) stage adds one sample, so the released
  rates give 160 * T + 32 samples (the fixture: T=10 -> 1632)."""
  config = VocoderConfig(upsample_initial_channel=32)
  model = HiFiGAN(config)
  shapes = param_shapes(config)
  out = jax.eval_shape(lambda p, m: mel_to_waveform(model, p, m), shapes,
                       jax.ShapeDtypeStruct((2, 1, frames, 64), jnp.float32))
  assert config.hop_length == 160
  assert config.num_samples(frames) == 160 * frames + 32
  assert out.shape == (2, 1, 160 * frames + 32)


def test_fixture_length_and_range(tiny, fixture):
  model, params = tiny
  mel = jnp.asarray(fixture.inputs["mel"])
  out = mel_to_waveform(model, params, mel)
  assert out.shape == fixture.outputs["waveform"].shape == (2, 1, 1632)
  assert float(jnp.abs(out).max()) < 1.0
  # The rank-3 mel [B, T, M] the original also accepts gives the same waveform.
  np.testing.assert_array_equal(np.asarray(mel_to_waveform(model, params, mel[:, 0])),
                                np.asarray(out))


@pytest.mark.parametrize("shape,match", [
    ((2, 1, 10, 80), "80 bins, the vocoder expects 64"),
    ((2, 10, 64, 1), r"expected a mel \[B, 1, T, 64\]"),
    ((10, 64), "got rank 2"),
    ((1, 2, 1, 10, 64), "got rank 5"),
])
def test_bad_mel(tiny, shape, match):
  model, params = tiny
  with pytest.raises(ValueError, match=match):
    mel_to_waveform(model, params, jnp.zeros(shape))


def test_empty_mel(tiny):
  model, params = tiny
  with pytest.raises(ValueError, match="no frames"):
    mel_to_waveform(model, params, jnp.zeros((1, 1, 0, 64)))


@pytest.mark.parametrize("change,match", [
    ({"resblock": "2"}, "only builds ResBlock1"),
    ({"upsample_rates": (5, 4)}, "2 upsample_rates but 5 upsample_kernel_sizes"),
    ({"upsample_initial_channel": 48}, "not divisible by 2\\*\\*5"),
    ({"resblock_kernel_sizes": (3, 8, 11)}, "kernel size 8 must be odd"),
    ({"resblock_dilation_sizes": ((1, 3), (1, 3, 5), (1, 3, 5))}, "three positive ints"),
    ({"upsample_kernel_sizes": (4, 16, 8, 4, 4)}, "rate 5 with kernel 4"),
])
def test_bad_config(change, match):
  with pytest.raises(ValueError, match=match):
    VocoderConfig(**change)


def test_config_from_original_errors(fixture):
  h = dict(fixture.config["hifigan_config"])
  del h["upsample_rates"]
  with pytest.raises(ValueError, match="missing the field 'upsample_rates'"):
    vocoder_config_from_original(h)


def test_jit_traces_once_per_shape(tiny):
  model, params = tiny
  traces = []

  def fn(p, mel):
    traces.append(mel.shape)
    return mel_to_waveform(model, p, mel)

  jitted = jax.jit(fn)
  a = jitted(params, jnp.zeros((1, 1, 3, 64)))
  jitted(params, jnp.ones((1, 1, 3, 64)))
  b = jitted(params, jnp.zeros((1, 1, 4, 64)))
  jitted(params, jnp.ones((1, 1, 4, 64)))
  assert traces == [(1, 1, 3, 64), (1, 1, 4, 64)]
  assert a.shape == (1, 1, 512) and b.shape == (1, 1, 672)
