"""Condition sensitivity: a diffuser that predicts the noise from its condition scores 1, one that
ignores it 0; the stage check runs on a real (random) tiny checkpoint."""

import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import checkpoint
from codi_jax.diffusion.schedule import ScheduleConfig, ddpm_schedule
from codi_jax.evaluate import load_examples
from codi_jax.modality import Modality
from codi_jax.quality import checks, conditioning
from codi_jax.train import data as train_data
from configs.codi import get_config

SCHEDULE = ScheduleConfig()


def _oracle(x_t, t, context):
  """Knows x0 from the token (the token is x0 flattened): returns the exact noise."""
  s = ddpm_schedule(SCHEDULE)
  a = jnp.asarray(s.sqrt_alphas_cumprod)[t].reshape(-1, 1, 1, 1)
  b = jnp.asarray(s.sqrt_one_minus_alphas_cumprod)[t].reshape(-1, 1, 1, 1)
  return (x_t - a * context[:, 0].reshape(x_t.shape)) / b


def _blind(x_t, t, context):
  return 0.5 * x_t


def test_gain_is_one_for_a_diffuser_that_reads_its_condition_and_zero_for_one_that_does_not():
  x0 = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4, 4, 2)), jnp.float32)
  tokens = x0.reshape(6, -1)
  oracle = conditioning.squared_errors(_oracle, x0, tokens, (100, 500), SCHEDULE)
  assert oracle.shape == (2, 2, 6)
  np.testing.assert_allclose(conditioning.gains(oracle), [1.0, 1.0], atol=1e-4)
  assert np.all(np.asarray(oracle[:, 1]) > 0.1)  # another row's x0 predicts the wrong noise
  blind = conditioning.squared_errors(_blind, x0, tokens, (100, 500), SCHEDULE)
  np.testing.assert_array_equal(conditioning.gains(blind), [0.0, 0.0])
  with pytest.raises(ValueError, match="at least 2"):
    conditioning.squared_errors(_blind, x0[:1], tokens[:1], (100,), SCHEDULE)


@pytest.fixture(scope="module")
def ctx():
  config = get_config("tiny")
  return checks.Context(config, {"diffusers": {}}, train_data.load_tokenizers(""),
                        test=load_examples(config, "test", 20), train=[])


def test_stage_check_passes_an_oracle_diffuser_and_fails_a_blind_one(ctx, monkeypatch):
  # Stand-in encoders: the latent is the image itself, the token that image flattened.
  monkeypatch.setattr(conditioning.objectives, "latent",
                      lambda models, params, batch, m: batch["image"])
  monkeypatch.setattr(conditioning.objectives, "condition_token",
                      lambda models, params, batch, m: batch["image"].reshape(
                          batch["image"].shape[0], -1))
  monkeypatch.setattr(conditioning, "epsilon_fn", lambda models, params, out: _oracle)
  oracle = conditioning.checks(ctx, "diffuse_image")
  assert list(oracle) == ["condition/image/t100", "condition/image/t250", "condition/image/t500"]
  assert all(c.value > 0.999 and c.met for c in oracle.values()), checks.format_table(oracle)
  monkeypatch.setattr(conditioning, "epsilon_fn", lambda models, params, out: _blind)
  assert all(c.value == 0.0 and not c.met
             for c in conditioning.checks(ctx, "diffuse_image").values())


def test_diffusion_stages_have_checks_that_run_on_a_checkpoint(tmp_path):
  config = get_config("tiny")
  params = checkpoint.random_model_params(config, 0)
  stage_parts = {"diffusers", "optimus", "clip"}  # diffuse_text: text from image
  checkpoint.save_model(tmp_path / "model", {p: params[p] for p in stage_parts}, config)
  # The autoencoders' checks run on any of their parts, the others' need all of theirs.
  assert checks.applicable_stages(sorted(stage_parts)) == ["autoencoders", "diffuse_text"]
  assert checks.applicable_stages(["autokl", "clip"]) == ["autoencoders"]
  assert set(checks.applicable_stages(list(params))) == set(checks.STAGE_CHECKS)
  result = checks.check_model(str(tmp_path / "model"), ["diffuse_text"], num_examples=16,
                              tokenizers=train_data.load_tokenizers(""))
  assert list(result) == [f"condition/{Modality.TEXT.value}/t{t}" for t in conditioning.TIMESTEPS]
  # A random diffuser's prediction barely depends on its condition.
  assert all(np.isfinite(c.value) and abs(c.value) < 0.2 for c in result.values())
