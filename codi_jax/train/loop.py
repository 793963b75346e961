"""`train(config, workdir)`: one stage, from wherever it starts to `config.train.steps`.

Where a run starts, in this order:
  1. the newest complete, readable checkpoint in `<workdir>/checkpoints` (a corrupt or partial
     one is skipped with a message naming it): train state, data iterator and step;
  2. `config.init_from`: model checkpoints (comma-separated; later ones win per part), e.g. the
     earlier stages' `<workdir>/model` or a converted released CoDi;
  3. from scratch: every part initialised by its modules' initialisers.
Frozen parts always come from 2 or 3 (they never change, so checkpoints do not carry them).

While it runs: metrics every `log_every` steps to the console (progress bar), TensorBoard and
`<workdir>/metrics.jsonl` (step time, examples/s, TFLOP/s per device from the compiled step's
FLOP count); sample media in TensorBoard every `sample_every` steps (`codi_jax.train.samples`);
checkpoints every `checkpoint_every` steps (async, keep-N). SIGTERM (preemption) or a first
Ctrl-C makes the run save a checkpoint at the step it reached and exit cleanly; SIGKILL at any
moment loses only the steps since the last checkpoint, and the resumed run repeats them exactly. A
non-finite loss or gradient stops the run with the window of steps it happened in; the state is
never updated by such a step, so no checkpoint holds it. At the end the model (every part the stage
reads, trained parts from the EMA when `export_ema`) is written to `<workdir>/model`, a
`codi_jax.checkpoint` folder that `generate`, `sample` and the next stage's `init_from` read.
The `autoencoders` stage first measures its latents' shift and scale into the exported config
(`latent_stats`); a part loaded from `init_from` keeps the factors it was exported with. The
`autoencoders` and `align_encoders` stages end with their quality checks on held-out data
(`codi_jax.quality.checks`): a table, and `<workdir>/quality.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import shutil
import signal
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from tqdm import tqdm

from codi_jax import checkpoint
from codi_jax.io_utils import atomic_write_text
from codi_jax.quality.checks import STAGE_CHECKS, check_model, format_table
from codi_jax.quality.checks import as_json as quality_json
from codi_jax.parallel.mesh import create_mesh
from codi_jax.train import data as train_data
from codi_jax.train import latent_stats
from codi_jax.train.checkpoints import CheckpointStore
from codi_jax.train.metric_writers import create_writers
from codi_jax.train.samples import SampleLogger
from codi_jax.train.stages import FROZEN_ENCODER_STAGES, get_stage
from codi_jax.train.state import (check_train_settings, init_sources, load_params, merge,
                                  param_count)
from codi_jax.train.step import Trainer, cost_flops

MODEL_DIR = "model"
QUALITY_FILE = "quality.json"
PyTree = Any


class NonFiniteLoss(RuntimeError):
  """The loss or gradient norm became NaN/inf; the message names the steps."""


@dataclasses.dataclass
class Summary:
  stage: str
  start_step: int
  end_step: int
  resumed_from: str  # "checkpoint <step>", "init_from", "scratch"
  final_loss: float | None
  steps_per_second: float | None
  model_dir: str | None
  preempted: bool


class _Preemption:
  """Remembers a SIGTERM, or a first Ctrl-C (SIGINT), until the loop can checkpoint; a second
  Ctrl-C interrupts at once. The old handlers are restored on exit."""

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self._old: dict[int, Any] = {}

  def __enter__(self):
    try:
      self._old = {s: signal.signal(s, self._handle) for s in self._SIGNALS}
    except ValueError:  # not the main thread (e.g. a notebook worker): no preemption handling
      self._old = {}
    return self

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt
    name = signal.Signals(signum).name
    logging.warning("%s received: saving a checkpoint and stopping%s", name,
                    " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
    self.requested = True

  def __exit__(self, *exc):
    for s, old in self._old.items():
      signal.signal(s, old)

  def agreed(self) -> bool:
    """Whether any process was asked to stop (every process must stop at the same step)."""
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.asarray(self.requested))
    return bool(np.any(flags))


def export_model(directory: pathlib.Path, params: dict[str, PyTree],
                 config: ml_collections.ConfigDict) -> None:
  """Writes sharded params ({part: tree}) as a `codi_jax.checkpoint` model folder (collective;
  atomic rename by process 0): one orbax item per part and config.json."""
  directory = directory.absolute()
  tmp = directory.with_name(f".{directory.name}.tmp")
  if jax.process_index() == 0:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
  multihost_utils.sync_global_devices("codi_export_start")
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as ckptr:
    for part, tree in params.items():
      ckptr.save(tmp / part, tree)
  if jax.process_index() == 0:
    (tmp / checkpoint.CONFIG_FILE).write_text(config.to_json_best_effort(indent=2,
                                                                         sort_keys=True))
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
      directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
  multihost_utils.sync_global_devices("codi_export_done")


def _run_config(config: ml_collections.ConfigDict, phase: str) -> dict[str, Any]:
  return {"config": json.loads(config.to_json_best_effort()), "phase": phase}


def train(config: ml_collections.ConfigDict, workdir: str, *, export: bool = True,
          progress: bool = True) -> Summary:
  """Trains `config.stage` in `workdir` (see the module docstring); returns a summary."""
  check_train_settings(config.train)
  workdir_path = pathlib.Path(workdir)
  if workdir_path.exists() and not workdir_path.is_dir():
    raise ValueError(f"workdir {workdir_path} exists and is not a folder")
  primary = jax.process_index() == 0
  if primary:
    workdir_path.mkdir(parents=True, exist_ok=True)
  mesh = create_mesh(config.mesh.ici, config.mesh.dcn)
  # Latent parts loaded from init_from bring their normalisation with them.
  config = latent_stats.adopt(config, init_sources(config.init_from),
                              get_stage(config).parts)
  trainer = Trainer(config, mesh)
  stage, total = trainer.stage, int(config.train.steps)
  devices_per_batch = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
  for phase in stage.phases:
    if phase.batch(config) % devices_per_batch:
      raise ValueError(f"the batch size {phase.batch(config)} of phase {phase.name} must be a "
                       f"multiple of the mesh's data x fsdp = {devices_per_batch} devices")
  tokenizers = train_data.load_tokenizers(config.data.tokenizers)
  nulls = train_data.null_inputs(config, tokenizers)

  params, origin = load_params(config, stage.parts, mesh)
  if train_data.cache_paths(config):
    if stage.name not in FROZEN_ENCODER_STAGES:
      raise ValueError(f"config.data.cache: stage {stage.name} trains encoders, so it cannot "
                       f"read their cached outputs (stages that can: {FROZEN_ENCODER_STAGES})")
    train_data.check_cache(config, params)
  trainable, frozen = trainer.split(params)
  del params
  logging.info("stage %s: %s trainable, %s frozen parameters on a %s mesh", stage.name,
               f"{param_count(trainable):,}", f"{param_count(frozen):,}", dict(mesh.shape))

  store = CheckpointStore(workdir_path, keep=config.train.keep_checkpoints,
                          async_save=config.train.async_checkpoints)
  start = store.latest_valid_step()
  state = trainer.create_state(trainable)
  del trainable
  phase_index = stage.phase_at(start or 0, total)
  iterator = _phase_data(config, stage, phase_index)
  if start is not None:
    # A checkpoint at step s holds the iterator of the phase step s reads (see the save below).
    state, _ = store.restore(start, _abstract(state), iterator=iterator)
    resumed = f"checkpoint {start}"
  else:
    start = 0
    resumed = "init_from" if any(o != "initialised" for o in origin.values()) else "scratch"
  logging.info("starting %s at step %d (%s)", stage.name, start, resumed)

  writer = create_writers(workdir_path, is_primary=primary, resume_step=start)
  samples = SampleLogger.create(config, trainer, tokenizers, frozen)
  if primary:
    atomic_write_text(workdir_path / "config.json", config.to_json_best_effort(indent=2))
  step_fn, compiled_phase, flops = None, None, None
  window_start, last_metrics, preempted = start, None, False
  bar = tqdm(total=total, initial=start, desc=stage.name, disable=not (progress and primary),
             dynamic_ncols=True)
  t_last, steps_since = time.perf_counter(), 0
  all_finite = jnp.asarray(True)
  step = start
  with _Preemption() as preemption:
    while step < total:
      phase_index = stage.phase_at(step, total)
      phase = stage.phases[phase_index]
      if compiled_phase != phase_index:
        batch = _next_batch(iterator, tokenizers, config, mesh)
        t0 = time.perf_counter()
        jitted = trainer.jitted_step(phase_index, state.params, frozen, nulls)
        step_fn = jitted.lower(state, frozen, batch).compile()
        flops = cost_flops(step_fn)
        compile_s = time.perf_counter() - t0
        logging.info("compiled %s in %.1f s (%s FLOPs/step/device)", phase.name, compile_s,
                     f"{flops:.3g}" if flops else "unknown")
        writer.write_scalars(step, {"compile_seconds": compile_s})
        compiled_phase, examples = phase_index, phase.batch(config)
        t_last, steps_since = time.perf_counter(), 0
      else:
        batch = _next_batch(iterator, tokenizers, config, mesh)
      state, metrics = step_fn(state, frozen, batch)
      all_finite = all_finite & metrics["finite"]
      step += 1
      if step < total and stage.phase_at(step, total) != phase_index:  # the next phase's data
        iterator = _phase_data(config, stage, phase_index + 1)
      steps_since += 1
      bar.update(1)
      log_now = step % config.train.log_every == 0 or step == total
      ckpt_now = step % config.train.checkpoint_every == 0 or step == total
      if log_now or ckpt_now:
        if not bool(jax.device_get(all_finite)):
          bar.close()
          store.wait()
          raise NonFiniteLoss(f"non-finite loss or gradient between steps {window_start + 1} and "
                              f"{step} of stage {stage.name}; the state was not updated by it "
                              f"and the last checkpoint ({store.latest_valid_step()}) is intact")
        window_start = step
      if log_now:
        values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
        elapsed = time.perf_counter() - t_last
        rate = steps_since / elapsed if elapsed > 0 else float("nan")
        values.update(step_seconds=1.0 / rate, examples_per_second=rate * examples,
                      examples_per_second_per_device=rate * examples / jax.device_count())
        if flops:
          values["tflops_per_second_per_device"] = flops * rate / 1e12
        writer.write_scalars(step, values)
        bar.set_postfix(loss=f"{values['loss']:.4f}")
        last_metrics, t_last, steps_since = values, time.perf_counter(), 0
      stop = preemption.agreed() if (log_now or preemption.requested or
                                     jax.process_count() > 1 and ckpt_now) else False
      if ckpt_now or stop:
        store.save(step, state, iterator=iterator,
                   config=_run_config(config, stage.phases[stage.phase_at(step, total)].name),
                   force=stop)
      if stop:
        preempted = True
        break
      if samples and samples.due(step, total):
        samples.write(step, phase_index, state, writer)
  bar.close()
  store.wait()
  writer.flush()
  model_dir = None
  if export and not preempted:
    model_dir = workdir_path / MODEL_DIR
    trained = state.ema_params if config.train.export_ema else state.params
    params = merge(trained, frozen)
    config = _calibrate_latents(config, trainer, params, tokenizers, mesh)
    export_model(model_dir, params, config)
    if primary and stage.name in STAGE_CHECKS and config.train.quality_examples:
      _quality_report(model_dir, workdir_path, stage.name, config, tokenizers)
    model_dir = str(model_dir)
  writer.close()
  store.close()
  rate = last_metrics and 1.0 / last_metrics["step_seconds"]
  return Summary(stage.name, start, step, resumed, last_metrics and last_metrics["loss"], rate,
                 model_dir, preempted)


def _phase_data(config: ml_collections.ConfigDict, stage, index: int) -> Iterator:
  """The batch iterator of the stage's phase `index` (its own seed and batch size)."""
  phase = stage.phases[index]
  return iter(train_data.build(config, phase.modalities, seed=config.seed + index,
                               batch_size=phase.batch(config)))


def _quality_report(model_dir: pathlib.Path, workdir: pathlib.Path, stage: str,
                    config: ml_collections.ConfigDict, tokenizers) -> None:
  """The stage's quality checks on its exported model: printed, and `<workdir>/quality.json`."""
  t0 = time.perf_counter()
  checks = check_model(str(model_dir), [stage], num_examples=int(config.train.quality_examples),
                       tokenizers=tokenizers)
  atomic_write_text(workdir / QUALITY_FILE, json.dumps(quality_json(checks), indent=2))
  print(f"{stage} quality ({config.train.quality_examples} held-out examples, "
        f"{time.perf_counter() - t0:.0f} s):\n{format_table(checks)}", flush=True)


def _calibrate_latents(config, trainer: Trainer, params, tokenizers, mesh
                       ) -> ml_collections.ConfigDict:
  """After the autoencoders stage: the trained latent parts' shift and scale, measured on
  `config.train.latent_stats_examples` training examples (`latent_stats`), into the config the
  model is exported with."""
  parts = [p for p in trainer.stage.parts if p in latent_stats.LATENT_PARTS]
  if trainer.stage.name != "autoencoders" or not parts:
    return config
  modalities = sorted({m for phase in trainer.stage.phases for m in phase.modalities})
  iterator = iter(train_data.build(config, modalities, seed=config.seed + len(modalities)))
  count = -(-int(config.train.latent_stats_examples) // int(config.train.batch_size))
  batches = (_next_batch(iterator, tokenizers, config, mesh) for _ in range(count))
  stats = latent_stats.measure(trainer.models, params, batches, parts)
  for part, values in stats.items():
    logging.info("latent statistics of %s: shift %.4g, scale %.4g", part,
                 values["shift_factor"], values["scale_factor"])
  return latent_stats.calibrate(config, stats)


def _abstract(state) -> Any:
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def _next_batch(iterator, tokenizers, config, mesh) -> dict[str, jax.Array]:
  host = next(iterator)
  arrays = train_data.arrays(host, tokenizers, config)
  return train_data.place(arrays, mesh, config.sharding_rules)

