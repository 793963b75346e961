"""Diffusion: schedule, DDIM sampler, training loss. Each takes a model function, not a network:

  model_fn(params, {modality: x_t}, timesteps [B], context [B, T, D]) -> {modality: eps}
"""

from typing import Any, Callable, Mapping

import jax

from codi_jax.modality import Modality

Latents = Mapping[Modality, jax.Array]
ModelFn = Callable[[Any, Latents, jax.Array, jax.Array], Mapping[Modality, jax.Array]]
