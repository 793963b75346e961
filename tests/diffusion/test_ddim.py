"""DDIM sampler: CoDi's discretisation quirks, free-running trajectories, no retracing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.convert.layout import to_channels_first, to_channels_last
from codi_jax.diffusion.ddim import DDIMSampler, initial_noise
from codi_jax.diffusion.schedule import ddim_parameters, ddpm_schedule
from codi_jax.modality import Modality
from codi_jax.models.codi import CoDiUNet
from codi_jax.parity.fixtures import load_fixture


def test_timestep_quirks():
  p = ddim_parameters(6)
  assert p.num_steps == 7  # 1000 // 6 = 166 -> range(0, 1000, 166) has 7 entries
  np.testing.assert_array_equal(p.timesteps, [1, 167, 333, 499, 665, 831, 997])
  ac = ddpm_schedule().alphas_cumprod
  assert p.alphas_prev[0] == ac[0]  # not 1.0
  np.testing.assert_array_equal(ddim_parameters(50).timesteps, np.arange(0, 1000, 20) + 1)
  assert np.all(ddim_parameters(50, eta=0.0).sigmas == 0)
  assert np.all(ddim_parameters(50, eta=1.0).sigmas[1:] > 0)
  with pytest.raises(ValueError, match="DDIM steps"):
    ddim_parameters(0)
  with pytest.raises(ValueError, match="timestep 1000"):  # 1000 // 3 = 333 -> 999 + 1
    ddim_parameters(3)


@pytest.fixture(scope="module")
def ddim_fixture(fixtures_dir):
  return load_fixture(fixtures_dir / "ddim_sampler.npz")


@pytest.fixture(scope="module")
def sampler(tiny_model, ddim_fixture):
  config, params = tiny_model
  model = CoDiUNet(config)
  s = DDIMSampler(lambda p, x, t, c: model.apply({"params": p}, x, t, c),
                  ddim_fixture.config["ddim_steps"], 0.0, return_intermediates=True)
  return s, params


@pytest.mark.parametrize("case", ["sample_image", "sample_joint_video_audio"])
def test_free_running_trajectory_matches_original(sampler, ddim_fixture, case):
  # (The dev set's text trajectory is chaotic in float32; the parity tool checks it stepwise.)
  s, params = sampler
  fx = ddim_fixture
  both = fx.inputs["condition_0"]
  half = both.shape[0] // 2
  spec = fx.config["cases"][case]
  x_T = {Modality(m): jnp.asarray(to_channels_last(m, fx.inputs[f"{case}/x_T_{m}"]))
         for m in spec["xtype"]}
  out = s(params, x_T, jnp.asarray(both[half:]), jnp.asarray(both[:half]), 7.5)
  for m in x_T:
    for name, ours in (("final", out.samples[m]), ("x_t", out.x_t[m]),
                       ("pred_x0", out.pred_x0[m])):
      ref = fx.outputs[f"{case}/{name}_{m.value}"]
      np.testing.assert_allclose(to_channels_first(m, np.asarray(ours)), ref,
                                 atol=1e-3 + 1e-4 * np.abs(ref).max(), rtol=0)


def test_sampler_compiles_once(sampler):
  s, params = sampler
  before = s.trace_count
  shapes = {Modality.IMAGE: (2, 8, 8, 4), Modality.AUDIO: (2, 16, 4, 8)}
  cond = jnp.ones((2, 1, 32)) / np.sqrt(32)
  results = []
  for i, scale in enumerate([7.5, 3.0, 7.5]):
    x_T = initial_noise(jax.random.key(i), shapes)
    results.append(s(params, x_T, cond, -cond, scale).samples[Modality.IMAGE])
  assert s.trace_count == before + 1
  assert not np.allclose(results[0], results[1])  # the scale and noise really changed


def test_eta_noise_is_seeded(sampler, tiny_model):
  config, params = tiny_model
  model = CoDiUNet(config)
  s = DDIMSampler(lambda p, x, t, c: model.apply({"params": p}, x, t, c), 4, eta=1.0)
  x_T = initial_noise(jax.random.key(0), {Modality.TEXT: (2, 32)})
  cond = jnp.ones((2, 1, 32)) / np.sqrt(32)
  with pytest.raises(ValueError, match="needs an rng"):
    s(params, x_T, cond, cond)
  a = s(params, x_T, cond, cond, 2.0, jax.random.key(1)).samples[Modality.TEXT]
  b = s(params, x_T, cond, cond, 2.0, jax.random.key(1)).samples[Modality.TEXT]
  c = s(params, x_T, cond, cond, 2.0, jax.random.key(2)).samples[Modality.TEXT]
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_row_keys_and_scales_make_each_row_independent_of_its_batch(tiny_model):
  """Per-row eta keys and guidance scales: a row's sample is the same alone or in any batch."""
  config, params = tiny_model
  model = CoDiUNet(config)
  s = DDIMSampler(lambda p, x, t, c: model.apply({"params": p}, x, t, c), 4, eta=1.0)
  x_T = initial_noise(jax.random.key(0), {Modality.TEXT: (3, 32)})[Modality.TEXT]
  cond = jax.random.normal(jax.random.key(1), (3, 1, 32))
  keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(2), jnp.arange(3))  # [3]
  scales = jnp.asarray([1.0, 3.0, 7.5])
  run = lambda rows: s(params, {Modality.TEXT: x_T[rows]}, cond[rows], -cond[rows],
                       scales[rows], keys[rows]).samples[Modality.TEXT]
  together = run(np.arange(3))
  for i in range(3):
    np.testing.assert_allclose(run(np.asarray([i])), together[i:i + 1], atol=1e-5, rtol=0)
  order = np.asarray([2, 0, 1])
  np.testing.assert_allclose(run(order), together[order], atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="one per row"):
    s(params, {Modality.TEXT: x_T}, cond, -cond, jnp.ones(2), keys)
  with pytest.raises(ValueError, match="one key per row"):
    s(params, {Modality.TEXT: x_T}, cond, -cond, 7.5, keys[:2])


def test_guidance_needs_matching_uncond(sampler):
  s, params = sampler
  x_T = initial_noise(jax.random.key(0), {Modality.TEXT: (2, 32)})
  with pytest.raises(ValueError, match="unconditional"):
    s(params, x_T, jnp.ones((2, 1, 32)))
  with pytest.raises(ValueError, match="differ in shape"):
    s(params, x_T, jnp.ones((2, 1, 32)), jnp.ones((2, 2, 32)))
