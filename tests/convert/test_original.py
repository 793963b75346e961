"""A whole CoDi from the original's own configs (`convert.original.run_config_from_original`),
checked on the end-to-end fixture's tiny model (`tests/fixtures/codi_e2e`): the configs it builds,
conversion of its state dict (`checkpoint.convert_state`), and `codi-jax export --names torch` of
the converted checkpoint giving back that state dict: every stored key with its value, plus the
keys the fixture omits (tied copies and deterministic buffers), so the original's model class,
as the fixture README builds it, loads the file with `load_state_dict(strict=True)`."""

import json

import numpy as np
import pytest
import safetensors.numpy

from codi_jax import checkpoint
from codi_jax.convert.original import run_config_from_original
from codi_jax.parity.fixtures import load_fixture
from codi_jax.pipeline_options import ORIGINAL, PipelineOptions
from tests.conftest import REPO

E2E = REPO / "tests" / "fixtures" / "codi_e2e" / "codi_e2e.npz"
BUFFER_TOL = 1e-6


@pytest.fixture(scope="module")
def fixture():
  return load_fixture(E2E)


def _config(fx, **changes):
  cfg = json.loads(json.dumps(fx.config))
  p = cfg["params"]["clap"]
  sizes = dict(spec_size=p["spec"], embed_dim=p["embed_dim"], depths=p["depths"],
               num_heads=p["heads"], window_size=p["window"])
  for path, value in changes.items():
    *head, last = path.split(".")
    node = cfg
    for k in head:
      node = node[k]
    node[last] = value
  return run_config_from_original(cfg["codi_cfg"], clip=cfg["clip"],
                                  hifigan=cfg["hifigan_config"],
                                  clap_model_cfg=cfg["clap_model_cfg"], htsat_sizes=sizes)


def test_run_config_holds_the_originals_sizes_and_behaviour(fixture):
  config = _config(fixture)
  m = config.model
  assert (m.image.model_channels, m.image.video, m.image.connector_channels) == (64, True, 48)
  assert (m.text.in_channels, m.text.second_dim) == (768, [4, 4])
  assert (m.image_vae.ch, m.image_vae.ch_mult, m.audio_vae.z_channels) == (32, [1, 2, 2, 2], 8)
  assert (m.optimus.decoder.n_embd, m.optimus.latent_size, m.optimus.scale_factor) == (
      16, 768, 4.3108)
  assert (m.clip.projection_dim, m.clip.vision.image_size) == (32, 32)
  assert (m.clap.joint_embed_dim, m.clap.htsat.depths, m.clap.audio.hop_size) == (32, [2, 1], 4800)
  assert m.vocoder.upsample_initial_channel == 64 and m.alignment == "self"
  assert dict(config.diffusion) == dict(num_timesteps=1000, beta_start=0.00085, beta_end=0.012)
  assert PipelineOptions.from_config(config.sample) == ORIGINAL


@pytest.mark.parametrize("change, match", [
    ({"clip.processor_config.crop_size": 24}, "is not CoDi's"),
    ({"codi_cfg.args.clap_cfg": {}}, "CoDi config has no clap_cfg.args"),
    ({"codi_cfg.args.timesteps": None}, "int"),
])
def test_unsupported_original_configs_raise(fixture, change, match):
  with pytest.raises((ValueError, TypeError), match=match):
    _config(fixture, **change)


def test_converted_weights_are_what_parity_runs(fixture):
  # The parity handler converts through the same function `convert` uses.
  config = _config(fixture)
  result, params = checkpoint.convert_state(fixture.weights, config)
  assert result.ok and sorted(params) == sorted(checkpoint.PARTS)
  missing = dict(fixture.weights)
  del missing["model.diffusion_model.unet_text.out.2.bias"]
  with pytest.raises(checkpoint.ConversionError, match="diffusers: 1 missing"):
    checkpoint.convert_state(missing, config)


def test_export_loads_strictly_into_the_originals_model(fixture, tmp_path):
  config = _config(fixture)
  _, params = checkpoint.convert_state(fixture.weights, config)
  checkpoint.save_model(tmp_path / "ckpt", params, config)
  stored = fixture.weights
  omitted = set(fixture.config["omitted_keys"])
  # The fixture's model had run (its CLAP created torchlibrosa's constants): --lazy_buffers.
  for lazy in (True, False):
    out = tmp_path / f"codi_lazy{lazy}.safetensors"
    count = checkpoint.export_file(tmp_path / "ckpt", out, names="torch", lazy_buffers=lazy)
    exported = safetensors.numpy.load_file(out)
    lazy_keys = {k for k, b in checkpoint.original_buffers(config, "clap", lazy=True).items()
                 if b.lazy}
    want = set(stored) | omitted
    assert set(exported) == (want if lazy else want - lazy_keys) and count == len(exported)
  assert len(stored) == 1921 and len(lazy_keys) == 3
  made = {k for p in checkpoint.PARTS for k in checkpoint.original_buffers(config, p, lazy=True)}
  exported = safetensors.numpy.load_file(tmp_path / "codi_lazyTrue.safetensors")
  for key, want in stored.items():
    got = exported[key]
    assert (got.dtype, got.shape) == (want.dtype, want.shape), key
    if key in made and not np.issubdtype(want.dtype, np.integer):
      np.testing.assert_allclose(got, want, rtol=BUFFER_TOL, atol=BUFFER_TOL, err_msg=key)
    else:  # parameters (exact float16 values widened) and integer index tables
      np.testing.assert_array_equal(got, want, err_msg=key)
  wte = "optimus.decoder.transformer.wte.weight"
  np.testing.assert_array_equal(exported["optimus.decoder.lm_head.weight"], exported[wte])
  for key in omitted - {"optimus.decoder.lm_head.weight"}:
    assert key in made, key  # a deterministic buffer, regenerated
