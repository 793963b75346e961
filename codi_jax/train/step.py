"""The jitted train step of a stage phase, with explicit shardings, and its abstract inputs.

`Trainer` ties a stage to a mesh: it knows every parameter's sharding (logical names -> mesh axes
by `config.sharding_rules`), splits parameters into trainable and frozen, builds the train state
sharded, and compiles one step per phase:

  step(state, frozen, batch) -> (state, metrics)     jax.jit, in/out shardings, state donated

Randomness: the step key is fold_in(seed, step) and each example's key folds in its global stream
position (`objectives.row_keys`). A step whose loss or gradient norm is not finite leaves the state
unchanged (the loop then stops the run), so a checkpoint never holds a non-finite update. The same
builder lowers the step against abstract inputs for `codi-jax compile-check` (no memory used).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from codi_jax.modality import Modality
from codi_jax.parallel.sharding import logical_to_spec, unbox
from codi_jax.train import objectives, stages
from codi_jax.train.state import (Flat, TrainState, abstract_part, keep_idle_parts,
                                  leaf_sharding, learning_rate_schedule, make_optimizer, merge,
                                  part_decays, part_learning_rates,
                                  state_sharding_like)

PyTree = Any


def batch_shapes(config: ml_collections.ConfigDict, modalities, batch_size: int
                 ) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch a phase reads (see `codi_jax.train.data.arrays`)."""
  d, b = config.data, batch_size
  out = {"index": jax.ShapeDtypeStruct((b,), jnp.int32)}
  for m in modalities:
    if m is Modality.IMAGE:
      out["image"] = jax.ShapeDtypeStruct((b, d.image_size, d.image_size, 3), jnp.float32)
    elif m is Modality.VIDEO:
      out["video"] = jax.ShapeDtypeStruct((b, d.num_frames, d.image_size, d.image_size, 3),
                                          jnp.float32)
    elif m is Modality.AUDIO:
      out["audio"] = jax.ShapeDtypeStruct((b, d.audio_samples), jnp.float32)
    else:
      out["clip_ids"] = jax.ShapeDtypeStruct((b, d.clip_length), jnp.int32)
      out["bert_ids"] = jax.ShapeDtypeStruct((b, d.bert_length), jnp.int32)
      out["gpt2_ids"] = jax.ShapeDtypeStruct((b, d.gpt2_length), jnp.int32)
  return out


def ema_decay(decay: float, step: jax.Array) -> jax.Array:
  """EMA decay warmed up as min(decay, (1 + step) / (10 + step)): early averages track fast."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


class Trainer:
  """A stage on a mesh: shardings, state creation and one compiled step per phase."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
    self.config = config
    self.mesh = mesh
    self.rules = config.sharding_rules
    self.stage = stages.get_stage(config)
    self.models = objectives.Models.from_config(config.model)
    self.optimizer = make_optimizer(config.train, self.stage.parts,
                                    self.stage.part_spans(int(config.train.steps)))
    self._abstract = {p: abstract_part(config.model, p) for p in self.stage.parts}
    batch = int(config.train.batch_size)
    spec = logical_to_spec(("batch",), (batch,), self.rules, mesh)
    self.batch_sharding = NamedSharding(mesh, spec)
    self.replicated = NamedSharding(mesh, PartitionSpec())
    self._steps: dict[int, Any] = {}

  # --- parameters -------------------------------------------------------------------------

  def param_shardings(self) -> Flat:
    return {p: {k: leaf_sharding(v, self.mesh, self.rules) for k, v in leaves.items()}
            for p, leaves in self._abstract.items()}

  def split(self, params: Flat) -> tuple[Flat, Flat]:
    """(trainable, frozen) flat dicts by the stage's selector."""
    trainable, frozen = {}, {}
    for part, leaves in params.items():
      for k, v in leaves.items():
        side = trainable if self.stage.trainable(part, tuple(k.split("/"))) else frozen
        side.setdefault(part, {})[k] = v
    if not trainable:
      raise ValueError(f"stage {self.stage.name!r} has no trainable parameters in this model")
    return trainable, frozen

  def abstract_params(self) -> Flat:
    """Flat `ShapeDtypeStruct`s with shardings of every part the stage reads."""
    shardings = self.param_shardings()
    return {p: {k: jax.ShapeDtypeStruct(unbox(v).shape, unbox(v).dtype,
                                        sharding=shardings[p][k]) for k, v in leaves.items()}
            for p, leaves in self._abstract.items()}

  def _build_state(self, params: Flat) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.optimizer.init(params),
                      ema_params=jax.tree_util.tree_map(jnp.copy, params))

  def state_shardings(self, trainable: Flat) -> TrainState:
    abstract = jax.eval_shape(self._build_state, trainable)
    shardings = {p: {k: v.sharding for k, v in leaves.items()} for p, leaves in trainable.items()}
    return state_sharding_like(abstract, shardings)

  def create_state(self, trainable: Flat) -> TrainState:
    """The initial state, created sharded (optimiser moments shard like their parameters)."""
    shardings = self.state_shardings(trainable)
    return jax.jit(self._build_state, out_shardings=shardings)(trainable)

  def abstract_state(self, trainable: Flat) -> TrainState:
    shardings = self.state_shardings(trainable)
    abstract = jax.eval_shape(self._build_state, trainable)
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

  # --- the step ---------------------------------------------------------------------------

  def _update_mask(self, phase: stages.Phase, trainable: Flat) -> dict[str, dict[str, bool]] | None:
    mask = {p: {k: bool(phase.updates(p, tuple(k.split("/")))) for k in leaves}
            for p, leaves in trainable.items()}
    return None if all(all(m.values()) for m in mask.values()) else mask

  def _step_fn(self, phase: stages.Phase, mask, nulls: Mapping[str, np.ndarray]):
    config, stage, models, optimizer = self.config, self.stage, self.models, self.optimizer
    t = config.train
    # The logged rate: the phase's own part's when it trains one part, else the stage's.
    schedule = learning_rate_schedule(t, part_learning_rates(t).get(phase.part),
                                      stage.part_spans(int(t.steps)).get(phase.part),
                                      part_decays(t).get(phase.part))

    idle = [p for p in mask if not any(mask[p].values())] if mask else []

    def masked(tree):
      if mask is None:
        return tree
      return {p: {k: v if mask[p][k] else jnp.zeros_like(v) for k, v in leaves.items()}
              for p, leaves in tree.items()}

    def step(state: TrainState, frozen: Flat, batch: Mapping[str, jax.Array]):
      rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
      keys = objectives.row_keys(rng, batch["index"])
      batch = dict(batch, **{k: jnp.asarray(v) for k, v in nulls.items()})

      def loss_fn(trainable):
        return stage.loss(phase, models, merge(trainable, frozen), batch, keys, config)

      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      grads = masked(grads)
      grad_norm = optax.global_norm(grads)
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      opt_state = keep_idle_parts(opt_state, state.opt_state, idle)
      params = optax.apply_updates(state.params, masked(updates))
      decay = ema_decay(config.train.ema_decay, state.step)
      ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p,
                                   state.ema_params, params)
      new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      new = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, state)
      metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                     learning_rate=schedule(state.step), finite=finite)
      return new, {k: jnp.asarray(v, jnp.float32) if k != "finite" else v
                   for k, v in metrics.items()}

    return step

  def jitted_step(self, phase_index: int, trainable: Flat, frozen: Flat,
                  nulls: Mapping[str, np.ndarray]):
    """The jitted step of a phase (cached per phase); `nulls`: `train.data.null_inputs`."""
    if phase_index not in self._steps:
      phase = self.stage.phases[phase_index]
      state_sh = self.state_shardings(trainable)
      frozen_sh = {p: {k: v.sharding for k, v in leaves.items()} for p, leaves in frozen.items()}
      fn = self._step_fn(phase, self._update_mask(phase, trainable), nulls)
      # keep_unused: frozen leaves a phase never reads (e.g. the other diffusers' branches) stay
      # in device memory all the same, so the compiled program, and compile-check, count them.
      self._steps[phase_index] = jax.jit(
          fn, in_shardings=(state_sh, frozen_sh, self.batch_sharding),
          out_shardings=(state_sh, self.replicated), donate_argnums=(0,), keep_unused=True)
    return self._steps[phase_index]

  def abstract_inputs(self, phase_index: int) -> tuple[TrainState, Flat, dict]:
    """(state, frozen, batch) as sharded `ShapeDtypeStruct`s: what compile-check lowers with."""
    trainable, frozen = self.split(self.abstract_params())
    phase = self.stage.phases[phase_index]
    batch = batch_shapes(self.config, phase.modalities, phase.batch(self.config))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding)
             for k, v in batch.items()}
    return self.abstract_state(trainable), frozen, batch


def cost_flops(stage: Any) -> float | None:
  """FLOPs of a lowered or compiled program by XLA's cost analysis (None where unsupported)."""
  try:
    cost = stage.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None
