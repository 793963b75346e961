"""Key maps between the original PyTorch state-dict names and our Flax parameter trees.

Our module trees mirror the original's (`codi_jax.models.*` name every child after its torch
attribute or index), so a Flax path maps to a torch key by joining the path with "." and renaming
the leaf by an explicit rule table. Each rule also fixes the leaf's layout change. One `KeyMap`
per model family; rules are tried in order, the first match wins:

  kind              torch layout        <- flax layout
  identity          same                <- same
  chan_gain         [C, 1, 1, 1]        <- [C]                 (video ChanLayerNorm gain)
  chan_gain1d       [1, C, 1]           <- [C]                 (CLIP video ChanLayerNorm gain)
  conv1x1_1d        [O, I, 1]           <- [I, O]              (1x1 Conv1d stored as a Dense)
  conv1x1           [O, I, 1, 1]        <- [I, O]              (1x1 Conv2d stored as a Dense;
                                                               a 4-D kernel is a plain Conv2d)
  conv1x1x1         [O, I, 1, 1, 1]     <- [I, O]              (1x1x1 Conv3d stored as a Dense)
  conv_transpose1d  [I, O, k]           <- [k, O, I]           (lax.conv_transpose with
                                                               transpose_kernel=True)
  kernel            [O, I, kh, kw]      <- [kh, kw, I, O]      (Conv2d)
                    [O, I, k]           <- [k, I, O]           (Conv1d)
                    [O, I]              <- [I, O]              (Linear)

Conversion walks OUR tree (from `jax.eval_shape`, so nothing is materialised), looks up every
expected torch key, checks shapes, and reports missing, unexpected and mismatched keys. Known
deterministic buffers (causal masks, STFT bases) are matched by the family's `buffers` patterns
and counted apart (export writes them back: `codi_jax.convert.buffers`). Nothing is ever silently
skipped. `match` does all of this from the shapes alone, so a lazy state dict (`torch_io`) is
checked before any tensor is read; `to_flax` then reads the matched tensors one at a time.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import flax.core.meta
import flax.traverse_util
import numpy as np

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LeafRule:
  pattern: re.Pattern
  torch_leaf: str | None  # None: keep the flax leaf name
  kind: str


def rule(pattern: str, torch_leaf: str | None, kind: str) -> LeafRule:
  return LeafRule(re.compile(pattern), torch_leaf, kind)


def _kernel_to_torch(v: np.ndarray) -> np.ndarray:
  if v.ndim == 4:
    return v.transpose(3, 2, 0, 1)
  if v.ndim == 3:
    return v.transpose(2, 1, 0)
  return v.T


def _kernel_from_torch(v: np.ndarray) -> np.ndarray:
  if v.ndim == 4:
    return v.transpose(2, 3, 1, 0)
  if v.ndim == 3:
    return v.transpose(2, 1, 0)
  return v.T


# kind -> (flax -> torch, torch -> flax given the flax shape)
_LAYOUTS: dict[str, tuple[Callable, Callable]] = {
    "identity": (lambda v: v, lambda v, s: v),
    "chan_gain": (lambda v: v.reshape(-1, 1, 1, 1), lambda v, s: v.reshape(s)),
    "conv1x1": (lambda v: v.T[:, :, None, None] if v.ndim == 2 else _kernel_to_torch(v),
                lambda v, s: v[:, :, 0, 0].T if len(s) == 2 else _kernel_from_torch(v)),
    "conv1x1x1": (lambda v: v.T[:, :, None, None, None], lambda v, s: v[:, :, 0, 0, 0].T),
    "conv1x1_1d": (lambda v: v.T[:, :, None], lambda v, s: v[:, :, 0].T),
    "chan_gain1d": (lambda v: v.reshape(1, -1, 1), lambda v, s: v.reshape(s)),
    "conv_transpose1d": (lambda v: v.transpose(2, 1, 0), lambda v, s: v.transpose(2, 1, 0)),
    "kernel": (_kernel_to_torch, lambda v, s: _kernel_from_torch(v)),
}

# Leaves every family shares: norm scales/biases and plain conv/linear kernels.
COMMON_RULES: tuple[LeafRule, ...] = (
    rule(r"/scale$", "weight", "identity"),
    rule(r"/bias$", "bias", "identity"),
    rule(r"/embedding$", "weight", "identity"),
    rule(r"/kernel$", "weight", "kernel"),
)


@dataclasses.dataclass
class ConversionReport:
  """What a conversion found; `check()` raises if anything is off."""

  loaded: int = 0
  buffers: int = 0
  missing: list[str] = dataclasses.field(default_factory=list)
  unexpected: list[str] = dataclasses.field(default_factory=list)
  mismatched: list[str] = dataclasses.field(default_factory=list)

  @property
  def ok(self) -> bool:
    return not (self.missing or self.unexpected or self.mismatched)

  def summary(self, limit: int = 20) -> str:
    lines = [f"loaded {self.loaded} tensors ({self.buffers} known buffers recomputed)"]
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


def state_shapes(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """{key: shape} of a state dict; lazy ones (`torch_io`) answer from their index, reading
  nothing."""
  shapes = getattr(state, "shapes", None)
  if callable(shapes):
    return dict(shapes())
  return {k: tuple(np.shape(v)) for k, v in state.items()}


@dataclasses.dataclass(frozen=True)
class KeyMap:
  """One model family's rule table plus the torch buffers it recomputes instead of loading."""

  rules: tuple[LeafRule, ...]
  buffers: tuple[re.Pattern, ...] = ()

  def _rule(self, path: tuple[str, ...]) -> LeafRule:
    p = "/" + "/".join(path)
    for r in self.rules:
      if r.pattern.search(p):
        return r
    raise KeyError(f"no key-map rule for parameter {'/'.join(path)!r}")

  def torch_key(self, path: tuple[str, ...], prefix: str = "") -> str:
    """The torch state-dict key of the Flax parameter at `path`."""
    r = self._rule(path)
    leaf = path[-1] if r.torch_leaf is None else r.torch_leaf
    return prefix + ".".join(path[:-1] + (leaf,))

  def to_torch(self, path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """Flax array -> the original's tensor layout."""
    return _LAYOUTS[self._rule(path).kind][0](value)

  def torch_shape(self, path: tuple[str, ...], flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The original's shape of the parameter at `path` (no memory: a broadcast view)."""
    return tuple(self.to_torch(path, np.broadcast_to(np.zeros((), np.int8), flax_shape)).shape)

  def from_torch(self, path: tuple[str, ...], value: np.ndarray, flax_shape: tuple[int, ...]
                 ) -> np.ndarray:
    """Original tensor -> our layout, checked against the expected Flax shape."""
    expected = self.torch_shape(path, flax_shape)
    if tuple(value.shape) != expected:
      raise ValueError(f"{'/'.join(path)}: torch shape {tuple(value.shape)} != expected "
                       f"{expected} (flax {flax_shape})")
    return _LAYOUTS[self._rule(path).kind][1](value, flax_shape)

  def is_buffer(self, key: str) -> bool:
    return any(p.search(key) for p in self.buffers)

  def match(self, shapes: Mapping[str, tuple[int, ...]], target: PyTree, *, prefix: str = "",
            owns: Callable[[str], bool] | None = None
            ) -> tuple[dict[tuple[str, ...], str], ConversionReport]:
    """Which torch key feeds each leaf of `target`, checked from shapes alone (nothing is read).

    Args:
      shapes: torch key -> shape (`state_shapes` of a state dict).
      target, prefix, owns: as for `to_flax`.
    Returns:
      ({flax path: torch key} of the leaves that can be loaded, report).
    """
    flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(target))
    report = ConversionReport()
    plan, used = {}, set()
    for path, leaf in flat.items():
      key = self.torch_key(path, prefix)
      if key not in shapes:
        report.missing.append(key)
        continue
      used.add(key)
      expected = self.torch_shape(path, tuple(leaf.shape))
      if tuple(shapes[key]) != expected:
        report.mismatched.append(f"{key}: {'/'.join(path)}: torch shape {tuple(shapes[key])} != "
                                 f"expected {expected} (flax {tuple(leaf.shape)})")
        continue
      plan[path] = key
      report.loaded += 1
    if owns is None:
      tops = tuple(prefix + name + "." for name in {p[0] for p in flat})
      owns = lambda k: k.startswith(tops)
    for k in sorted(shapes):
      if owns(k) and k not in used:
        if self.is_buffer(k[len(prefix):] if k.startswith(prefix) else k):
          report.buffers += 1
        else:
          report.unexpected.append(k)
    return plan, report

  def to_flax(self, state: Mapping[str, np.ndarray], target: PyTree, *, prefix: str = "",
              owns: Callable[[str], bool] | None = None,
              dtype: Any = np.float32) -> tuple[PyTree, ConversionReport]:
    """Builds our params from an original state dict.

    Args:
      state: torch key -> array (floating values are cast to `dtype`).
      target: our param tree, or its `jax.eval_shape` (anything with `.shape` leaves).
      prefix: prepended to every torch key (e.g. "model.diffusion_model.").
      owns: which state keys this tree is responsible for (default: keys starting with the
        prefix + a top-level name of `target`); owned keys that map to nothing and are not
        known buffers are "unexpected".
    Returns:
      (params, report). Missing or mismatched leaves are absent from params; call
      report.check().
    """
    plan, report = self.match(state_shapes(state), target, prefix=prefix, owns=owns)
    flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(target))
    out = {}
    for path, key in plan.items():
      value = self.from_torch(path, np.asarray(state[key]), tuple(flat[path].shape))
      floating = np.issubdtype(value.dtype, np.floating)
      out[path] = np.array(value, dtype, order="C") if floating else value  # keeps 0-d
    return flax.traverse_util.unflatten_dict(out), report

  def to_state(self, params: PyTree, *, prefix: str = "") -> dict[str, np.ndarray]:
    """Our params -> {original key: array in the original layout}."""
    flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(params))
    return {self.torch_key(p, prefix): self.to_torch(p, np.asarray(v)) for p, v in flat.items()}


# The diffusers (`codi_jax.models.{unet,unet_text,temporal,codi}`).
UNET = KeyMap(rules=(
    rule(r"/temporal_attn/norm/scale$", "g", "identity"),
    rule(r"/ff/proj_out/0/scale$", "g", "chan_gain"),
    rule(r"/(pos_embeds|frame_rate_embeds)$", None, "identity"),
    rule(r"/ff/(proj_in/0|proj_out/1)/kernel$", "weight", "conv1x1x1"),
    rule(r"/(proj_in|proj_out|in_layers/2|out_layers/3|skip_connection)/kernel$", "weight",
         "conv1x1"),
) + COMMON_RULES)

# --- Autoencoders, vocoder and text VAE. Keys relative to `autokl.`, `audioldm.`,
# `audioldm.vocoder.` and `optimus.`.

# KL VAEs (image `autokl`, audio `audioldm`): plain convs, GroupNorms, 1x1-conv attention.
# The AudioLDM mel front-end's STFT/mel bases are deterministic buffers we compute.
AUTOENCODER = KeyMap(rules=COMMON_RULES, buffers=(re.compile(r"^fn_STFT\."),))

# HiFi-GAN (weight norm removed): Conv1d everywhere, ConvTranspose1d in `ups`.
VOCODER = KeyMap(rules=(rule(r"/ups/\d+/kernel$", "weight", "conv_transpose1d"),) + COMMON_RULES)

# Optimus: BERT Linear layers are [out, in]; GPT-2's `Conv1D` stores [in, out] as we do. The
# causal-mask buffers and the tied `lm_head` (= `wte`) are not separate parameters.
OPTIMUS = KeyMap(
    rules=(rule(r"/(c_attn|c_proj|c_fc)/kernel$", "weight", "identity"),) + COMMON_RULES,
    buffers=(re.compile(r"\.attn\.(bias|masked_bias)$"), re.compile(r"(^|\.)lm_head\.weight$")),
)

# CLIP (`codi_jax.models.clip.CLIPModel`; keys relative to `clip.`, prefix "model."). The vision
# temporal block stores 1x1 Conv1d kernels [O, I, 1] (Dense [I, O] here) and a ChanLayerNorm gain
# [1, C, 1]; the `position_ids` index buffers are recomputed.
CLIP = KeyMap(
    rules=(
        rule(r"/temporal_attn/norm/scale$", "g", "identity"),
        rule(r"/ff/proj_out/0/scale$", "g", "chan_gain1d"),
        rule(r"/ff/(proj_in/0|proj_out/1)/kernel$", "weight", "conv1x1_1d"),
        rule(r"/(pos_embeds|frame_rate_embeds|class_embedding|logit_scale)$", None, "identity"),
    ) + COMMON_RULES,
    buffers=(re.compile(r"(^|\.)position_ids$"),),
)

# CLAP audio tower (`codi_jax.models.clap`; keys relative to `clap.`, prefix "model."). bn0's
# running statistics are our `batch_stats` collection (`bn0/mean`, `bn0/var`); the Swin
# relative-position indices, shifted-window masks, bn0's batch counter and the torchlibrosa
# STFT/mel constants are recomputed.
CLAP = KeyMap(
    rules=(
        rule(r"/bn0/mean$", "running_mean", "identity"),
        rule(r"/bn0/var$", "running_var", "identity"),
        rule(r"/relative_position_bias_table$", None, "identity"),
    ) + COMMON_RULES,
    buffers=(re.compile(r"\.attn\.relative_position_index$"), re.compile(r"\.attn_mask$"),
             re.compile(r"\.bn0\.num_batches_tracked$"),
             re.compile(r"^audio_branch\.(spectrogram_extractor|logmel_extractor)\.")),
)

# Module-level shortcuts for the diffusers' map (the most used one).
torch_key = UNET.torch_key
torch_shape = UNET.torch_shape
to_torch_layout = UNET.to_torch
from_torch_layout = UNET.from_torch
torch_to_flax = UNET.to_flax
flax_to_torch = UNET.to_state
