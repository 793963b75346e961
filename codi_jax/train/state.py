"""The sharded train state: parameters split into trainable and frozen, the optimiser, the step.

Parameters live as flat dicts {part: {"a/b/kernel": array}} (paths joined by "/", as orbax keys
need strings). A stage's selector splits them: the trainable dict is in `TrainState` with its
optimiser state and EMA; the frozen dict is a separate argument of the step, never differentiated
or updated. Every leaf carries the logical axis names of its module, so both are placed by the
config's rules (`codi_jax.parallel.sharding`): replicated, FSDP- or tensor-sharded.

Where parameters come from (`load_params`): each part from the last `init_from` checkpoint that
holds it (restored straight into its shards by orbax), else freshly initialised with the module's
own initialisers, jitted with sharded outputs: nothing full-size is materialised on one device.
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
import zlib
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from codi_jax import checkpoint, components
from codi_jax.parallel.sharding import logical_to_spec, unbox

PyTree = Any
Flat = dict[str, dict[str, Any]]  # {part: {"path/to/leaf": leaf}}
SEP = "/"


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimiser steps taken
  params: Flat  # trainable leaves, float32 master copies
  opt_state: optax.OptState
  ema_params: Flat


def flatten(tree: PyTree) -> dict[str, Any]:
  return {SEP.join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def unflatten(flat: Mapping[str, Any]) -> dict:
  return flax.traverse_util.unflatten_dict({tuple(k.split(SEP)): v for k, v in flat.items()})


def merge(*flats: Flat) -> dict[str, dict]:
  """{part: nested tree} from flat dicts that together hold every leaf of each part."""
  parts: dict[str, dict[str, Any]] = {}
  for flat in flats:
    for part, leaves in flat.items():
      parts.setdefault(part, {}).update(leaves)
  return {part: unflatten(leaves) for part, leaves in parts.items()}


def _part_init(model: Mapping, part: str, key: jax.Array):
  """() -> boxed initial tree of `part` (CLAP: {"params", "batch_stats"}) from `key`."""
  c = components.component(part)
  typed = c.config(model)
  return lambda: c.init(typed, key)


def abstract_part(model: Mapping, part: str) -> dict[str, Any]:
  """Flat boxed `ShapeDtypeStruct`s of a part (logical names kept), no memory allocated (cached
  per model config: tracing the full diffusers takes seconds)."""
  plain = model.to_dict() if isinstance(model, ml_collections.ConfigDict) else dict(model)
  return dict(_abstract_part(json.dumps(plain, sort_keys=True, default=str), part))


@functools.lru_cache(maxsize=64)
def _abstract_part(model_json: str, part: str) -> dict[str, Any]:
  with nn.logical_axis_rules(()):
    return flatten(jax.eval_shape(_part_init(json.loads(model_json), part, jax.random.key(0))))


def leaf_sharding(leaf: Any, mesh: Mesh, rules) -> NamedSharding:
  if isinstance(leaf, nn.LogicallyPartitioned):
    return NamedSharding(mesh, logical_to_spec(leaf.names, leaf.value.shape, rules, mesh))
  return NamedSharding(mesh, PartitionSpec())


def _init_part(model: Mapping, part: str, seed: int, shardings: Mapping[str, NamedSharding]
               ) -> dict[str, jax.Array]:
  """Fresh parameters of a part, created directly in their shards (jit with out_shardings)."""
  key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(part.encode()))
  init = _part_init(model, part, key)

  def build():
    with nn.logical_axis_rules(()):  # shardings come from our divisibility-aware rules
      return flatten(unbox(init()))

  return jax.jit(build, out_shardings=dict(shardings))()


def _restore_part(directory: pathlib.Path, part: str, shardings: Mapping[str, NamedSharding],
                  abstract: Mapping[str, Any]) -> dict[str, jax.Array]:
  """A part of a model checkpoint restored straight into its shards."""
  target = unflatten({k: jax.ShapeDtypeStruct(unbox(v).shape, unbox(v).dtype,
                                               sharding=shardings[k])
                      for k, v in abstract.items()})
  restore_args = jax.tree_util.tree_map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding),
                                        target)
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      tree = ckptr.restore((directory / part).absolute(),
                           args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
  except Exception as e:  # orbax raises many types; name the part and folder
    raise ValueError(f"cannot restore part {part!r} from {directory}: {type(e).__name__}: {e}"
                     ) from e
  flat = flatten(tree)
  if set(flat) != set(abstract):
    missing, extra = sorted(set(abstract) - set(flat)), sorted(set(flat) - set(abstract))
    raise ValueError(f"checkpoint {directory} part {part!r} does not match the configured model: "
                     f"missing {missing[:5]}, unexpected {extra[:5]}")
  return flat


def init_sources(init_from: str | Sequence[str]) -> list[pathlib.Path]:
  if isinstance(init_from, str):
    init_from = [p.strip() for p in init_from.split(",") if p.strip()]
  dirs = [pathlib.Path(p) for p in init_from]
  for d in dirs:
    if not (d / checkpoint.CONFIG_FILE).is_file():
      raise ValueError(f"init_from {d} is not a model checkpoint (no {checkpoint.CONFIG_FILE})")
  return dirs


def load_params(config: ml_collections.ConfigDict, parts: Sequence[str], mesh: Mesh
                ) -> tuple[Flat, dict[str, str]]:
  """({part: flat sharded leaves}, {part: where it came from}) for `parts`: from the last
  `config.init_from` checkpoint holding the part, else freshly initialised."""
  rules = config.sharding_rules
  sources = init_sources(config.init_from)
  params, origin = {}, {}
  for part in parts:
    abstract = abstract_part(config.model, part)
    shardings = {k: leaf_sharding(v, mesh, rules) for k, v in abstract.items()}
    holder = next((d for d in reversed(sources) if part in checkpoint.saved_parts(d)), None)
    if holder is not None:
      params[part] = _restore_part(holder, part, shardings, abstract)
      origin[part] = str(holder)
    else:
      params[part] = _init_part(config.model, part, config.seed, shardings)
      origin[part] = "initialised"
    logging.info("part %s: %s", part, origin[part])
  return params, origin


# --- optimiser ------------------------------------------------------------------------------------

def learning_rate_schedule(t: ml_collections.ConfigDict, peak: float | None = None,
                           span: tuple[int, int] | None = None, decay: str | None = None
                           ) -> optax.Schedule:
  """Warm-up to `peak` (default `t.learning_rate`), then constant or cosine `decay` (default
  `t.decay`), over the stage's steps or over `span` = (first step, steps) (zero before it)."""
  peak = t.learning_rate if peak is None else peak
  decay = t.decay if decay is None else decay
  start, steps = span or (0, int(t.steps))
  warmup = int(t.warmup_steps)
  if decay == "constant":
    base = optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)),
                                 optax.constant_schedule(peak)], [warmup])
  elif decay == "cosine":
    base = optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup, max(steps, warmup + 1), end_value=peak * t.end_learning_rate_fraction)
  else:
    raise ValueError(f"config.train.decay must be one of {list(DECAYS)}, got {decay!r}")
  if not start:
    return base
  return lambda count: jnp.where(count < start, 0.0, base(count - start))


def _per_part(t: ml_collections.ConfigDict, field: str, parse: Callable[[str], Any],
              expected: str, example: str) -> dict:
  """`config.train.<field>` ("part=value,...") as {part: parse(value)}; `parse` raises
  ValueError on a value it refuses (described by `expected`)."""
  out = {}
  for item in (p.strip() for p in str(t.get(field, "")).split(",") if p.strip()):
    part, sep, value = item.partition("=")
    try:
      if not sep:
        raise ValueError(item)
      out[part.strip()] = parse(value.strip())
    except ValueError:
      raise ValueError(f"config.train.{field}: expected part=value items with {expected} "
                       f"(e.g. {example!r}), got {item!r}") from None
  return out


def _positive(kind: type) -> Callable[[str], Any]:
  def parse(value: str):
    number = kind(value)
    if not number > 0:
      raise ValueError(value)
    return number
  return parse


def _one_of(choices: Sequence[str]) -> Callable[[str], str]:
  def parse(value: str) -> str:
    if value not in choices:
      raise ValueError(value)
    return value
  return parse


DECAYS = ("cosine", "constant")  # after warm-up


_POSITIVE_INTS = ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
                  "latent_stats_examples", "sample_count", "sample_ddim_steps",
                  "env_contrastive_max_timestep")
_NON_NEGATIVE_INTS = ("warmup_steps", "sample_every", "quality_examples",
                      "optimus_softmax_candidates")
_POSITIVE_NUMBERS = ("learning_rate", "grad_clip", "eps")
_NON_NEGATIVE_NUMBERS = ("weight_decay", "kl_weight", "cond_dropout", "end_learning_rate_fraction")


def positive_int(t: ml_collections.ConfigDict, field: str) -> int:
  """`config.train.<field>`, which must be a positive integer."""
  value = t[field]
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"config.train.{field} must be a positive integer, got {value!r}")
  return value


def check_train_settings(t: ml_collections.ConfigDict) -> None:
  """Rejects numeric training settings that would fail (or silently do nothing) later, before
  anything is loaded or compiled."""
  for field in _POSITIVE_INTS:
    positive_int(t, field)
  for field in _NON_NEGATIVE_INTS:
    value = t[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f"config.train.{field} must be an integer >= 0, got {value!r}")
  for field in _POSITIVE_NUMBERS + _NON_NEGATIVE_NUMBERS:
    value = t[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) \
       or value < 0 or (value == 0 and field in _POSITIVE_NUMBERS):
      kind = "positive" if field in _POSITIVE_NUMBERS else ">= 0"
      raise ValueError(f"config.train.{field} must be a finite number {kind}, got {value!r}")
  for field in ("b1", "b2", "ema_decay"):
    if not 0 <= t[field] < 1:
      raise ValueError(f"config.train.{field} must be in [0, 1), got {t[field]!r}")
  if t.decay not in DECAYS:
    raise ValueError(f"config.train.decay must be one of {list(DECAYS)}, got {t.decay!r}")
  part_learning_rates(t)
  part_batch_sizes(t)
  part_decays(t)


def part_learning_rates(t: ml_collections.ConfigDict) -> dict[str, float]:
  """`config.train.part_learning_rates` ("optimus=3e-3,autokl=2e-3") as {part: peak rate}."""
  return _per_part(t, "part_learning_rates", _positive(float), "a positive number",
                   "optimus=3e-3,autokl=2e-3")


def part_batch_sizes(t: ml_collections.ConfigDict) -> dict[str, int]:
  """`config.train.part_batch_sizes` ("optimus=128") as {part: global batch of its phase}."""
  return _per_part(t, "part_batch_sizes", _positive(int), "a positive integer", "optimus=128")


def part_decays(t: ml_collections.ConfigDict) -> dict[str, str]:
  """`config.train.part_decays` ("audioldm_vae=cosine") as {part: decay overriding `decay`}."""
  return _per_part(t, "part_decays", _one_of(DECAYS), f"a decay in {list(DECAYS)}",
                   "audioldm_vae=cosine")


def make_optimizer(t: ml_collections.ConfigDict, parts: Sequence[str],
                   spans: Mapping[str, tuple[int, int]] | None = None
                   ) -> optax.GradientTransformation:
  """Per part: global-norm clipping of that part's gradient, then AdamW at the part's learning
  rate (no weight decay on biases, norms and other 1-D leaves). Parts are clipped apart so that
  one part's large gradient (a VAE's) does not shrink another's (Optimus') update. A part with a
  span (first step, steps) is trained alone by one phase: its schedule runs over the span's
  steps, counted by its own optimiser state, which the steps of other phases leave untouched
  (`keep_idle_parts`)."""
  rates, decays = part_learning_rates(t), part_decays(t)
  for field, named in (("part_learning_rates", rates), ("part_decays", decays)):
    unknown = sorted(set(named) - set(parts))
    if unknown:
      raise ValueError(f"config.train.{field} names {unknown}, which this stage does not train "
                       f"(it trains {list(parts)})")
  decay_mask = lambda params: jax.tree_util.tree_map(lambda x: x.ndim > 1, params)

  def one(part: str) -> optax.GradientTransformation:
    span = (spans or {}).get(part)
    schedule = learning_rate_schedule(t, rates.get(part, t.learning_rate),
                                      span and (0, span[1]), decays.get(part))
    return optax.chain(
        optax.clip_by_global_norm(t.grad_clip),
        optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                    mask=decay_mask))

  labels = lambda params: {p: jax.tree_util.tree_map(lambda _: p, leaves)
                           for p, leaves in params.items()}
  return optax.multi_transform({p: one(p) for p in parts}, labels)


def keep_idle_parts(new: optax.OptState, old: optax.OptState, idle: Sequence[str]
                    ) -> optax.OptState:
  """`make_optimizer`'s state after a step, with the parts in `idle` (those the step's phase
  does not train) as they were. Their masked zero gradients would otherwise advance Adam's step
  count with no moments behind it: when the part's own phase began, Adam's bias correction would
  divide near-empty second moments by ~1, inflating its first hundreds of steps by 2-5x (enough
  to collapse Optimus' encoder), and its schedule would not start at its phase."""
  if not idle:
    return new
  inner = dict(new.inner_states)
  inner.update({part: old.inner_states[part] for part in idle})
  return new._replace(inner_states=inner)


def state_sharding_like(abstract: TrainState, param_shardings: Flat) -> TrainState:
  """Shardings of a state: optimiser moments shard like their parameters, scalars replicate."""
  mesh = next(iter(next(iter(param_shardings.values())).values())).mesh
  replicated = NamedSharding(mesh, PartitionSpec())
  flat_params = {(part, k): s for part, leaves in param_shardings.items()
                 for k, s in leaves.items()}

  def one(path, leaf):
    keys = [getattr(p, "key", None) for p in path]
    # A moment leaf's path ends with (..., part, leaf name) exactly as the params dict.
    sharding = flat_params.get(tuple(keys[-2:]))
    if sharding is not None:
      return sharding
    return replicated

  return jax.tree_util.tree_map_with_path(one, abstract)


def param_count(flat: Flat) -> int:
  return sum(int(np.prod(v.shape)) for leaves in flat.values() for v in leaves.values())
