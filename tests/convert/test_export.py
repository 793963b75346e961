"""Export under the original names gives the original's whole state dict: every key, buffers
included, with the original's values and dtypes (reference fixtures at tiny size, the manifest of
the full model from shapes alone)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from codi_jax import checkpoint
from codi_jax.convert import buffers
from codi_jax.convert.original import codi_config_from_original
from codi_jax.models.autoencoder import autoencoder_config_from_original
from codi_jax.models.clap import prepare_waveform
from codi_jax.models.clip import clip_config_from_original
from codi_jax.models.optimus import optimus_config_from_original
from codi_jax.models.vocoder import vocoder_config_from_original
from codi_jax.parity import clap as clap_parity
from codi_jax.parity.fixtures import load_fixture
from configs.codi import get_config
from tests.conftest import REPO

# fixture file -> our part.
COMPONENTS = (("unet_codi", "diffusers"), ("autokl", "autokl"), ("audioldm_vae", "audioldm_vae"),
              ("hifigan_vocoder", "hifigan_vocoder"), ("optimus", "optimus"), ("clip", "clip"),
              ("clap", "clap"))
BUFFER_TOL = 1e-6


def _entry(typed) -> dict:
  """A typed encoder config as a `config.model` entry (its dtype comes from `model.dtype`)."""
  return {k: v for k, v in dataclasses.asdict(typed).items() if k != "dtype"}


@pytest.fixture(scope="module")
def reference(fixtures_dir):
  """(run config whose parts are the fixtures' models, {fixture name: Fixture})."""
  fx = {name: load_fixture(fixtures_dir / f"{name}.npz")
        for name in [n for n, _ in COMPONENTS] + ["ddim_sampler"]}
  config = get_config("tiny")
  with config.unlocked():
    diffusers = codi_config_from_original(fx["unet_codi"].config["unet_config"])
    for branch in ("image", "text", "audio"):
      sub = getattr(diffusers, branch)
      config.model[branch] = None if sub is None else dataclasses.asdict(sub)
    config.model.alignment = diffusers.alignment.value
    for name, field, scale in (("autokl", "image_vae", "vision_scale_factor"),
                               ("audioldm_vae", "audio_vae", "audio_scale_factor")):
      config.model[field] = dataclasses.asdict(autoencoder_config_from_original(
          fx[name].config["config"]["args"], float(fx[name].config[scale])))
    config.model.vocoder = dataclasses.asdict(vocoder_config_from_original(
        fx["hifigan_vocoder"].config["hifigan_config"]))
    optimus = fx["optimus"].config
    config.model.optimus = _entry(optimus_config_from_original(
        optimus["config"]["args"], scale_factor=float(optimus["text_scale_factor"])))
    config.model.clip = _entry(clip_config_from_original(fx["clip"].config["clip_config"]))
    config.model.clap = _entry(clap_parity.fixture_config(fx["clap"]))
    ddim = fx["ddim_sampler"].config
    config.diffusion = dict(num_timesteps=ddim["timesteps"],
                            beta_start=ddim["beta_linear_start"],
                            beta_end=ddim["beta_linear_end"])
  return config, fx


def _original(fx) -> dict[str, np.ndarray]:
  """A fixture's state dict under the full CoDi keys."""
  prefix = fx.config["state_dict_prefix_in_full_CoDi"]
  return {prefix + k: v for k, v in fx.weights.items()}


def _omitted(name: str, fx) -> dict[str, str | None]:
  """Keys of the original's state dict a fixture leaves out (fixture README, "Deviations"):
  {key: the key it is a tied copy of, or None}."""
  prefix = fx.config["state_dict_prefix_in_full_CoDi"]
  if name == "audioldm_vae":  # deviation 5: the STFT DFT bases
    return {prefix + "fn_STFT.stft_fn.forward_basis": None,
            prefix + "fn_STFT.stft_fn.inverse_basis": None}
  if name == "clap":  # deviation 6: torchlibrosa's STFT conv weights
    return {prefix + k: None for k in fx.config["omitted_keys"]}
  if name == "optimus":  # deviation 7: lm_head is wte, stored once
    return {prefix + k: prefix + v.split()[0] for k, v in fx.config["tied_weights"].items()}
  return {}


@pytest.mark.parametrize("name, part", COMPONENTS)
def test_export_is_the_original_state_dict(reference, name, part):
  config, fx = reference
  original = _original(fx[name])
  tree, report = checkpoint.part_from_state(config.model, part, original)
  assert report.ok, report.summary()
  # The fixture's CLAP had run once, so it holds torchlibrosa's lazily created `melW`.
  lazy = part == "clap"
  exported = checkpoint.params_to_state({part: tree}, config, lazy_buffers=lazy)
  omitted = _omitted(name, fx[name])
  schedule = checkpoint.SCHEDULE_BUFFERS if part == "diffusers" else set()
  assert set(exported) == set(original) | set(omitted) | schedule
  made = set(checkpoint.original_buffers(config, part, lazy=lazy))
  assert made == (set(original) - set(checkpoint.params_to_state({part: tree}))) | set(omitted) \
      | schedule
  for key, want in original.items():
    got = exported[key]
    assert (got.dtype, got.shape) == (want.dtype, want.shape), key
    if key not in made or np.issubdtype(want.dtype, np.integer):
      np.testing.assert_array_equal(got, want, err_msg=key)
    else:
      np.testing.assert_allclose(got, want, rtol=0, atol=BUFFER_TOL, err_msg=key)
  for key, tied in omitted.items():
    if tied:
      assert exported[key] is exported[tied] or np.array_equal(exported[key], exported[tied])
  for key in schedule:  # the DDPM buffers as the original registered them
    want = fx["ddim_sampler"].outputs[f"schedule/{key}"]
    assert exported[key].dtype == want.dtype == np.float32
    np.testing.assert_allclose(exported[key], want, rtol=BUFFER_TOL, atol=BUFFER_TOL, err_msg=key)


def _frames(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
  """Reflect-pad by n_fft // 2 and cut into frames: [S] -> [T, n_fft] (a centred conv1d STFT)."""
  x = np.pad(x, n_fft // 2, mode="reflect")
  index = np.arange((len(x) - n_fft) // hop + 1)[:, None] * hop + np.arange(n_fft)[None]
  return x[index].astype(np.float64)


def test_audioldm_stft_bases_give_the_original_stft(reference):
  """forward_basis and mel_basis reproduce the original's own TacotronSTFT outputs;
  inverse_basis is the windowed pseudo-inverse of the scaled DFT rows."""
  _, fx = reference
  b = {k.split(".")[-1]: v.value({}) for k, v in buffers.audioldm_buffers().items()}
  f = fx["audioldm_vae"]
  wave = np.clip(f.inputs["waveform"][0], -1.0, 1.0)
  spec = _frames(wave, 1024, 160) @ b["forward_basis"][:, 0, :].T.astype(np.float64)  # [T, 2K]
  magnitude = np.hypot(spec[:, :513], spec[:, 513:])  # [T, K]
  np.testing.assert_allclose(np.linalg.norm(magnitude, axis=1),
                             f.outputs["tacotron_energy_b0"][0], rtol=1e-5, atol=1e-5)
  # Quiet bins are ill-conditioned in log (codi_jax.parity.autoencoder.LOG_MAGNITUDE_TOL).
  np.testing.assert_allclose(np.log(np.maximum(magnitude, 1e-5)).T,
                             f.outputs["tacotron_log_magnitudes_b0"][0], atol=2e-3)
  mel = np.log(np.maximum(b["mel_basis"].astype(np.float64) @ magnitude.T, 1e-5))
  np.testing.assert_allclose(mel, f.outputs["tacotron_mel_b0"][0], atol=1e-4)
  # Magnitudes cannot tell real from imaginary rows: check the layout against the formula.
  fourier = np.fft.fft(np.eye(1024))[:513]
  window = np.hanning(1025)[:1024]  # periodic Hann
  np.testing.assert_allclose(b["forward_basis"][:, 0],
                             np.vstack([fourier.real, fourier.imag]) * window, atol=1e-6)
  scaled = 1024 / 160 * np.vstack([fourier.real, fourier.imag])  # [2K, n_fft]
  inverse = b["inverse_basis"][:, 0, 1:] / window[1:]  # pinv(scaled).T, window divided out
  np.testing.assert_allclose(scaled.T @ inverse, np.eye(1024)[:, 1:], atol=1e-5)


def test_clap_frontend_gives_the_original_log_mel(reference):
  """The lazily created torchlibrosa weights reproduce the original's log-mel of the stored
  waves (conv STFT, power, melW, dB)."""
  _, fx = reference
  f = fx["clap"]
  clap_config = clap_parity.fixture_config(f)
  made = {k.split("audio_branch.")[-1]: v.value({})
          for k, v in buffers.clap_buffers(clap_config).items() if v.lazy}
  a = clap_config.audio
  clips = np.asarray(prepare_waveform(f.inputs["waveform_16k"], clap_config))  # [B, S]
  for clip, want in zip(clips, f.outputs["logmel"][:, 0]):
    frames = _frames(clip, a.window_size, a.hop_size)  # [T, n_fft]
    real = frames @ made["spectrogram_extractor.stft.conv_real.weight"][:, 0].T
    imag = frames @ made["spectrogram_extractor.stft.conv_imag.weight"][:, 0].T
    power = real ** 2 + imag ** 2  # [T, K]
    logmel = 10 * np.log10(np.maximum(power @ made["logmel_extractor.melW"], 1e-10))
    np.testing.assert_allclose(logmel, want, atol=1e-4 + 1e-4 * np.abs(want).max())
  # Power cannot tell real from imaginary: check the layout against torchlibrosa's `DFTBase`.
  n = a.window_size
  x, y = np.meshgrid(np.arange(n), np.arange(n))
  dft = np.power(np.exp(-2j * np.pi / n), x * y)[:, :n // 2 + 1] * np.hanning(n + 1)[:n, None]
  np.testing.assert_allclose(made["spectrogram_extractor.stft.conv_real.weight"][:, 0],
                             dft.real.T, atol=1e-6)
  np.testing.assert_allclose(made["spectrogram_extractor.stft.conv_imag.weight"][:, 0],
                             dft.imag.T, atol=1e-6)


def test_full_size_export_matches_the_manifest(fixtures_dir):
  """The full model's export, from shapes alone: exactly the original's 6109 keys, shapes and
  dtypes, buffers included; the lazily created CLAP front-end only on request."""
  manifest = json.loads((fixtures_dir / "manifest_full.json").read_text())
  want = {k: (tuple(v["shape"]), np.dtype(v["dtype"]))
          for component in manifest["components"].values() for k, v in component.items()}
  config = get_config("full")
  got = checkpoint.state_shapes(config)
  assert len(got) == manifest["total_keys"] == 6109
  assert sorted(set(got) ^ set(want)) == []
  assert {k: v for k, v in got.items() if v != want[k]} == {}
  lazy = checkpoint.state_shapes(config, ["clap"], lazy_buffers=True)
  extra = {k: lazy[k] for k in set(lazy) - set(got)}
  assert set(extra) == set(manifest["lazily_created_keys_not_listed"])
  stft = "clap.model.audio_branch.spectrogram_extractor.stft."
  assert extra[stft + "conv_real.weight"] == extra[stft + "conv_imag.weight"] == (
      (513, 1, 1024), np.float32)
  assert extra["clap.model.audio_branch.logmel_extractor.melW"] == ((513, 64), np.float32)


def test_state_shapes_list_what_export_writes(tmp_path):
  config = get_config("tiny")
  params = checkpoint.random_params(config.model, 0)
  checkpoint.save_model(tmp_path / "ckpt", params, config)
  count = checkpoint.export_file(tmp_path / "ckpt", tmp_path / "all.safetensors",
                                 lazy_buffers=True)
  back = safetensors.numpy.load_file(str(tmp_path / "all.safetensors"))
  assert count == len(back)
  assert {k: (v.shape, v.dtype) for k, v in back.items()} == checkpoint.state_shapes(
      config, lazy_buffers=True)
  assert back["clip.model.logit_scale"].shape == ()  # 0-d stays 0-d
  assert back["clap.model.audio_branch.bn0.num_batches_tracked"].dtype == np.int64


def test_pth_round_trip_through_the_commands(reference, tmp_path):
  """An original state dict (.pth, float32 and int64 tensors, 0-d ones, a tied copy) -> convert
  -> export --lazy_buffers -> the same tensors back, plus the ones the fixtures leave out."""
  torch = pytest.importorskip("torch")
  config, fx = reference
  original = {}
  for name in ("optimus", "clip", "clap"):
    original.update(_original(fx[name]))
  original["optimus.decoder.lm_head.weight"] = original["optimus.decoder.transformer.wte.weight"]
  path = tmp_path / "CoDi_encoders.pth"
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in original.items()}, path)
  absent = ("model.diffusion_model.", "autokl.", "audioldm.")
  result = checkpoint.convert_files([path], config, tmp_path / "ckpt", allow_missing=absent)
  assert result.parts == ["optimus", "clip", "clap"]
  assert sum(r.buffers for r in result.reports.values()) == 2 + 2 + 6 + 1  # + lm_head
  env = dict(os.environ, CODI_JAX_CACHE="off")
  out = subprocess.run([sys.executable, "-m", "codi_jax.cli", "export", "--ckpt",
                        str(tmp_path / "ckpt"), "--lazy_buffers", "--out",
                        str(tmp_path / "enc.safetensors")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr
  back = safetensors.numpy.load_file(str(tmp_path / "enc.safetensors"))
  assert set(back) == set(original) | set(_omitted("clap", fx["clap"]))
  for key, want in original.items():
    assert (back[key].dtype, back[key].shape) == (want.dtype, want.shape), key
    np.testing.assert_allclose(back[key], want, rtol=0, atol=BUFFER_TOL, err_msg=key)
