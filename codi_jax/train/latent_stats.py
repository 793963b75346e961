"""Latent normalisation from the data: each latent part's shift and scale.

A diffuser learns best on a target of mean ~0 and std ~1. CoDi's released VAEs come with fixed
scale factors (0.18215, 0.9228, 4.3108), measured for those weights; a VAE or Optimus trained from
scratch has its own latent statistics. After the `autoencoders` stage, `measure` reads the trained
encoders' latents on a sample of training data (posterior modes for the VAEs, the Optimus mean for
text: what `objectives.latent` diffuses) and `calibrate` stores

  shift_factor = mean,  scale_factor = 1 / std     (so scale * (z - shift) has mean 0, std 1)

in the part's model config, which the stage's exported checkpoint carries. A later stage that loads
the part from `init_from` adopts the part's factors with its weights (`adopt`), so every stage, and
`generate` after them, diffuses in the same normalised space. A converted released model keeps
CoDi's constants (shift 0): nothing here runs for it.

One statistic per part (over every latent element), not per channel: the diffusers' noise is
isotropic and the released models use one scale too.
"""

from __future__ import annotations

import json
import pathlib
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from codi_jax import checkpoint
from codi_jax.modality import Modality
from codi_jax.train import objectives

# Latent part -> (its field in config.model, the modality it encodes for the statistics).
LATENT_PARTS: dict[str, tuple[str, Modality]] = {
    "autokl": ("image_vae", Modality.IMAGE),
    "audioldm_vae": ("audio_vae", Modality.AUDIO),
    "optimus": ("optimus", Modality.TEXT),
}
FIELDS = ("shift_factor", "scale_factor")


def _unscaled(models: objectives.Models, params: Mapping, batch: Mapping, part: str) -> jax.Array:
  """The part's latents before normalisation (its shift and scale undone)."""
  modality = LATENT_PARTS[part][1]
  z = objectives.latent(models, params, batch, modality)
  cfg = {"autokl": models.image_vae, "audioldm_vae": models.audio_vae,
         "optimus": models.optimus}[part].config
  return z / cfg.scale_factor + cfg.shift_factor


def _moments(z: jax.Array) -> jax.Array:
  """[count, mean, sum of squared deviations] of every element (reduced in the graph, so a
  batch sharded over devices and processes comes back as three replicated numbers)."""
  z = z.astype(jnp.float32)
  mean = jnp.mean(z)
  return jnp.stack([jnp.asarray(z.size, jnp.float32), mean, jnp.sum(jnp.square(z - mean))])


class _Moments:
  """Count, mean and M2 merged over batches in float64 (Chan et al.): the result does not
  depend on how the data is batched."""

  def __init__(self):
    self.n, self.mean, self.m2 = 0.0, 0.0, 0.0

  def add(self, moments) -> None:
    n, mean, m2 = (float(x) for x in np.asarray(moments, np.float64))
    total = self.n + n
    delta = mean - self.mean
    self.mean += delta * n / total
    self.m2 += m2 + delta * delta * self.n * n / total
    self.n = total

  @property
  def std(self) -> float:
    return float(np.sqrt(self.m2 / self.n)) if self.n else float("nan")


def _accumulate(fn, params: Mapping, batches: Iterable[Mapping], names) -> dict:
  acc = {k: _Moments() for k in names}
  for batch in batches:
    for k, moments in jax.device_get(fn(params, batch)).items():
      acc[k].add(moments)
  return acc


def measure(models: objectives.Models, params: Mapping, batches: Iterable[Mapping],
            parts: Iterable[str]) -> dict[str, dict[str, float]]:
  """{part: {"shift_factor": mean, "scale_factor": 1 / std}} of the parts' latents over the
  batches."""
  parts = tuple(parts)
  unknown = [p for p in parts if p not in LATENT_PARTS]
  if unknown:
    raise ValueError(f"no latent statistics for {unknown}; latent parts: {list(LATENT_PARTS)}")
  fn = jax.jit(lambda p, b: {part: _moments(_unscaled(models, p, b, part)) for part in parts})
  out = {}
  for part, m in _accumulate(fn, params, batches, parts).items():
    if m.n < 2:
      raise ValueError(f"latent statistics of {part}: no data was read")
    if not m.std > 0:
      raise ValueError(f"latent statistics of {part}: the latents are constant (std 0); the "
                       "encoder has collapsed")
    out[part] = {"shift_factor": m.mean, "scale_factor": 1.0 / m.std}
  return out


def calibrate(config: ml_collections.ConfigDict, stats: Mapping[str, Mapping[str, float]]
              ) -> ml_collections.ConfigDict:
  """A copy of `config` whose latent parts carry the measured shift and scale."""
  config = config.copy_and_resolve_references()
  for part, values in stats.items():
    field = LATENT_PARTS[part][0]
    for name in FIELDS:
      config.model[field][name] = float(values[name])
  return config


def adopt(config: ml_collections.ConfigDict, sources: Iterable[pathlib.Path],
          parts: Iterable[str]) -> ml_collections.ConfigDict:
  """A copy of `config` whose latent parts among `parts` take their shift and scale from the
  last source checkpoint holding them (the one their weights are loaded from)."""
  sources = list(sources)
  config = config.copy_and_resolve_references()
  for part in parts:
    if part not in LATENT_PARTS:
      continue
    holder = next((d for d in reversed(sources) if part in checkpoint.saved_parts(d)), None)
    if holder is None:
      continue
    saved = json.loads((holder / checkpoint.CONFIG_FILE).read_text())
    field = LATENT_PARTS[part][0]
    for name in FIELDS:
      value = saved.get("model", {}).get(field, {}).get(name)
      if value is not None:
        config.model[field][name] = float(value)
  return config
