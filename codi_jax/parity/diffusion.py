"""Parity handlers for the diffusion core: `unet_codi*.npz` and `ddim_sampler.npz`.

Each handler builds our model from the fixture's own config, loads the fixture's weights through
the key map (any missing/unexpected key is an error), runs every case and returns every output
it computes under the fixture's output names.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.conditioning import mix_conditions
from codi_jax.convert import keymap
from codi_jax.convert.layout import to_channels_first, to_channels_last
from codi_jax.convert.original import codi_config_from_original
from codi_jax.diffusion.ddim import DDIMSampler
from codi_jax.diffusion.schedule import ScheduleConfig, ddim_parameters, ddpm_schedule
from codi_jax.modality import Alignment, Modality
from codi_jax.models.codi import CoDiConfig, CoDiUNet, param_shapes
from codi_jax.parity.fixtures import Fixture, load_fixture

# Tolerances: tol = atol + rtol * max|reference| (fixture README: fp32 UNet ~1e-4; guided DDIM
# trajectories ~1e-3; the schedule arrays are float32 copies of float64 values).
UNET_TOL = (1e-4, 1e-4)
DDIM_TOL = (1e-3, 1e-4)
SCHEDULE_TOL = (1e-7, 1e-6)

Produced = dict[str, tuple[np.ndarray, tuple[float, float]]]


def _load_unet(fx: Fixture, weights: dict[str, np.ndarray]) -> tuple[CoDiUNet, dict]:
  config: CoDiConfig = codi_config_from_original(fx.config["unet_config"],
                                                 alignment=Alignment.SELF)
  params, report = keymap.torch_to_flax(weights, param_shapes(config))
  report.check()
  return CoDiUNet(config), jax.tree_util.tree_map(jnp.asarray, params)


def unet_outputs(fx: Fixture) -> Produced:
  """Every `output/<case>/<xtype>` (eps) and `output/<case>/h_con_<xtype>` of a UNet fixture."""
  model, params = _load_unet(fx, fx.weights)
  apply = jax.jit(model.apply)
  codes_fn = jax.jit(lambda p, x, t: model.apply(p, x, t, method=CoDiUNet.environment_codes))
  t = jnp.asarray(fx.inputs["timesteps"])
  produced: Produced = {}
  for case, spec in fx.config["cases"].items():
    x = {Modality.parse(m): jnp.asarray(to_channels_last(m, fx.inputs[name]))
         for m, name in zip(spec["xtype"], spec["x_inputs"])}
    conds = {c: jnp.asarray(fx.inputs[name])
             for c, name in zip(spec["condition_types"], spec["condition"])}
    context = mix_conditions(conds, spec.get("mix_weight"))
    out = apply({"params": params}, x, t, context)
    for m, y in out.items():
      produced[f"{case}/{m.value}"] = (to_channels_first(m, np.asarray(y)), UNET_TOL)
    if len(x) > 1:
      for m, code in codes_fn({"params": params}, x, t).items():
        produced[f"{case}/h_con_{m.value}"] = (np.asarray(code)[:, None, :], UNET_TOL)
  return produced


def _sibling_unet_weights(fx: Fixture) -> dict[str, np.ndarray]:
  if fx.weights:
    return fx.weights
  sibling = pathlib.Path(fx.path).with_name("unet_codi.npz")
  if not sibling.exists():
    raise FileNotFoundError(f"{fx.name} stores no weights and {sibling} (its UNet weights) is "
                            "missing")
  return load_fixture(sibling).weights


def ddim_outputs(fx: Fixture) -> Produced:
  """Schedule buffers, DDIM parameter arrays and every sampled trajectory of `ddim_sampler.npz`."""
  cfg = fx.config
  if cfg.get("beta_schedule", "linear") != "linear" or cfg.get("ddim_discretize",
                                                               "uniform") != "uniform":
    raise ValueError("only the original's 'linear' betas and 'uniform' DDIM steps are supported")
  schedule_cfg = ScheduleConfig(cfg["timesteps"], cfg["beta_linear_start"], cfg["beta_linear_end"])
  schedule = ddpm_schedule(schedule_cfg)
  produced: Produced = {}
  for key in fx.outputs:
    group, _, name = key.partition("/")
    if group == "schedule":
      produced[key] = (np.asarray(getattr(schedule, name)), SCHEDULE_TOL)
    elif group.startswith("ddim") and group[4:].isdigit():
      params = ddim_parameters(int(group[4:]), cfg["eta"], schedule)
      produced[key] = (np.asarray(getattr(params, name)), SCHEDULE_TOL)

  model, params = _load_unet(fx, _sibling_unet_weights(fx))
  model_fn = lambda p, x, t, c: model.apply({"params": p}, x, t, c)
  scale = float(cfg["unconditional_guidance_scale"])
  sampler = DDIMSampler(model_fn, cfg["ddim_steps"], cfg["eta"], schedule=schedule_cfg,
                        guided=scale != 1.0)
  both = fx.inputs["condition_0"]  # cat([uncond, cond])
  half = both.shape[0] // 2
  weights = cfg.get("mix_weight")
  for case, spec in cfg["cases"].items():
    types = spec["condition_types"]
    if len(types) != 1:
      raise ValueError(f"{case}: expected one condition (condition_0), got {types}")
    uncond = mix_conditions({types[0]: jnp.asarray(both[:half])}, weights)
    cond = mix_conditions({types[0]: jnp.asarray(both[half:])}, weights)
    x_T = {Modality.parse(m): jnp.asarray(to_channels_last(m, fx.inputs[f"{case}/x_T_{m}"]))
           for m in spec["xtype"]}
    # Teacher-forced: step i starts from the reference's x_t of step i-1 (x_T for step 0), so
    # every step is checked at single-step precision. A free-running float32 trajectory can be
    # chaotic (the original in float64 drifts O(1) from its own float32 text trajectory on the
    # dev set), which would measure rounding, not fidelity.
    ref_x_t = {m: to_channels_last(m, fx.outputs[f"{case}/x_t_{m.value}"]) for m in x_T}
    x_t, pred_x0 = {m: [] for m in x_T}, {m: [] for m in x_T}
    for i in range(sampler.parameters.num_steps):
      x_in = x_T if i == 0 else {m: jnp.asarray(ref_x_t[m][i - 1]) for m in x_T}
      x_prev, x0 = sampler.single_step(params, x_in, i, cond, uncond, scale)
      for m in x_T:
        x_t[m].append(np.asarray(x_prev[m]))
        pred_x0[m].append(np.asarray(x0[m]))
    for m in x_T:
      produced[f"{case}/final_{m.value}"] = (to_channels_first(m, x_t[m][-1]), DDIM_TOL)
      produced[f"{case}/x_t_{m.value}"] = (to_channels_first(m, np.stack(x_t[m])), DDIM_TOL)
      produced[f"{case}/pred_x0_{m.value}"] = (to_channels_first(m, np.stack(pred_x0[m])),
                                               DDIM_TOL)
  return produced
