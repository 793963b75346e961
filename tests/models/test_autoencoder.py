"""KL autoencoders (image `autokl`, audio `audioldm`): parity, layout, helpers, training."""

import functools
import json

import flax.core.meta
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from codi_jax import parity
from codi_jax.audio import wav_to_fbank
from codi_jax.convert import keymap
from codi_jax.models.autoencoder import (AUDIO_VAE, IMAGE_VAE, AutoencoderConfig, AutoencoderKL,
                                         DiagonalGaussian, autoencoder_config_from_original,
                                         decode_audio, decode_image, encode_audio, encode_image,
                                         init_params, param_shapes)
from codi_jax.parity.fixtures import load_fixture

# The dev fixtures' sizes (`autokl.npz`, `audioldm_vae.npz`).
TINY = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4,
                         resolution=32)
TINY_AUDIO = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, in_channels=1, out_ch=1,
                               z_channels=8, embed_dim=8, scale_factor=0.9228)


def _unboxed(config, seed=0):
  return flax.core.meta.unbox(jax.jit(init_params, static_argnums=0)(config, jax.random.key(seed)))


def _jit(fn, model, **kwargs):
  """fn(model, params, *args) jitted over (params, *args)."""
  return jax.jit(functools.partial(fn, model, **kwargs))


def _method(model, method):
  return jax.jit(lambda p, x: model.apply({"params": p}, x, method=method))


@pytest.mark.parametrize("name", ["autokl", "audioldm_vae"])
def test_fixture_matches_original(fixtures_dir, name):
  rows = parity.check_file(fixtures_dir / f"{name}.npz")
  failed = {k: r for k, r in rows.items() if not r.passed}
  assert not failed, failed
  assert set(rows) == set(load_fixture(fixtures_dir / f"{name}.npz").outputs)


@pytest.mark.parametrize("config,component,prefix", [(IMAGE_VAE, "autokl", "autokl."),
                                                     (AUDIO_VAE, "audioldm_vae", "audioldm.")])
def test_full_size_keys_shapes_and_count(fixtures_dir, config, component, prefix):
  manifest = json.loads((fixtures_dir / "manifest_full.json").read_text())
  ours = flax.traverse_util.flatten_dict(flax.core.meta.unbox(param_shapes(config)))
  mapped = {keymap.AUTOENCODER.torch_key(p, prefix): keymap.AUTOENCODER.torch_shape(p, v.shape)
            for p, v in ours.items()}
  expected = {k: tuple(v["shape"]) for k, v in manifest["components"][component].items()}
  assert mapped == expected
  assert sum(int(np.prod(v.shape)) for v in ours.values()) == \
      manifest["parameter_counts_per_component"][component]


def _dd(**overrides):
  dd = dict(double_z=True, z_channels=8, resolution=256, downsample_time=False, in_channels=1,
            out_ch=1, ch=128, ch_mult=[1, 2, 4], num_res_blocks=2, attn_resolutions=[],
            dropout=0.0)
  return dict(dd, **overrides)


def test_config_from_original_yaml():
  # `configs/model/audioldm.yaml`; its `downsample_time` is ignored by the original too.
  assert autoencoder_config_from_original({"ddconfig": _dd(), "embed_dim": 8}, 0.9228) == AUDIO_VAE
  sd = _dd(z_channels=4, in_channels=3, out_ch=3, ch_mult=[1, 2, 4, 4])
  del sd["downsample_time"]
  assert autoencoder_config_from_original({"ddconfig": sd, "embed_dim": 4}, 0.18215) == IMAGE_VAE


@pytest.mark.parametrize("args,match", [
    ({"ddconfig": _dd()}, "embed_dim"),
    ({"ddconfig": _dd(dropout=0.1), "embed_dim": 8}, "dropout"),
    ({"ddconfig": _dd(use_video_arch=True), "embed_dim": 8}, "use_video_arch"),
    ({"ddconfig": _dd(downsample_time_stride4_levels=[1]), "embed_dim": 8}, "stride4"),
    ({"ddconfig": _dd(mystery=1), "embed_dim": 8}, "unknown fields"),
    ({"ddconfig": _dd(double_z=False), "embed_dim": 8}, "double_z"),
    ({"ddconfig": _dd(ch=48), "embed_dim": 8}, "GroupNorm"),
    ({"ddconfig": _dd(ch_mult=[]), "embed_dim": 8}, "ch_mult"),
])
def test_bad_config_raises(args, match):
  with pytest.raises(ValueError, match=match):
    autoencoder_config_from_original(args, 1.0)


def _fixture_model(fixtures_dir, name, config):
  """The dev fixture's tiny autoencoder (random weights drawn like an init; no init compile)."""
  params, report = keymap.AUTOENCODER.to_flax(load_fixture(fixtures_dir / name).weights,
                                               param_shapes(config))
  report.check()
  return AutoencoderKL(config), jax.tree_util.tree_map(jnp.asarray, params)


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
  return _fixture_model(fixtures_dir, "autokl.npz", TINY)


@pytest.fixture(scope="module")
def tiny_audio(fixtures_dir):
  return _fixture_model(fixtures_dir, "audioldm_vae.npz", TINY_AUDIO)


@pytest.mark.parametrize("method,shape,match", [
    (AutoencoderKL.encode, (1, 8, 8, 1), r"\[B, H, W, 3\]"),
    (AutoencoderKL.encode, (8, 8, 3), "got shape"),
    (AutoencoderKL.encode, (1, 1, 1, 3), "smaller than the downsampling"),
    (AutoencoderKL.decode, (1, 4, 4, 3), r"\[B, H, W, 4\]"),
])
def test_bad_shapes_raise(tiny, method, shape, match):
  model, params = tiny
  with pytest.raises(ValueError, match=match):
    model.apply({"params": params}, jnp.zeros(shape), method=method)


def test_audio_helpers_reject_bad_input(tiny, tiny_audio):
  with pytest.raises(ValueError, match="one log-mel channel"):
    encode_audio(*tiny, jnp.zeros((1, 3200)), time=0.3)
  with pytest.raises(ValueError, match="mono"):
    encode_audio(*tiny_audio, jnp.zeros((1, 2, 3200)), time=0.3)
  with pytest.raises(ValueError, match=r"\[B, t, m, Z\]"):
    decode_audio(*tiny_audio, jnp.zeros((1, 2, 4, 4, 8)))


def test_posterior_sample_and_mode():
  mean = jnp.full((64, 32, 32, 1), 3.0)
  post = DiagonalGaussian(mean, jnp.full_like(mean, np.log(4.0)))
  a, b = post.sample(jax.random.key(1)), post.sample(jax.random.key(2))
  np.testing.assert_array_equal(a, post.sample(jax.random.key(1)))
  assert float(jnp.abs(a - b).max()) > 1.0
  assert abs(float(a.mean()) - 3.0) < 0.02 and abs(float(a.std()) - 2.0) < 0.02
  np.testing.assert_array_equal(post.latent(None), mean)


@pytest.mark.parametrize("bias,expected", [(100.0, 20.0), (-100.0, -30.0)])
def test_logvar_is_clamped(tiny, bias, expected):
  model, params = tiny
  params = jax.tree_util.tree_map(lambda x: x, params)  # a copy of the nested dicts
  params["quant_conv"]["bias"] = params["quant_conv"]["bias"].at[4:].set(bias)
  post = _method(model, AutoencoderKL.encode)(params, jnp.zeros((1, 8, 8, 3)))
  np.testing.assert_array_equal(post.logvar, expected)


def test_image_helpers_scale_and_fold_video(tiny):
  model, params = tiny
  encode, decode = _method(model, AutoencoderKL.encode), _method(model, AutoencoderKL.decode)
  video = jax.random.uniform(jax.random.key(0), (2, 3, 8, 8, 3), minval=-1, maxval=1)
  z = _jit(encode_image, model)(params, video)  # [B, F, 4, 4, 4]
  np.testing.assert_allclose(z[:, 1], 0.18215 * encode(params, video[:, 1]).mean, atol=1e-5)
  sampled = _jit(encode_image, model)(params, video, jax.random.key(3))
  assert sampled.shape == z.shape and float(jnp.abs(sampled - z).max()) > 1e-3
  x = _jit(decode_image, model)(params, z)
  assert x.shape == video.shape
  np.testing.assert_allclose(x[:, 2], decode(params, z[:, 2] / 0.18215), atol=1e-5)


def test_audio_helpers(tiny_audio):
  model, params = tiny_audio
  encode, decode = _method(model, AutoencoderKL.encode), _method(model, AutoencoderKL.decode)
  wave = jax.random.normal(jax.random.key(0), (2, 2000))
  z = _jit(encode_audio, model, time=0.16)(params, wave)  # int(0.16 * 102.4) = 16 frames
  mean = encode(params, wav_to_fbank(wave, 16)[..., None]).mean
  np.testing.assert_allclose(z, 0.9228 * mean, atol=1e-5)
  assert z.shape == (2, 8, 32, 8)
  decode_codi = _jit(decode_audio, model)
  # Within |z| <= 100 nothing is clipped, even values beyond +-10 ...
  moderate = z.at[0, 0, 0, 0].set(50.0)
  np.testing.assert_allclose(decode_codi(params, moderate), decode(params, moderate / 0.9228),
                             atol=1e-5)
  # ... one value above 100 clips the whole batch to [-10, 10].
  wild = z.at[1, 0, 0, 0].set(150.0).at[0, 1, 1, 1].set(-20.0)
  out = decode_codi(params, wild)
  np.testing.assert_allclose(out, decode(params, jnp.clip(wild, -10, 10) / 0.9228), atol=1e-5)
  assert out.shape == (2, 16, 64, 1)


def _smooth_images(rng, n, size, channels):
  """Sums of a few low-frequency sinusoids in [-1, 1]."""
  yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
  freq = rng.uniform(0.5, 2.0, (n, channels, 2, 2))
  phase = rng.uniform(0, 2 * np.pi, (n, channels, 2))
  img = sum(np.sin(2 * np.pi * (freq[..., k, :1, None] * yy + freq[..., k, 1:, None] * xx)
                   + phase[..., k, None, None]) for k in range(2)) / 2
  return np.moveaxis(img, 1, -1).astype(np.float32)  # [n, size, size, channels]


def _smooth_mels(rng, n):
  """Log-mels of tone glides, standardised, lowest 32 bins: [n, 16 frames, 32 bins, 1]."""
  t = np.arange(16 * 160) / 16000.0
  f0 = rng.uniform(200, 2000, (n, 1))
  glide = rng.uniform(-0.5, 0.5, (n, 1))
  wave = np.sin(2 * np.pi * f0 * t * (1 + glide * t / t[-1]))
  mel = np.asarray(wav_to_fbank(jnp.asarray(wave, jnp.float32), 16))[..., :32]
  return ((mel - mel.mean()) / mel.std())[..., None].astype(np.float32)


@pytest.mark.parametrize("config,data", [
    (TINY, lambda rng: _smooth_images(rng, 4, 16, 3)),
    (TINY_AUDIO, lambda rng: _smooth_mels(rng, 4)),
])
def test_training_reduces_reconstruction_error(config, data):
  model = AutoencoderKL(config)
  params = _unboxed(config, seed=1)
  x = jnp.asarray(data(np.random.default_rng(0)))
  optimizer = optax.adam(2e-3)
  traces = []

  @jax.jit
  def step(params, opt_state, x):
    traces.append(1)
    def loss_fn(p):
      recon, _ = model.apply({"params": p}, x)
      return jnp.mean(jnp.square(recon - x))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  losses = []
  for _ in range(40):
    params, opt_state, loss = step(params, opt_state, x)
    losses.append(float(loss))
  assert len(traces) == 1  # one compilation for one input shape
  assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses
