"""CLAP audio encoder: fixture parity, full-size structure, buffers, front-end layout, errors."""

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import parity
from codi_jax.audio.clap_frontend import bicubic_resize, repeat_pad, spectrogram_to_image
from codi_jax.convert import keymap
from codi_jax.models import clap
from codi_jax.parity.clap import fixture_config
from codi_jax.parity.fixtures import load_fixture

FULL_CLAP_PARAMS = 280_951_959  # manifest_full.json parameter_counts_per_component["clap"]


@pytest.fixture(scope="module")
def clap_fixture(fixtures_dir):
  return load_fixture(fixtures_dir / "clap.npz")


@pytest.fixture(scope="module")
def tiny(clap_fixture):
  config = fixture_config(clap_fixture)
  return config, clap.variables_from_original(clap_fixture.weights, config)


def test_fixture_matches_original(fixtures_dir):
  rows = parity.check_file(fixtures_dir / "clap.npz")
  assert set(rows) == {"clap_encode_audio", "clap_encode_audio_zeros", "logmel",
                       "htsat_embedding", "resampled_48k_b0_first48000"}
  failed = {k: r for k, r in rows.items() if not r.passed}
  assert not failed, failed


def test_full_size_matches_the_checkpoint_layout(fixtures_dir):
  config = clap.ClapConfig()  # HTSAT-large, CoDi's CLAP
  shapes = clap.variable_shapes(config)
  leaves = jax.tree_util.tree_leaves(shapes["params"])
  assert sum(int(np.prod(x.shape)) for x in leaves) == FULL_CLAP_PARAMS
  manifest = json.loads((fixtures_dir / "manifest_full.json").read_text())["components"]["clap"]
  ours = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in flax.traverse_util.flatten_dict(
        flax.core.meta.unbox(shapes[collection])).items():
      ours[keymap.CLAP.torch_key(path, "clap.model.")] = keymap.CLAP.torch_shape(path, leaf.shape)
  assert ours == {k: tuple(manifest[k]["shape"]) for k in ours}
  # Everything else in the checkpoint is a buffer we recompute.
  rest = sorted(set(manifest) - set(ours))
  assert rest and all(keymap.CLAP.is_buffer(k[len("clap.model."):]) for k in rest)
  assert all(manifest[k]["kind"] == "buffer" for k in rest)


def test_recomputed_buffers_equal_the_stored_ones(clap_fixture):
  config = fixture_config(clap_fixture)
  for i in range(len(config.htsat.depths)):
    size, window, shift = config.htsat.stage_window(i)
    for j in range(config.htsat.depths[i]):
      key = f"model.audio_branch.layers.{i}.blocks.{j}."
      np.testing.assert_array_equal(clap.relative_position_index(window),
                                    clap_fixture.weights[key + "attn.relative_position_index"])
      if j % 2 and shift:
        np.testing.assert_array_equal(clap.shifted_window_mask(size, window, shift),
                                      clap_fixture.weights[key + "attn_mask"])
      else:
        assert key + "attn_mask" not in clap_fixture.weights


def test_unexpected_checkpoint_key_is_an_error(clap_fixture):
  config = fixture_config(clap_fixture)
  state = dict(clap_fixture.weights)
  state["model.audio_branch.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(KeyError, match="unexpected"):
    clap.variables_from_original(state, config)


def test_jit_compiles_once_per_shape(tiny):
  config, variables = tiny
  before = clap._encode._cache_size()
  rng = np.random.default_rng(0)
  a = clap.clap_encode_audio(variables, rng.standard_normal((1, 1, 4000), np.float32), config)
  b = clap.clap_encode_audio(variables, rng.standard_normal((1, 1, 4000), np.float32), config)
  assert clap._encode._cache_size() == before + 1
  assert a.shape == (1, 1, config.joint_embed_dim)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(a), axis=-1), 1.0, rtol=1e-5)
  assert not np.allclose(a, b)
  clap.clap_encode_audio(variables, np.zeros((2, 1, 4000), np.float32), config)
  assert clap._encode._cache_size() == before + 2


@pytest.mark.parametrize("wave,sample_rate,match", [
    (np.zeros((1, 1, 800), np.float32), 48000, "16000 Hz"),
    (np.zeros((1, 2, 800), np.float32), 16000, "mono"),
    (np.zeros((1, 800), np.float32), 16000, r"\[B, 1, S\]"),
    (np.zeros((1, 1, 0), np.float32), 16000, "empty"),
    (np.zeros((1, 1, 800), np.int16), 16000, "floating point"),
])
def test_bad_audio_raises(tiny, wave, sample_rate, match):
  config, variables = tiny
  with pytest.raises(ValueError, match=match):
    clap.clap_encode_audio(variables, wave, config, sample_rate=sample_rate)


def test_repeat_pad_tiles_then_zero_pads_and_crops_from_the_start():
  wave = jnp.asarray([[1.0, 2.0, 3.0]])
  np.testing.assert_array_equal(repeat_pad(wave, 8), [[1, 2, 3, 1, 2, 3, 0, 0]])
  np.testing.assert_array_equal(repeat_pad(wave, 2), [[1, 2]])
  with pytest.raises(ValueError, match="empty"):
    repeat_pad(jnp.zeros((1, 0)), 4)


def test_bicubic_resize_keeps_ends_and_constants():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 3)), jnp.float32)
  y = bicubic_resize(x, 13, axis=1)
  assert y.shape == (2, 13, 3)
  np.testing.assert_allclose(y[:, 0], x[:, 0], atol=1e-6)  # align_corners: ends coincide
  np.testing.assert_allclose(y[:, -1], x[:, -1], atol=1e-6)
  np.testing.assert_allclose(bicubic_resize(jnp.full((1, 7), 2.5), 20, axis=1), 2.5, rtol=1e-6)


def test_spectrogram_image_stacks_time_chunks_along_frequency():
  # 2 mel bins, spec 4: freq_ratio 2, time already 8 frames and frequency 2 bins (no resize).
  mel = jnp.asarray(10.0 * np.arange(8)[:, None] + np.arange(2)[None, :])[None]  # [1, 8, 2]
  image = np.asarray(spectrogram_to_image(mel, 4))[0, :, :, 0]  # [4, 4]
  for r in range(2):
    for f in range(2):
      np.testing.assert_array_equal(image[2 * r + f], 10.0 * (4 * r + np.arange(4)) + f)


@pytest.mark.parametrize("make,match", [
    (lambda: clap.HTSATConfig(embed_dim=30, num_heads=(4, 8, 16, 32)), "not divisible"),
    (lambda: clap.HTSATConfig(depths=(2, 2), num_heads=(4,)), "one entry per stage"),
    (lambda: clap.HTSATConfig(spec_size=250), "cannot be halved"),
    (lambda: clap.ClapConfig(audio=clap.ClapAudioConfig(mel_bins=60)), "multiple of mel_bins"),
    (lambda: clap.ClapConfig(clip_samples=600000), "frames"),
    (lambda: clap.ClapAudioConfig(fmax=30000.0), "fmax"),
])
def test_bad_configs_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_config_from_original(clap_fixture):
  large = {"embed_dim": 2048, "audio_cfg": dict(clap_fixture.config["model_cfg"]["audio_cfg"],
                                               model_name="large", hop_size=480, mel_bins=64,
                                               class_num=527)}
  assert clap.clap_config_from_original(large).htsat == clap.HTSATConfig()
  with pytest.raises(ValueError, match="unknown HTSAT size"):
    clap.clap_config_from_original(dict(large, audio_cfg=dict(large["audio_cfg"],
                                                              model_name="huge")))
  with pytest.raises(ValueError, match="embed_dim"):
    clap.clap_config_from_original(dict(large, embed_dim=1024))
