"""Jitted joint DDIM sampler with classifier-free guidance (CODI_REFERENCE §3-4).

All requested outputs advance together: one network call per step on the doubled
[unconditional; conditional] batch, `eps = e_u + s (e_c - e_u)` per modality, then the DDIM update
  pred_x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t)
  x_prev  = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z.
The step loop is a `lax.scan` (no Python loop at trace time); a sampler compiles once per
(output set, shapes, steps, eta, guidance on/off) and is reused across calls.

Per-row randomness: `rng` may be one key for the whole batch, or one key per row ([B] keys). With
row keys a row's eta noise depends only on its own key, and `guidance_scale` may also be per row
([B]), so a row's result does not depend on which other rows share its batch (sharded sampling
jobs batch unrelated requests together).

The model is any `model_fn(params, {modality: x_t}, timesteps [B], context [B, T, D])`
-> {modality: eps}; the sampler knows no network class.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.diffusion import Latents, ModelFn
from codi_jax.diffusion.schedule import (DDIMParameters, ScheduleConfig, ddim_parameters,
                                        ddpm_schedule)
from codi_jax.modality import Modality


@flax.struct.dataclass
class SampleOutput:
  """Final samples and, when asked for, every step's x_t and pred_x0 ([n_steps, ...] each)."""

  samples: dict[Modality, jax.Array]
  x_t: dict[Modality, jax.Array] | None = None
  pred_x0: dict[Modality, jax.Array] | None = None


def initial_noise(rng: jax.Array, shapes: Mapping[Modality, tuple[int, ...]]
                  ) -> dict[Modality, jax.Array]:
  """x_T ~ N(0, I) per modality, each from its own stream of `rng`."""
  return {m: jax.random.normal(jax.random.fold_in(rng, i), shape, jnp.float32)
          for i, (m, shape) in enumerate(sorted(shapes.items()))}


def _step_noise(rng: jax.Array, step: jax.Array, stream: int, shape: tuple[int, ...]
                ) -> jax.Array:
  """z ~ N(0, I) of `shape` for one step and output stream: from one key, or row by row from [B]
  keys (each row [...] drawn from its own key alone)."""
  draw = lambda key, s: jax.random.normal(
      jax.random.fold_in(jax.random.fold_in(key, step), stream), s, jnp.float32)
  if rng.ndim == 0:
    return draw(rng, shape)
  return jax.vmap(lambda key: draw(key, shape[1:]))(rng)  # [B, ...]


class DDIMSampler:
  """`sampler(params, x_T, cond, uncond, guidance_scale, rng)` -> SampleOutput.

  guidance_scale: a scalar or one per row [B]; rng: one key, or one key per row [B] (see the
  module docstring).

  Args of the constructor:
    model_fn: the denoiser (see module docstring).
    num_steps: S; the original visits `len(range(0, T, T // S))` timesteps.
    eta: DDIM stochasticity (0 = deterministic, the original's default).
    schedule: the DDPM schedule configuration.
    guided: whether to run classifier-free guidance (False: a single conditional pass).
    return_intermediates: keep every step's x_t and pred_x0.
  """

  def __init__(self, model_fn: ModelFn, num_steps: int = 50, eta: float = 0.0, *,
               schedule: ScheduleConfig = ScheduleConfig(), guided: bool = True,
               return_intermediates: bool = False):
    self.model_fn = model_fn
    self.parameters: DDIMParameters = ddim_parameters(num_steps, eta, ddpm_schedule(schedule))
    self.eta = float(eta)
    self.guided = guided
    self.return_intermediates = return_intermediates
    self.trace_count = 0  # incremented at trace time only; lets tests prove there is no retrace
    self._jitted = jax.jit(self._sample)
    self._jitted_step = jax.jit(self._step)

  def __call__(self, params: Any, x_T: Latents, cond: jax.Array, uncond: jax.Array | None = None,
               guidance_scale: float | jax.Array = 7.5, rng: jax.Array | None = None
               ) -> SampleOutput:
    return self._jitted(params, *self._inputs(x_T, cond, uncond, guidance_scale, rng))

  def _inputs(self, x, cond, uncond, guidance_scale, rng):
    """Validated, normalised (x, cond, uncond, scale, rng) for the jitted functions."""
    if not x:
      raise ValueError("at least one output modality is required")
    if self.guided:
      if uncond is None:
        raise ValueError("guided sampling needs an unconditional context")
      if uncond.shape != cond.shape:
        raise ValueError(f"uncond {uncond.shape} and cond {cond.shape} contexts differ in shape")
    if self.eta > 0 and rng is None:
      raise ValueError("eta > 0 needs an rng for the per-step noise")
    x = {Modality.parse(k): v for k, v in x.items()}
    batch = next(iter(x.values())).shape[0]
    scale = jnp.asarray(guidance_scale, jnp.float32)
    if scale.shape not in ((), (batch,)):
      raise ValueError(f"guidance_scale must be a scalar or one per row [{batch}], got shape "
                       f"{scale.shape}")
    if rng is not None and not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.wrap_key_data(rng)  # a raw uint32 key (or [B] of them)
    if rng is not None and rng.shape not in ((), (batch,)):
      raise ValueError(f"rng must be one key or one key per row [{batch}], got shape {rng.shape}")
    return (x, cond, cond if uncond is None else uncond, scale,
            jax.random.key(0) if rng is None else rng)

  def _eps(self, params, x, t, cond, uncond, scale):
    batch = t.shape[0]
    if not self.guided:
      return self.model_fn(params, x, t, cond)
    doubled = {m: jnp.concatenate([v, v]) for m, v in x.items()}
    out = self.model_fn(params, doubled, jnp.concatenate([t, t]), jnp.concatenate([uncond, cond]))
    rows = lambda v: jnp.reshape(scale, scale.shape + (1,) * (v.ndim - scale.ndim))  # [B, 1, ...]
    return {m: out[m][:batch] + rows(out[m]) * (out[m][batch:] - out[m][:batch]) for m in x}

  def _per_step(self) -> dict[str, jax.Array]:
    """Per-step constants in visiting order (highest timestep first)."""
    p = self.parameters
    order = np.arange(p.num_steps)[::-1]
    return dict(
        step=jnp.arange(p.num_steps),
        t=jnp.asarray(p.timesteps[order], jnp.int32),
        a_t=jnp.asarray(p.alphas[order], jnp.float32),
        a_prev=jnp.asarray(p.alphas_prev[order], jnp.float32),
        sigma=jnp.asarray(p.sigmas[order], jnp.float32),
        sqrt_one_minus=jnp.asarray(p.sqrt_one_minus_alphas[order], jnp.float32),
    )

  def _step(self, params, x, s, cond, uncond, scale, rng):
    """One DDIM update at the step described by `s`; returns (x_prev, pred_x0)."""
    batch = next(iter(x.values())).shape[0]
    t = jnp.full((batch,), s["t"], jnp.int32)
    eps = self._eps(params, x, t, cond, uncond, scale)
    x_prev, pred_x0 = {}, {}
    for i, m in enumerate(sorted(x)):
      e = eps[m].astype(jnp.float32)
      pred_x0[m] = (x[m] - s["sqrt_one_minus"] * e) / jnp.sqrt(s["a_t"])
      direction = jnp.sqrt(1.0 - s["a_prev"] - s["sigma"] ** 2) * e
      x_prev[m] = jnp.sqrt(s["a_prev"]) * pred_x0[m] + direction
      if self.eta > 0:
        x_prev[m] = x_prev[m] + s["sigma"] * _step_noise(rng, s["step"], i, x[m].shape)
    return x_prev, pred_x0

  def _sample(self, params, x_T, cond, uncond, scale, rng) -> SampleOutput:
    self.trace_count += 1

    def body(x, s):
      x_prev, pred_x0 = self._step(params, x, s, cond, uncond, scale, rng)
      return x_prev, ((x_prev, pred_x0) if self.return_intermediates else None)

    x0 = {m: v.astype(jnp.float32) for m, v in x_T.items()}
    final, trace = jax.lax.scan(body, x0, self._per_step())
    if trace is None:
      return SampleOutput(final)
    return SampleOutput(final, x_t=trace[0], pred_x0=trace[1])

  def single_step(self, params: Any, x: Latents, step: int, cond: jax.Array,
                  uncond: jax.Array | None = None, guidance_scale: float = 7.5,
                  rng: jax.Array | None = None) -> tuple[dict, dict]:
    """Step `step` (0 = first visited, highest timestep) from x: (x_prev, pred_x0)."""
    if not 0 <= step < self.parameters.num_steps:
      raise ValueError(f"step {step} out of range [0, {self.parameters.num_steps})")
    s = {k: v[step] for k, v in self._per_step().items()}
    x, cond, uncond, scale, rng = self._inputs(x, cond, uncond, guidance_scale, rng)
    return self._jitted_step(params, x, s, cond, uncond, scale, rng)
