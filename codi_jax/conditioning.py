"""Composable conditioning: mix per-modality condition tokens by normalised weights.

CoDi (CODI_REFERENCE §2.5, §3) encodes every input modality to [B, T, D] tokens (T = 1 for its
pooled CLIP/CLAP embeddings) and conditions on `sum_i w_i c_i / sum_i w_i`, with no
re-normalisation after mixing. The unconditional branch of guidance mixes the per-modality null
tokens with the same weights.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from codi_jax.modality import Modality


def normalized_weights(modalities: list[Modality], weights: Mapping[Modality | str, float] | None
                       ) -> dict[Modality, float]:
  """Weights of the given condition modalities, divided by their sum (default: all equal)."""
  table = {Modality.parse(k): float(v) for k, v in (weights or {}).items()}
  w = {m: table.get(m, 1.0) for m in modalities}
  for m, v in w.items():
    if v < 0:
      raise ValueError(f"condition weight for {m.value} is negative: {v}")
  total = sum(w.values())
  if total <= 0:
    raise ValueError(f"condition weights sum to {total}; at least one must be positive")
  return {m: v / total for m, v in w.items()}


def mix_conditions(conditions: Mapping[Modality | str, jax.Array],
                   weights: Mapping[Modality | str, float] | None = None) -> jax.Array:
  """{modality: [B, T, D] tokens} -> the mixed context [B, T, D] (normalised weighted sum)."""
  if not conditions:
    raise ValueError("at least one condition is required")
  parsed = {Modality.parse(k): v for k, v in conditions.items()}
  if len(parsed) != len(conditions):
    raise ValueError(f"a condition modality is repeated in {list(conditions)}")
  shapes = {tuple(v.shape) for v in parsed.values()}
  if len(shapes) > 1 or len(next(iter(shapes))) != 3:
    raise ValueError(f"conditions must all be [B, T, D] of one shape, got {sorted(shapes)}")
  norm = normalized_weights(list(parsed), weights)
  mixed = 0.0
  for m, c in parsed.items():
    mixed = mixed + c.astype(jnp.float32) * norm[m]
  return mixed
