"""Performance benchmarks: train-step and joint-sampling throughput, FLOP/s, MFU and memory.

`bench_train` times the real compiled train step of a stage (`codi_jax.train.step.Trainer`, the
step `codi-jax train` runs) on one fixed batch from the stage's own data pipeline.
`bench_sample` times `CoDiPipeline`'s compiled sampling program (joint DDIM with classifier-free
guidance, then decoding) on a batch of text-prompted items laid out over the mesh as
`codi_jax.sample` lays them out. Both compile ahead of time (timed apart), run `warmup`
iterations, then time `steps` iterations with one in flight (the host never waits for more than
the previous one, so dispatch overlaps execution as in a real run).

FLOPs come from XLA's cost analysis of the compiled program, per device. XLA counts a loop body
once, whatever its trip count: the sampler's DDIM `lax.scan` is corrected by adding (steps - 1)
guided network calls (each costed from its own lowered program); other loops (Optimus' token-by-
token text decoding) still count once. MFU = achieved FLOP/s per device / the device's dense peak
for the compute dtype (`PEAKS`); it is None when the peak is unknown (CPUs) unless one is given.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import resource
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from codi_jax import checkpoint, components
from codi_jax.data import synthetic
from codi_jax.modality import Modality
from codi_jax.models.codi import CoDiUNet
from codi_jax.parallel.mesh import create_mesh
from codi_jax.parallel.sharding import logical_shardings, logical_to_spec
from codi_jax.pipeline import CoDiPipeline, Program, load_model, load_tokenizers
from codi_jax.sample.job import SHARDED_PARTS, batch_shards
from codi_jax.train import data as train_data
from codi_jax.train.state import Flat, flatten, load_params, param_count
from codi_jax.train.step import Trainer, cost_flops


@dataclasses.dataclass(frozen=True)
class Peak:
  """Dense (no sparsity) TFLOP/s of one device, per matmul mode."""

  bf16: float
  fp32: float | None  # IEEE float32 (None: no native mode, e.g. TPUs)
  tf32: float | None = None  # NVIDIA: what XLA's default float32 matmul precision runs


# Vendor data sheets. Matched in order as substrings of the lower-cased `device_kind`, so a
# specific name comes before its prefix ("TPU v5 lite" is v5e, "TPU v5" is v5p).
PEAKS: tuple[tuple[str, Peak], ...] = (
    ("h100 pcie", Peak(756.0, 51.0, 378.0)),
    ("h100", Peak(989.0, 67.0, 495.0)),
    ("h200", Peak(989.0, 67.0, 495.0)),
    ("a100", Peak(312.0, 19.5, 156.0)),
    ("tpu v4", Peak(275.0, None)),
    ("tpu v5 lite", Peak(197.0, None)),
    ("tpu v5e", Peak(197.0, None)),
    ("tpu v5", Peak(459.0, None)),
    ("tpu v6 lite", Peak(918.0, None)),
    ("tpu v6e", Peak(918.0, None)),
)


def peak_tflops(device_kind: str, dtype: str, given: float | None = None
                ) -> tuple[float | None, str]:
  """(peak TFLOP/s per device, what it is) for the compute `dtype` on `device_kind`; `given`
  wins. float32 uses the mode XLA's default matmul precision runs (TF32 on NVIDIA GPUs, one
  bf16 pass on TPUs) unless `jax_default_matmul_precision` asks for more."""
  if given is not None:
    if not given > 0:
      raise ValueError(f"--peak_tflops must be positive, got {given}")
    return float(given), "given"
  kind = device_kind.lower()
  match = next(((name, p) for name, p in PEAKS if name in kind), None)
  if match is None:
    return None, f"unknown for {device_kind!r} (give --peak_tflops)"
  name, peak = match
  if jnp.dtype(dtype) == jnp.bfloat16:
    return peak.bf16, f"{name} bf16 dense"
  precise = str(jax.config.jax_default_matmul_precision or "default").lower() in (
      "highest", "float32") and peak.fp32 is not None
  if precise:
    return peak.fp32, f"{name} fp32 dense"
  if peak.tf32 is not None:
    return peak.tf32, f"{name} tf32 dense (XLA's default f32 matmul precision)"
  return peak.bf16, f"{name} bf16 dense (XLA's default f32 matmul precision: one bf16 pass)"


def peak_memory() -> tuple[int, str]:
  """(bytes, what): the largest `peak_bytes_in_use` of this process's devices, or the process's
  peak resident memory where devices do not report it (CPU)."""
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
  if peaks:
    return int(max(peaks)), "device peak_bytes_in_use (largest of this process's devices)"
  # ru_maxrss is in KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS (host)"


def time_iterations(step: Callable[[], Any], steps: int, warmup: int, desc: str,
                    progress: bool = True) -> tuple[float, Any]:
  """(seconds of the `steps` timed calls, the last call's result): `warmup` calls first, each
  waited for; then `steps` calls with one in flight (each waits for the previous one)."""
  if steps < 1 or warmup < 0:
    raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
  for _ in range(warmup):
    jax.block_until_ready(step())
  bar = tqdm(total=steps, desc=desc, disable=not progress, dynamic_ncols=True)
  start = time.perf_counter()
  pending = None
  for _ in range(steps):
    out = step()
    if pending is not None:
      jax.block_until_ready(pending)
      bar.update(1)
    pending = out
  jax.block_until_ready(pending)
  seconds = time.perf_counter() - start
  bar.update(1)
  bar.close()
  return seconds, pending


def _device_info(mesh: Mesh) -> dict[str, Any]:
  device = mesh.devices.flat[0]
  return dict(platform=device.platform, device_kind=device.device_kind,
              devices=int(mesh.devices.size), processes=jax.process_count(),
              mesh={k: int(v) for k, v in mesh.shape.items()}, jax_version=jax.__version__)


def _rates(result: dict[str, Any], flops_per_device: float | None, per_second: float,
           peak: tuple[float | None, str]) -> None:
  """Adds TFLOP/s per device, the peak and MFU to `result` (iterations of `flops_per_device`
  FLOPs each at `per_second`)."""
  tflops = flops_per_device * per_second / 1e12 if flops_per_device else None
  result.update(tflops_per_s_per_device=tflops, peak_tflops_per_device=peak[0],
                peak_basis=peak[1],
                mfu=tflops / peak[0] if tflops is not None and peak[0] else None)
  result["memory_peak_bytes"], result["memory_basis"] = peak_memory()


# --- training ---------------------------------------------------------------------------------

def _random_train_params(config: ml_collections.ConfigDict, trainer: Trainer, seed: int) -> Flat:
  """Host-side random weights (`checkpoint.random_model_params`: no compiled init) of the stage's
  parts, placed in the trainer's shards."""
  parts = trainer.stage.parts
  host = checkpoint.random_model_params(config, seed, parts)
  shardings = trainer.param_shardings()
  params: Flat = {}
  for part in parts:
    leaves = flatten(host[part])
    if set(leaves) != set(shardings[part]):
      raise ValueError(f"random weights of part {part!r} do not match the trainer's layout: "
                       f"{sorted(set(leaves) ^ set(shardings[part]))[:5]}")
    params[part] = {k: jax.make_array_from_callback(v.shape, shardings[part][k],
                                                    lambda i, v=v: v[i])
                    for k, v in leaves.items()}
  return params


def bench_train(config: ml_collections.ConfigDict, *, steps: int = 10, warmup: int = 2,
                init: str = "random", peak: float | None = None, progress: bool = True
                ) -> dict[str, Any]:
  """Times the compiled train step of `config.stage` (its first phase) on the config's mesh.

  init: "random" (host-side random weights, no compiled init), or "xla" (the modules' own
  initialisers, jitted into their shards: faster for full-size models on accelerators).
  `config.init_from` checkpoints, when set, are loaded either way (the parts they hold).
  """
  if init not in ("random", "xla"):
    raise ValueError(f"init must be 'random' or 'xla', got {init!r}")
  mesh = create_mesh(config.mesh.ici, config.mesh.dcn)
  trainer = Trainer(config, mesh)
  stage, phase = trainer.stage, trainer.stage.phases[0]
  batch_size = phase.batch(config)
  devices_per_batch = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
  if batch_size % devices_per_batch:
    raise ValueError(f"the batch size {batch_size} of phase {phase.name} must be a multiple of "
                     f"the mesh's data x fsdp = {devices_per_batch} devices")
  start = time.perf_counter()
  if init == "xla" or config.init_from:
    params, _ = load_params(config, stage.parts, mesh)
  else:
    params = _random_train_params(config, trainer, config.seed)
  trainable, frozen = trainer.split(params)
  del params
  counts = param_count(trainable), param_count(frozen)
  state = trainer.create_state(trainable)
  del trainable  # the state holds the trainable leaves now
  tokenizers = train_data.load_tokenizers(config.data.tokenizers)
  nulls = train_data.null_inputs(config, tokenizers)
  iterator = iter(train_data.build(config, phase.modalities, seed=config.seed,
                                   batch_size=batch_size))
  host = train_data.arrays(next(iterator), tokenizers, config)
  batch = train_data.place(host, mesh, config.sharding_rules)
  jax.block_until_ready((state, frozen, batch))
  setup_s = time.perf_counter() - start

  start = time.perf_counter()
  jitted = trainer.jitted_step(0, state.params, frozen, nulls)
  compiled = jitted.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - start
  flops = cost_flops(compiled)
  logging.info("compiled %s in %.1f s (%s FLOPs/step/device)", phase.name, compile_s,
               f"{flops:.3g}" if flops else "unknown")

  def one_step():
    nonlocal state
    state, metrics = compiled(state, frozen, batch)
    return metrics

  seconds, metrics = time_iterations(one_step, steps, warmup, f"bench {stage.name}", progress)
  rate = steps / seconds
  info = _device_info(mesh)
  notes = []
  if len(stage.phases) > 1:
    notes.append(f"stage {stage.name} has {len(stage.phases)} phases; only the first "
                 f"({phase.name}) is timed")
  result = dict(
      kind="train", preset=config.get("preset"), stage=stage.name, phase=phase.name,
      global_batch=batch_size, dtype=str(config.model.dtype), remat=str(config.model.remat),
      image_size=int(config.data.image_size), trainable_params=counts[0],
      frozen_params=counts[1], **info, setup_s=setup_s, compile_s=compile_s,
      warmup=warmup, steps=steps, timed_s=seconds, steps_per_s=rate,
      examples_per_s=rate * batch_size,
      examples_per_s_per_device=rate * batch_size / info["devices"],
      flops_per_step_per_device=flops, final_loss=float(jax.device_get(metrics["loss"])),
      notes=notes)
  _rates(result, flops, rate, peak_tflops(info["device_kind"], config.model.dtype, peak))
  return result


# --- sampling ---------------------------------------------------------------------------------

def _network_call_flops(pipe: CoDiPipeline, program: Program, rows: int) -> float | None:
  """Global FLOPs of one guided network call of `program` (the doubled batch of `rows`), from
  its lowered program (no compilation)."""
  model = CoDiUNet(dataclasses.replace(pipe.codi_config, alignment=program.alignment))
  x = {m: jax.ShapeDtypeStruct((2 * rows,) + tuple(shape), jnp.float32)
       for m, shape in program.row_shapes}
  t = jax.ShapeDtypeStruct((2 * rows,), jnp.int32)
  c = jax.ShapeDtypeStruct((2 * rows, 1, pipe.codi_config.context_dim), jnp.float32)
  params = pipe.program_params(program)["diffusers"]
  lowered = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c)).lower(params, x, t, c)
  return cost_flops(lowered)


def _prompts(seed: int, count: int) -> list[str]:
  """Captions of the synthetic dataset's validation split (what the demo prompts with)."""
  source = synthetic.SplitSource(synthetic.SyntheticConfig(seed=seed), "validation")
  return [source[i % len(source)].text for i in range(count)]


def bench_sample(config: ml_collections.ConfigDict, outputs: Sequence[Modality | str], *,
                 tokenizers: str | None, ddim_steps: int | None = None, batch: int | None = None,
                 ckpt: str | None = None, steps: int = 3, warmup: int = 1,
                 peak: float | None = None, progress: bool = True) -> dict[str, Any]:
  """Times the compiled joint sampling program for `outputs` on batches of `batch` items (one
  text prompt and one sample each; default one per batch shard), weights random unless `ckpt`
  (whose config then replaces `config`)."""
  if ckpt:
    config, params = load_model(ckpt)
  else:
    params = checkpoint.random_model_params(config, config.seed)
  mesh = create_mesh(config.mesh.ici, config.mesh.dcn)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  shards = batch_shards(mesh, rules)
  batch = shards if batch is None else batch
  if batch < 1 or batch % shards:
    raise ValueError(f"--batch {batch} must be a positive multiple of the mesh's {shards} batch "
                     "shard(s)")
  ddim_steps = int(ddim_steps or config.sample.ddim_steps)
  shardings = {p: logical_shardings(components.component(p).shapes(config.model), mesh, rules)
               for p in SHARDED_PARTS if p in params}
  start = time.perf_counter()
  pipe = CoDiPipeline(config, params, load_tokenizers(tokenizers), shardings)
  del params
  items = []
  for i, prompt in enumerate(_prompts(config.seed, batch)):
    settings = pipe.plan(["text"], outputs, ddim_steps=ddim_steps, seed=config.seed + i,
                         guidance_scale=config.sample.guidance_scale, eta=config.sample.eta)
    items.append((settings, pipe.prepare(settings, {"text": prompt})))
  settings = items[0][0]
  program = Program.of(settings)
  host = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *[r for _, r in items])
  sharding = NamedSharding(mesh, logical_to_spec(("batch",), (batch,), rules, mesh))
  rows = jax.tree_util.tree_map(
      lambda a: jax.make_array_from_callback(a.shape, sharding, lambda i: a[i]), host)
  program_params = pipe.program_params(program)
  setup_s = time.perf_counter() - start

  start = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = jax.jit(pipe.program_fn(program), out_shardings=sharding).lower(
        program_params, rows).compile()
  compile_s = time.perf_counter() - start
  flops, notes = _sample_flops(pipe, program, compiled, batch, shards)

  seconds, _ = time_iterations(lambda: compiled(program_params, rows), steps, warmup,
                               f"bench sample {'+'.join(settings.outputs)}", progress)
  rate = steps / seconds  # batches per second
  info = _device_info(mesh)
  result = dict(
      kind="sample", preset=config.get("preset"), outputs=list(settings.outputs),
      inputs=list(settings.inputs), ddim_steps=ddim_steps,
      guidance_scale=settings.guidance_scale, batch_items=batch, samples_per_item=1,
      latent_shapes={m.value: list(s) for m, s in program.row_shapes},
      image_size=settings.image_size, audio_seconds=settings.audio_seconds,
      alignment=settings.alignment, dtype=str(config.model.dtype),
      checkpoint=ckpt or "random weights", **info, setup_s=setup_s, compile_s=compile_s,
      warmup=warmup, steps=steps, timed_s=seconds, batches_per_s=rate,
      items_per_s=rate * batch, items_per_s_per_device=rate * batch / info["devices"],
      ddim_steps_per_s=rate * ddim_steps, flops_per_batch_per_device=flops,
      flops_per_item=flops * info["devices"] / batch if flops else None, notes=notes)
  _rates(result, flops, rate, peak_tflops(info["device_kind"], config.model.dtype, peak))
  return result


def _sample_flops(pipe: CoDiPipeline, program: Program, compiled: Any, batch: int, shards: int
                  ) -> tuple[float | None, list[str]]:
  """FLOPs per device of one sampling batch: the compiled program's count plus the DDIM loop's
  uncounted iterations (see the module docstring)."""
  flops = cost_flops(compiled)
  call = _network_call_flops(pipe, program, batch)
  if flops is None or call is None:
    return None, ["XLA reports no FLOP count on this backend"]
  call /= shards
  notes = []
  if program.ddim_steps > 1 and flops < program.ddim_steps * call:
    flops += (program.ddim_steps - 1) * call
    notes.append(f"FLOPs: XLA counts the DDIM loop body once; added {program.ddim_steps - 1} "
                 f"guided network calls of {call:.3g} FLOPs/device each")
  if Modality.TEXT in program.outputs:
    notes.append("FLOPs: Optimus' text decoding loop is counted once, not per token")
  return flops, notes


# --- the report -------------------------------------------------------------------------------

_GIB = 1024 ** 3


def _fmt(value: Any, unit: str = "", digits: int = 3) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, float):
    return f"{value:.{digits}g}{unit}"
  return f"{value}{unit}"


def report(result: dict[str, Any]) -> str:
  """A readable table of a `bench_train` / `bench_sample` result."""
  r = result
  rows = [("device", f"{r['devices']} x {r['device_kind']} ({r['platform']}), mesh {r['mesh']}")]
  if r["kind"] == "train":
    title = f"bench train: {r['stage']} ({r['preset']}), phase {r['phase']}"
    rows += [("global batch", r["global_batch"]), ("dtype / remat", f"{r['dtype']} / {r['remat']}"),
             ("image size", r["image_size"]),
             ("parameters", f"{r['trainable_params']:,} trainable, {r['frozen_params']:,} frozen"),
             ("compile", _fmt(r["compile_s"], " s")),
             ("steps/s", _fmt(r["steps_per_s"])), ("examples/s", _fmt(r["examples_per_s"])),
             ("examples/s/device", _fmt(r["examples_per_s_per_device"])),
             ("FLOPs/step/device", _fmt(r["flops_per_step_per_device"])),
             ("final loss", _fmt(r["final_loss"], digits=5))]
  else:
    title = f"bench sample: text -> {'+'.join(r['outputs'])} ({r['preset']}, {r['checkpoint']})"
    rows += [("batch", f"{r['batch_items']} items x {r['samples_per_item']} sample"),
             ("DDIM steps / guidance", f"{r['ddim_steps']} / {r['guidance_scale']}"),
             ("latents", r["latent_shapes"]), ("dtype", r["dtype"]),
             ("compile", _fmt(r["compile_s"], " s")),
             ("items/s", _fmt(r["items_per_s"])),
             ("items/s/device", _fmt(r["items_per_s_per_device"])),
             ("DDIM steps/s", _fmt(r["ddim_steps_per_s"])),
             ("FLOPs/item", _fmt(r["flops_per_item"]))]
  peak = r["peak_tflops_per_device"]
  rows += [("TFLOP/s/device", _fmt(r["tflops_per_s_per_device"], digits=4)),
           ("peak TFLOP/s/device", f"{_fmt(peak)} ({r['peak_basis']})"),
           ("MFU", "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.2f} %"),
           ("memory peak", f"{r['memory_peak_bytes'] / _GIB:.2f} GiB ({r['memory_basis']})"),
           ("timed", f"{r['steps']} iterations in {r['timed_s']:.3f} s after {r['warmup']} "
                     f"warm-up")]
  width = max(len(k) for k, _ in rows)
  lines = [title] + [f"  {k:<{width}}  {v}" for k, v in rows]
  lines += [f"  note: {n}" for n in r["notes"]]
  return "\n".join(lines)
