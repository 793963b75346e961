"""Composable conditioning: normalised weighted sum, clear errors."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.conditioning import mix_conditions
from codi_jax.modality import Modality


def test_mix_is_normalised_weighted_sum():
  a, b = jnp.full((2, 1, 4), 1.0), jnp.full((2, 1, 4), 5.0)
  out = mix_conditions({"text": a, Modality.AUDIO: b}, {"text": 1, "audio": 3})
  np.testing.assert_allclose(out, np.full((2, 1, 4), (1 + 15) / 4))
  np.testing.assert_allclose(mix_conditions({"image": b}), b)  # one condition: unchanged


@pytest.mark.parametrize("conditions,weights,match", [
    ({"smell": jnp.ones((1, 1, 4))}, None, "unknown modality 'smell'"),
    ({"text": jnp.ones((1, 1, 4))}, {"text": 0}, "sum to 0"),
    ({"text": jnp.ones((1, 1, 4))}, {"text": -1}, "negative"),
    ({"text": jnp.ones((1, 1, 4)), "TEXT": jnp.ones((1, 1, 4))}, None, "repeated"),
    ({"text": jnp.ones((1, 1, 4)), "audio": jnp.ones((1, 2, 4))}, None, "one shape"),
    ({}, None, "at least one"),
])
def test_bad_conditions_raise(conditions, weights, match):
  with pytest.raises(ValueError, match=match):
    mix_conditions(conditions, weights)


# --- encoding inputs: the dev fixtures' tiny CLIP and CLAP (both 24-d tokens) -------------------

@pytest.fixture(scope="module")
def encoders(fixtures_dir):
  from codi_jax.conditioning import PromptEncoders
  from codi_jax.convert import keymap
  from codi_jax.models.clap import variables_from_original
  from codi_jax.models.clip import FrozenCLIP, clip_config_from_original, param_shapes
  from codi_jax.models.clip_preprocess import preprocess_config_from_original
  from codi_jax.parity import clap as clap_parity
  from codi_jax.parity.fixtures import load_fixture
  from codi_jax.text import CLIPTokenizer

  clip_fx = load_fixture(fixtures_dir / "clip.npz")
  clap_fx = load_fixture(fixtures_dir / "clap.npz")
  clip_config = clip_config_from_original(clip_fx.config["clip_config"])
  params, report = keymap.CLIP.to_flax(clip_fx.weights, param_shapes(clip_config), prefix="model.")
  report.check()
  # The fixture's text tower has a 512-token vocabulary; give it the real one (random rows) so
  # real CLIP token ids go through.
  text = dataclasses.replace(clip_config.text, vocab_size=49408)
  clip_config = dataclasses.replace(clip_config, text=text)
  table = params["text_model"]["embeddings"]["token_embedding"]
  table["embedding"] = np.random.default_rng(0).normal(
      0, 0.1, (text.vocab_size, text.width)).astype(np.float32)
  clip = FrozenCLIP(clip_config, params,
                    preprocess_config_from_original(clip_fx.config["processor_config"]))
  clap_config = clap_parity.fixture_config(clap_fx)
  enc = PromptEncoders(clip, CLIPTokenizer.from_file(
      clip_fx.vocab_file("clip_bpe_simple_vocab_16e6.txt.gz")),
      variables_from_original(clap_fx.weights, clap_config), clap_config)
  return enc, clip_fx, clap_fx


def test_each_modality_encodes_as_the_original(encoders):
  enc, clip_fx, clap_fx = encoders
  image = np.moveaxis(clip_fx.inputs["image"], 1, -1)  # [B, H, W, 3]
  video = np.moveaxis(clip_fx.inputs["video"], 1, -1)  # [B, F, H, W, 3]
  wave = clap_fx.inputs["waveform_16k"]  # [B, 1, S]
  cases = [(Modality.IMAGE, image, "encode_vision_image", clip_fx),
           (Modality.VIDEO, video, "encode_vision_video", clip_fx),
           (Modality.AUDIO, wave, "clap_encode_audio", clap_fx),
           (Modality.AUDIO, wave[:, 0], "clap_encode_audio", clap_fx)]
  for m, x, name, fx in cases:
    np.testing.assert_allclose(enc.encode(m, x), fx.outputs[name], atol=2e-5)
  # Null tokens: a grey (all-zero) image, silence.
  np.testing.assert_allclose(enc.null("image", image), clip_fx.outputs["encode_vision_zeros_image"],
                             atol=2e-5)
  np.testing.assert_allclose(enc.null("audio", wave), clap_fx.outputs["clap_encode_audio_zeros"],
                             atol=2e-5)
  text = enc.encode("text", ["a dog barks", "rain on a window"])
  assert text.shape == (2, 1, 24)
  np.testing.assert_allclose(jnp.linalg.norm(text, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(enc.null("text", ["x", "y"]), enc.encode("text", ["", ""]))


def test_encode_conditions_mixes_inputs_and_nulls_with_the_same_weights(encoders):
  from codi_jax.conditioning import encode_conditions

  enc, clip_fx, clap_fx = encoders
  texts = ["a dog barks", "rain on a window"]
  wave = clap_fx.inputs["waveform_16k"]
  out = encode_conditions(enc, {"text": texts, Modality.AUDIO: wave}, {"text": 3, "audio": 1})
  t, a = enc.encode("text", texts), enc.encode("audio", wave)
  np.testing.assert_allclose(out.cond, (3 * t + a) / 4, atol=1e-6)
  nt, na = enc.null("text", texts), enc.null("audio", wave)
  np.testing.assert_allclose(out.uncond, (3 * nt + na) / 4, atol=1e-6)
  assert not np.allclose(out.cond, out.uncond)
  single = encode_conditions(enc, {"text": texts})
  np.testing.assert_allclose(single.cond, t)


@pytest.mark.parametrize("inputs,weights,match", [
    ({}, None, "at least one"),
    ({"smell": ["x"]}, None, "unknown modality 'smell'"),
    ({"text": ["x"], "TEXT": ["y"]}, None, "repeated"),
    ({"text": ["x"]}, {"text": 0}, "sum to 0"),
    ({"text": ["x"]}, {"audio": 1}, "not inputs"),
    ({"text": ["x", "y"], "audio": np.zeros((1, 1600))}, None, "different batch sizes"),
    ({"image": np.zeros((1, 32, 32))}, None, r"\[B, H, W, 3\]"),
    ({"video": np.zeros((1, 32, 32, 3))}, None, r"\[B, F, H, W, 3\]"),
    ({"audio": np.zeros((1, 2, 1600))}, None, "mono"),
    ({"text": []}, None, "non-empty list of strings"),
])
def test_bad_inputs_raise(encoders, inputs, weights, match):
  from codi_jax.conditioning import encode_conditions

  with pytest.raises(ValueError, match=match):
    encode_conditions(encoders[0], inputs, weights)
