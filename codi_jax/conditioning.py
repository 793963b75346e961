"""Composable conditioning: encode every input modality to one token and mix them by weights.

CoDi (CODI_REFERENCE §1.2, §2.5, §3) encodes text with CLIP text, images and videos with the CLIP
vision tower (with its temporal blocks for video) and 16 kHz audio with CLAP, each to a unit-norm
[B, 1, D] token, and conditions on `sum_i w_i c_i / sum_i w_i`, with no re-normalisation after
mixing. The unconditional branch of guidance mixes the per-modality null tokens with the same
weights; the nulls are what the original's inference uses: CLIP(""), CLIP of an all-zero (grey)
image or video of the input's shape, and CLAP of silence of the input's length.

Inputs (host arrays): text a string or a list of B strings; image [B, H, W, 3] and video
[B, F, H, W, 3] in [-1, 1]; audio [B, S] or [B, 1, S] at 16 kHz mono.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.modality import Modality
from codi_jax.models.clap import ClapConfig, clap_encode_audio
from codi_jax.models.clip import FrozenCLIP
from codi_jax.text import CLIPTokenizer


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


@dataclasses.dataclass(frozen=True)
class PromptEncoders:
  """CoDi's prompt encoders, loaded: CLIP (text + vision) and CLAP (audio), one token space."""

  clip: FrozenCLIP
  tokenizer: CLIPTokenizer
  clap_variables: Mapping[str, Any]  # {"params", "batch_stats"}
  clap_config: ClapConfig

  def __post_init__(self):
    if self.clip.config.projection_dim != self.clap_config.joint_embed_dim:
      raise ValueError(f"CLIP tokens have {self.clip.config.projection_dim} dims but CLAP tokens "
                       f"{self.clap_config.joint_embed_dim}; they must share one space")

  def encode(self, modality: Modality | str, data: Any) -> jax.Array:
    """One modality's input -> unit-norm condition tokens [B, 1, D]."""
    m = Modality.parse(modality)
    if m is Modality.TEXT:
      return self.clip.encode_text(self.tokenizer.encode_batch(_texts(data)))
    if m is Modality.AUDIO:
      return clap_encode_audio(self.clap_variables, _waveform(data), self.clap_config)
    return self.clip.encode_vision(_pixels(m, data))

  def null(self, modality: Modality | str, data: Any) -> jax.Array:
    """The unconditional tokens [B, 1, D] matching `data` (same batch and shape)."""
    m = Modality.parse(modality)
    if m is Modality.TEXT:
      return self.encode(m, [""] * len(_texts(data)))
    if m is Modality.AUDIO:
      return self.encode(m, np.zeros_like(_waveform(data)))
    return self.encode(m, np.zeros_like(_pixels(m, data)))


@dataclasses.dataclass(frozen=True)
class Conditions:
  """The guidance pair: mixed condition and mixed null tokens, both [B, 1, D] float32, and each
  input's own (condition, null) tokens before mixing, in input order."""

  cond: jax.Array
  uncond: jax.Array
  inputs: Mapping[Modality, tuple[jax.Array, jax.Array]] = dataclasses.field(
      default_factory=dict)


def encode_conditions(encoders: PromptEncoders, inputs: Mapping[Modality | str, Any],
                      weights: Mapping[Modality | str, float] | None = None) -> Conditions:
  """{modality: input} (+ optional weights, default equal) -> mixed condition and null tokens."""
  if not inputs:
    raise ValueError("at least one input modality is required")
  parsed = {Modality.parse(k): v for k, v in inputs.items()}
  if len(parsed) != len(inputs):
    raise ValueError(f"an input modality is repeated in {list(inputs)}")
  if weights:
    unknown = {Modality.parse(k) for k in weights} - set(parsed)
    if unknown:
      raise ValueError(f"weights given for {sorted(m.value for m in unknown)}, which are not "
                       f"inputs ({sorted(m.value for m in parsed)})")
  normalized_weights(list(parsed), weights)  # weight errors before any encoder runs
  cond = {m: encoders.encode(m, x) for m, x in parsed.items()}
  batches = {m.value: int(c.shape[0]) for m, c in cond.items()}
  if len(set(batches.values())) > 1:
    raise ValueError(f"inputs have different batch sizes: {batches}")
  uncond = {m: encoders.null(m, x) for m, x in parsed.items()}
  return Conditions(mix_conditions(cond, weights), mix_conditions(uncond, weights),
                    {m: (cond[m], uncond[m]) for m in parsed})


def _texts(data: str | Sequence[str]) -> list[str]:
  texts = [data] if isinstance(data, str) else list(data)
  if not texts or not all(isinstance(t, str) for t in texts):
    raise ValueError("text input must be a string or a non-empty list of strings")
  return texts


def _pixels(m: Modality, data: Any) -> np.ndarray:
  x = np.asarray(data, np.float32)
  rank = 5 if m is Modality.VIDEO else 4
  layout = "[B, F, H, W, 3]" if m is Modality.VIDEO else "[B, H, W, 3]"
  if x.ndim != rank or x.shape[-1] != 3:
    raise ValueError(f"{m.value} input must be {layout} RGB in [-1, 1], got shape {x.shape}")
  return x


def _waveform(data: Any) -> np.ndarray:
  w = np.asarray(data, np.float32)
  if w.ndim == 2:
    w = w[:, None]  # [B, 1, S]
  if w.ndim != 3 or w.shape[1] != 1:
    raise ValueError(f"audio input must be mono [B, S] or [B, 1, S] at 16 kHz, got shape "
                     f"{w.shape}; mix channels down first")
  return w
