"""Latent alignment checks: do the environment codes tell paired examples apart, and do the
connectors use the other output?

Joint generation couples its outputs only through the environment codes: each output's noisy
latent is encoded, mean-pooled and L2-normalised, and (alignment `others`) the other output's
connectors attend to that code. Two measurements on held-out examples, per pair the stage
trains (`config.train.latent_align_pairs`), at fixed timesteps t:

  environment/<a>-<b>/t<t>  the code of a's noisy latent retrieves the code of its own b among
                            the 64 of its group (top-1; chance 1/64). Codes that every example
                            shares score chance, whatever the loss did.
  partner/<out>+<other>/t<t>  with the null caption (the unconditional joint task, where only the
                            partner can say what to generate), `out`'s noise prediction beside
                            its own partner against beside another example's:
                            1 - MSE(own partner) / MSE(other partner), as the diffusers'
                            condition check (`codi_jax.quality.conditioning`). 0 for connectors
                            that ignore the partner.

The noise is a fixed function of the row, so two runs on one checkpoint agree.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.diffusion.losses import add_noise
from codi_jax.diffusion.schedule import ScheduleConfig
from codi_jax.modality import Modality
from codi_jax.models.codi import CoDiUNet
from codi_jax.quality.conditioning import GAIN_BAR, NOISE_SEED, TIMESTEPS, gains, row_noise
from codi_jax.train import data as train_data
from codi_jax.train import objectives
from codi_jax.train import stages

PyTree = Any


# (x_t {modality: [B, ...]}, t [B]) -> {modality: environment code [B, D]} / predicted noise.
JointFn = Callable[[Mapping[Modality, jax.Array], jax.Array], Mapping[Modality, jax.Array]]


def measure_pair(codes_fn: JointFn, eps_fn: JointFn, x0: Mapping[Modality, jax.Array],
                 schedule: ScheduleConfig) -> dict[str, jax.Array]:
  """Per row of a pair's clean latents x0 {a: [B, ...], b: [B, ...]} (B >= 2), at each of
  `TIMESTEPS`: `code_<m>` [B, T, D], each output's environment code; `mse_<m>` [B, T, 2], its
  noise MSE beside its own partner and beside the previous row's. Rows first, so
  `checks.batched` splits them per example."""
  pair = tuple(x0)
  if len(pair) != 2 or next(iter(x0.values())).shape[0] < 2:
    raise ValueError(f"measure_pair needs two outputs of at least 2 rows, got "
                     f"{ {m.value: x.shape for m, x in x0.items()} }")
  batch = next(iter(x0.values())).shape[0]
  noise = {m: row_noise(x, NOISE_SEED + 1 + i) for i, (m, x) in enumerate(x0.items())}
  out = {f"{kind}_{m.value}": [] for kind in ("code", "mse") for m in pair}
  for step in TIMESTEPS:
    t = jnp.full((batch,), step, jnp.int32)
    x_t = {m: add_noise(x.astype(jnp.float32), noise[m], t, schedule) for m, x in x0.items()}
    for m, code in codes_fn(x_t, t).items():
      out[f"code_{m.value}"].append(code)
    for m in pair:
      other = pair[1] if m is pair[0] else pair[0]
      errors = []
      for partner in (x_t[other], jnp.roll(x_t[other], 1, axis=0)):
        eps = eps_fn({m: x_t[m], other: partner}, t)[m].astype(jnp.float32)
        errors.append(jnp.mean(jnp.square(eps - noise[m]).reshape(batch, -1), axis=-1))
      out[f"mse_{m.value}"].append(jnp.stack(errors, axis=-1))  # [B, 2]
  return {k: jnp.stack(v, axis=1) for k, v in out.items()}


def score(pair: tuple[Modality, Modality], rows: Sequence[Mapping[str, np.ndarray]]
          ) -> dict[str, Any]:
  """The checks of one pair from `measure_pair`'s rows (one per held-out example, >= 64)."""
  from codi_jax.quality.checks import RETRIEVAL_BAR, Check, retrieval  # pylint: disable=import-outside-toplevel
  stack = lambda key: np.stack([r[key] for r in rows])  # [N, T, ...]
  a, b = pair
  codes_a, codes_b = stack(f"code_{a.value}"), stack(f"code_{b.value}")
  result = {f"environment/{a.value}-{b.value}/t{step}": Check(
      retrieval(codes_a[:, i], codes_b[:, i]), RETRIEVAL_BAR) for i, step in enumerate(TIMESTEPS)}
  for m, other in ((a, b), (b, a)):
    errors = np.transpose(stack(f"mse_{m.value}"), (1, 2, 0))  # [T, 2, N]
    for step, gain in zip(TIMESTEPS, gains(errors)):
      result[f"partner/{m.value}+{other.value}/t{step}"] = Check(float(gain), GAIN_BAR)
  return result


def checks(ctx) -> dict[str, Any]:
  """The checks `environment/<a>-<b>/t<t>` and `partner/<out>+<other>/t<t>` of the latent
  alignment stage, for every pair it trains, on a `codi_jax.quality.checks.Context` holding
  its parts."""
  from codi_jax.quality.checks import batched  # pylint: disable=import-outside-toplevel
  schedule = ScheduleConfig(**ctx.config.diffusion)
  models = ctx.models
  nulls = train_data.null_inputs(ctx.config, ctx.tokenizers)
  result = {}
  for name in stages.latent_align_pairs(ctx.config):
    pair = stages.PAIRS[name]

    def fn(params, batch, pair=pair):
      apply = lambda *args, **kw: models.diffusers.apply({"params": params["diffusers"]},
                                                         *args, **kw)
      x0 = {m: objectives.latent(models, params, batch, m) for m in pair}
      null = objectives.null_token(models, params, dict(batch, **nulls), Modality.TEXT)
      context = jnp.broadcast_to(null, (batch["index"].shape[0], 1, null.shape[-1]))
      return measure_pair(lambda x, t: apply(x, t, method=CoDiUNet.environment_codes),
                          lambda x, t: apply(x, t, context), x0, schedule)

    result.update(score(pair, batched(fn, ctx, ctx.test)))
  return result
