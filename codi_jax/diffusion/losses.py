"""The epsilon-prediction training loss, single or joint (CODI_REFERENCE §4).

t ~ U{0, ..., T-1}, shared by every modality of a sample; x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps;
per-modality MSE averaged over all non-batch axes and the batch; the joint loss is the mean over
modalities. Non-finite losses are zeroed as in the original (`nan_to_num`).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from codi_jax.diffusion import ModelFn
from codi_jax.diffusion.schedule import ScheduleConfig, ddpm_schedule
from codi_jax.modality import Modality


def add_noise(x0: jax.Array, noise: jax.Array, t: jax.Array,
              schedule: ScheduleConfig = ScheduleConfig()) -> jax.Array:
  """q(x_t | x_0) for integer timesteps t [B]."""
  s = ddpm_schedule(schedule)
  shape = (-1,) + (1,) * (x0.ndim - 1)
  a = jnp.asarray(s.sqrt_alphas_cumprod)[t].reshape(shape)
  b = jnp.asarray(s.sqrt_one_minus_alphas_cumprod)[t].reshape(shape)
  return a * x0 + b * noise


def epsilon_loss(model_fn: ModelFn, params: Any, x0: Mapping[Modality, jax.Array],
                 context: jax.Array, keys: jax.Array,
                 schedule: ScheduleConfig = ScheduleConfig()
                 ) -> tuple[jax.Array, dict[Modality, jax.Array]]:
  """Returns (joint loss, {modality: its MSE}) for clean latents x0 [B, ...].

  keys: one PRNG key per example [B]; row b's timestep and noise come from keys[b] alone, so an
  example's loss term does not depend on the batch it is in or its row.
  """
  if not x0:
    raise ValueError("epsilon_loss needs at least one modality")
  batch = next(iter(x0.values())).shape[0]
  if keys.shape != (batch,):
    raise ValueError(f"epsilon_loss needs one key per example, got keys {keys.shape} for a batch "
                     f"of {batch}")
  fold = lambda i: jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
  t = jax.vmap(lambda k: jax.random.randint(k, (), 0, schedule.num_timesteps))(fold(0))
  noise = {m: jax.vmap(lambda k, s=x.shape[1:]: jax.random.normal(k, s, jnp.float32))(fold(1 + i))
           for i, (m, x) in enumerate(sorted(x0.items()))}
  x_t = {m: add_noise(x.astype(jnp.float32), noise[m], t, schedule) for m, x in x0.items()}
  eps = model_fn(params, x_t, t, context)
  per_modality = {m: jnp.mean(jnp.square(eps[m].astype(jnp.float32) - noise[m])) for m in x0}
  loss = jnp.mean(jnp.stack(list(per_modality.values())))
  return jnp.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0), per_modality
