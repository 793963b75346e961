"""Condition sensitivity: does a diffuser's noise prediction use its condition?

A diffuser that ignores its condition tokens still brings its denoising loss down (it learns the
data's average), so the loss alone cannot tell. On held-out examples, at fixed timesteps, the
same noised latent x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps is denoised twice: with the example's
own condition token, and with another example's (the batch rolled by one row). The check is the
relative gain

  gain(t) = 1 - MSE(eps, eps_theta(x_t, t, own token)) / MSE(eps, eps_theta(x_t, t, other token))

with MSEs averaged over the examples: 0 for a diffuser that ignores the condition, 1 for one
that predicts the noise exactly from it. Bar: 0.2 at every t <= 500 (the issue's bar: correct
condition at least 20% below shuffled). The noise is a fixed function of the row, so two runs on
one checkpoint agree.

`gains` is the measurement on any epsilon function (a stand-in scores 1 or 0 in the tests);
`checks` the stage check `condition/<output>/t<t>` of a diffusion stage
(`codi_jax.train.stages.DIFFUSION_STAGES`: image, video and audio from text, text from image).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.diffusion.losses import add_noise
from codi_jax.diffusion.schedule import ScheduleConfig
from codi_jax.train import objectives
from codi_jax.train.stages import DIFFUSION_STAGES

PyTree = Any
# (x_t [B, ...], t [B], context [B, 1, D]) -> predicted noise [B, ...].
EpsilonFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

TIMESTEPS = (100, 250, 500)
GAIN_BAR = 0.2
NOISE_SEED = 0


def row_noise(x0: jax.Array, seed: int = NOISE_SEED) -> jax.Array:
  """Standard normal noise shaped like x0 [B, ...], row b's a fixed function of (seed, b)."""
  keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.PRNGKey(seed), r))(
      jnp.arange(x0.shape[0]))
  return jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))(keys)


def squared_errors(eps_fn: EpsilonFn, x0: jax.Array, tokens: jax.Array, timesteps: Sequence[int],
                   schedule: ScheduleConfig) -> jax.Array:
  """Per timestep and row, the MSE of the predicted noise with the row's own token and with the
  next row's: [len(timesteps), 2 (own, other), B]. x0 [B, ...]; tokens [B, D]; B >= 2."""
  if x0.shape[0] < 2 or tokens.shape[0] != x0.shape[0]:
    raise ValueError(f"squared_errors: need as many tokens as latents, at least 2; got latents "
                     f"{x0.shape} and tokens {tokens.shape}")
  noise = row_noise(x0)
  contexts = (tokens[:, None], jnp.roll(tokens, 1, axis=0)[:, None])
  out = []
  for step in timesteps:
    t = jnp.full((x0.shape[0],), step, jnp.int32)
    x_t = add_noise(x0.astype(jnp.float32), noise, t, schedule)
    per_context = []
    for context in contexts:
      err = jnp.square(eps_fn(x_t, t, context).astype(jnp.float32) - noise)
      per_context.append(jnp.mean(err.reshape(err.shape[0], -1), axis=-1))
    out.append(jnp.stack(per_context))
  return jnp.stack(out)


def gains(errors: np.ndarray) -> np.ndarray:
  """[len(timesteps), 2, N] squared errors (`squared_errors`, rows of every batch) -> gain per
  timestep: 1 - mean own-token MSE / mean other-token MSE."""
  errors = np.asarray(errors, np.float64)
  own, other = errors[:, 0].mean(-1), errors[:, 1].mean(-1)
  return 1.0 - own / np.maximum(other, 1e-12)


def epsilon_fn(models: objectives.Models, params: Mapping[str, PyTree], out) -> EpsilonFn:
  """The joint diffuser's noise prediction for output modality `out` alone."""
  return lambda x_t, t, context: models.diffusers.apply(
      {"params": params["diffusers"]}, {out: x_t}, t, context)[out]


def checks(ctx, stage: str) -> dict[str, Any]:
  """The checks `condition/<output>/t<t>` of diffusion stage `stage` on a
  `codi_jax.quality.checks.Context` holding the diffusers, the output's encoder and the
  condition's prompt encoder."""
  from codi_jax.quality.checks import Check, batched  # pylint: disable=import-outside-toplevel
  out, condition, _ = DIFFUSION_STAGES[stage]
  schedule = ScheduleConfig(**ctx.config.diffusion)
  models = ctx.models

  def fn(params: Mapping[str, PyTree], batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    x0 = objectives.latent(models, params, batch, out)
    tokens = objectives.condition_token(models, params, batch, condition)
    errors = squared_errors(epsilon_fn(models, params, out), x0, tokens, TIMESTEPS, schedule)
    return {"errors": errors.transpose(2, 0, 1)}  # [B, T, 2]: `batched` splits rows

  rows = batched(fn, ctx, ctx.test)
  errors = np.stack([r["errors"] for r in rows], axis=-1)  # [T, 2, N]
  return {f"condition/{out.value}/t{step}": Check(float(g), GAIN_BAR)
          for step, g in zip(TIMESTEPS, gains(errors))}

