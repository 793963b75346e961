"""Key map between the original PyTorch state-dict names and our Flax parameter trees.

Our module tree mirrors the original (`codi_jax.models.*` name every child after its torch
attribute or index), so a Flax path maps to a torch key by joining the path with "." and renaming
the leaf by the explicit table `LEAF_RULES` below. The table also fixes each leaf's layout change:

  flax leaf                           torch leaf        layout (torch <- flax)
  */temporal_attn/norm/scale          g                 [C]            <- [C]
  */ff/proj_out/0/scale               g                 [I, 1, 1, 1]   <- [I]
  */pos_embeds, */frame_rate_embeds   same              identity
  */scale                             weight            identity (GroupNorm/LayerNorm)
  */bias                              bias              identity
  */ff/proj_in/0/kernel, /proj_out/1  weight            [O, I, 1, 1, 1] <- [I, O]  (Conv3d 1x1x1)
  */proj_in|proj_out/kernel (2-D),
  */in_layers/2|out_layers/3|skip_connection/kernel (2-D)
                                      weight            [O, I, 1, 1]   <- [I, O]  (Conv2d 1x1)
  */kernel (4-D)                      weight            [O, I, kh, kw] <- [kh, kw, I, O]
  */kernel (2-D, otherwise)           weight            [O, I]         <- [I, O]  (Linear)

Conversion walks OUR tree (from `jax.eval_shape`, so nothing is materialised), looks up every
expected torch key, checks shapes, and reports missing, unexpected and mismatched keys.
Nothing is ever silently skipped.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import flax.core.meta
import flax.traverse_util
import numpy as np

PyTree = Any

_CONV3D_1x1 = re.compile(r"/ff/(proj_in/0|proj_out/1)/kernel$")
_CONV2D_1x1 = re.compile(
    r"/(proj_in|proj_out)/kernel$|/(in_layers/2|out_layers/3|skip_connection)/kernel$")


@dataclasses.dataclass(frozen=True)
class LeafRule:
  pattern: re.Pattern
  torch_leaf: str | None  # None: keep the flax leaf name
  kind: str


LEAF_RULES: tuple[LeafRule, ...] = (
    LeafRule(re.compile(r"/temporal_attn/norm/scale$"), "g", "identity"),
    LeafRule(re.compile(r"/ff/proj_out/0/scale$"), "g", "chan_gain"),
    LeafRule(re.compile(r"/(pos_embeds|frame_rate_embeds)$"), None, "identity"),
    LeafRule(re.compile(r"/scale$"), "weight", "identity"),
    LeafRule(re.compile(r"/bias$"), "bias", "identity"),
    LeafRule(re.compile(r"/kernel$"), "weight", "kernel"),
)


def _rule(path: str) -> LeafRule:
  for rule in LEAF_RULES:
    if rule.pattern.search("/" + path):
      return rule
  raise KeyError(f"no key-map rule for parameter {path!r}")


def torch_key(path: tuple[str, ...], prefix: str = "") -> str:
  """The torch state-dict key of the Flax parameter at `path`."""
  rule = _rule("/".join(path))
  leaf = path[-1] if rule.torch_leaf is None else rule.torch_leaf
  return prefix + ".".join(path[:-1] + (leaf,))


def _kernel_torch_ndim(path: str, flax_ndim: int) -> int:
  if flax_ndim == 4:
    return 4
  if _CONV3D_1x1.search("/" + path):
    return 5
  if _CONV2D_1x1.search("/" + path):
    return 4
  return 2


def to_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  """Flax array -> the original's tensor layout."""
  p = "/".join(path)
  rule = _rule(p)
  if rule.kind == "chan_gain":
    return value.reshape(-1, 1, 1, 1)
  if rule.kind == "identity":
    return value
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)  # [kh, kw, I, O] -> [O, I, kh, kw]
  out = value.T  # [I, O] -> [O, I]
  return out.reshape(out.shape + (1,) * (_kernel_torch_ndim(p, value.ndim) - 2))


def torch_shape(path: tuple[str, ...], flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The original's shape of the parameter at `path` (no memory: a broadcast view)."""
  return tuple(to_torch_layout(path, np.broadcast_to(np.zeros((), np.int8), flax_shape)).shape)


def from_torch_layout(path: tuple[str, ...], value: np.ndarray, flax_shape: tuple[int, ...]
                      ) -> np.ndarray:
  """Original tensor -> our layout, checked against the expected Flax shape."""
  p = "/".join(path)
  rule = _rule(p)
  expected_torch = torch_shape(path, flax_shape)
  if tuple(value.shape) != expected_torch:
    raise ValueError(f"{p}: torch shape {tuple(value.shape)} != expected {expected_torch} "
                     f"(flax {flax_shape})")
  if rule.kind == "chan_gain":
    return value.reshape(flax_shape)
  if rule.kind == "identity":
    return value
  if len(flax_shape) == 4:
    return value.transpose(2, 3, 1, 0)
  return value.reshape(value.shape[:2]).T


@dataclasses.dataclass
class ConversionReport:
  """What a conversion found; `check()` raises if anything is off."""

  loaded: int = 0
  missing: list[str] = dataclasses.field(default_factory=list)
  unexpected: list[str] = dataclasses.field(default_factory=list)
  mismatched: list[str] = dataclasses.field(default_factory=list)

  @property
  def ok(self) -> bool:
    return not (self.missing or self.unexpected or self.mismatched)

  def summary(self, limit: int = 20) -> str:
    lines = [f"loaded {self.loaded} tensors"]
    for name in ("missing", "unexpected", "mismatched"):
      keys = getattr(self, name)
      if keys:
        shown = "\n    ".join(keys[:limit])
        more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
        lines.append(f"{len(keys)} {name} keys:\n    {shown}{more}")
    return "\n".join(lines)

  def check(self) -> None:
    if not self.ok:
      raise KeyError("checkpoint does not match the model:\n" + self.summary())


def torch_to_flax(state: Mapping[str, np.ndarray], target: PyTree, *, prefix: str = "",
                  owns: Callable[[str], bool] | None = None,
                  dtype: Any = np.float32) -> tuple[PyTree, ConversionReport]:
  """Builds our params from an original state dict.

  Args:
    state: torch key -> array (float16 values are widened to `dtype`).
    target: our param tree, or its `jax.eval_shape` (anything with `.shape` leaves).
    prefix: prepended to every torch key (e.g. "model.diffusion_model.").
    owns: which state keys this tree is responsible for (default: keys starting with the
      prefix + a top-level name of `target`); owned keys that map to nothing are "unexpected".
  Returns:
    (params, report). Missing or mismatched leaves are absent from params; call report.check().
  """
  flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(target))
  report = ConversionReport()
  out = {}
  used = set()
  for path, leaf in flat.items():
    key = torch_key(path, prefix)
    if key not in state:
      report.missing.append(key)
      continue
    used.add(key)
    try:
      value = from_torch_layout(path, np.asarray(state[key]), tuple(leaf.shape))
    except ValueError as e:
      report.mismatched.append(f"{key}: {e}")
      continue
    out[path] = value.astype(dtype) if np.issubdtype(value.dtype, np.floating) else value
    report.loaded += 1
  if owns is None:
    tops = tuple(prefix + name + "." for name in {p[0] for p in flat})
    owns = lambda k: k.startswith(tops)
  report.unexpected = sorted(k for k in state if owns(k) and k not in used)
  return flax.traverse_util.unflatten_dict(out), report


def flax_to_torch(params: PyTree, *, prefix: str = "") -> dict[str, np.ndarray]:
  """Our params -> {original key: array in the original layout}."""
  flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(params))
  return {torch_key(p, prefix): to_torch_layout(p, np.asarray(v)) for p, v in flat.items()}
