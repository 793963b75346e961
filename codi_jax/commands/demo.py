"""codi-jax demo: the main job. For now: a tiny random-weight joint sampling run.

  codi-jax demo [--config configs/codi.py:tiny] [--workdir outputs/demo]

What exists today is the diffusion core, so the demo builds the tiny CoDi diffusers with random
weights, creates them sharded over a mesh of all local devices, and samples image, video, audio
and text latents JOINTLY (one network call per DDIM step, classifier-free guidance, latent
alignment) from random stand-in condition tokens. It writes latent previews (PNG), the raw
latents (`latents.npz`), `result.json` with every setting, seed and timing, and `index.html`.
Decoders (VAEs, vocoder, Optimus), prompt encoders, training and the synthetic dataset arrive with
later issues; the demo will grow into the full train-then-generate run.
"""

from __future__ import annotations

import html
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from codi_jax.commands import common
from codi_jax.diffusion.ddim import DDIMSampler, initial_noise
from codi_jax.diffusion.schedule import ScheduleConfig
from codi_jax.io_utils import (atomic_write_json, atomic_write_npz, atomic_write_png,
                               atomic_write_text)
from codi_jax.modality import Modality
from codi_jax.models.codi import CoDiUNet, codi_config_from_dict, init_params
from codi_jax.parallel.mesh import create_mesh
from codi_jax.parallel.sharding import sharded_init

WORKDIR = flags.DEFINE_string("workdir", "outputs/demo", "Where the demo writes its outputs.")


def latent_shapes(sample, model_cfg, outputs: list[Modality]) -> dict[Modality, tuple[int, ...]]:
  n, s = sample.num_samples, sample.image_latent_size
  shapes = {}
  for m in outputs:
    branch = model_cfg.branches.get(m.branch)
    if branch is None:
      raise ValueError(f"the configured model has no {m.branch} to generate {m.value}")
    c = branch.in_channels
    shapes[m] = {Modality.IMAGE: (n, s, s, c), Modality.VIDEO: (n, sample.num_frames, s, s, c),
                 Modality.AUDIO: (n, sample.audio_latent_frames, sample.audio_latent_bins, c),
                 Modality.TEXT: (n, c)}[m]
  return shapes


def _to_uint8(x: np.ndarray) -> np.ndarray:
  lo, hi = float(x.min()), float(x.max())
  return np.round(255 * (x - lo) / max(hi - lo, 1e-8)).astype(np.uint8)


def preview(modality: Modality, latent: np.ndarray) -> np.ndarray:
  """A viewable picture of one sample's latent (channels 0-2 as RGB, frames side by side)."""
  up = lambda a: np.kron(a, np.ones((8, 8) + (1,) * (a.ndim - 2), np.uint8))
  if modality is Modality.IMAGE:
    return up(_to_uint8(latent[..., :3]))
  if modality is Modality.VIDEO:
    return up(_to_uint8(np.concatenate(list(latent[..., :3]), axis=1)))
  if modality is Modality.AUDIO:  # [T, M, C]: mel bins up, time right
    return up(_to_uint8(latent[..., 0].T[::-1]))
  side = int(np.ceil(np.sqrt(latent.size)))  # text: the latent vector as a square
  return up(_to_uint8(np.pad(latent, (0, side * side - latent.size)).reshape(side, side)))


def main(argv: list[str]) -> int:
  del argv
  config = common.CONFIG.value
  workdir = pathlib.Path(WORKDIR.value)
  outputs = [Modality.parse(m) for m in config.sample.outputs.split(",") if m]
  model_cfg = codi_config_from_dict(config.model)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  stages = tqdm(total=4, desc="demo", unit="stage", disable=jax.process_index() != 0)

  mesh = create_mesh(dict(config.mesh.ici), dict(config.mesh.dcn))
  stages.set_postfix_str(f"init on mesh {dict(mesh.shape)}")
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params, _ = sharded_init(lambda: init_params(model_cfg, jax.random.key(config.seed)),
                             mesh, rules)
    stages.update()

    model = CoDiUNet(model_cfg)
    sampler = DDIMSampler(lambda p, x, t, c: model.apply({"params": p}, x, t, c),
                          config.sample.ddim_steps, config.sample.eta,
                          schedule=ScheduleConfig(**config.diffusion))
    rng = jax.random.key(config.seed + 1)
    shapes = latent_shapes(config.sample, model_cfg, outputs)
    x_T = initial_noise(jax.random.fold_in(rng, 0), shapes)
    n, d = config.sample.num_samples, model_cfg.context_dim
    unit = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    cond = unit(jax.random.normal(jax.random.fold_in(rng, 1), (n, 1, d)))  # stand-in prompt
    uncond = jnp.broadcast_to(unit(jax.random.normal(jax.random.fold_in(rng, 2), (1, 1, d))),
                              cond.shape)
    # Every process computed the same values; make them global (replicated) arrays on the mesh.
    replicated = NamedSharding(mesh, PartitionSpec())
    to_global = lambda a: jax.make_array_from_callback(a.shape, replicated,
                                                       lambda idx: np.asarray(a)[idx])
    x_T, cond, uncond = jax.tree_util.tree_map(to_global, (x_T, cond, uncond))

    def timed_sample(stage: str):
      stages.set_postfix_str(stage)
      start = time.perf_counter()
      result = sampler(params, x_T, cond, uncond, config.sample.guidance_scale, rng)
      jax.block_until_ready(result.samples)
      stages.update()
      return result, time.perf_counter() - start

    _, first = timed_sample("compile + first sample")
    out, steady = timed_sample("second sample (compiled)")

  samples = {m: np.asarray(v) for m, v in
             multihost_utils.process_allgather(out.samples, tiled=True).items()}
  stages.update()
  stages.close()
  if jax.process_index() != 0:  # one writer; every process ran the same computation
    return 0
  files = []
  for m, arr in samples.items():
    if not np.all(np.isfinite(arr)):
      raise FloatingPointError(f"{m.value} samples are not finite")
    for i, latent in enumerate(arr):
      name = f"{m.value}_{i}.png"
      atomic_write_png(workdir / name, preview(m, latent))
      files.append((m.value, i, name))
  atomic_write_npz(workdir / "latents.npz", **{m.value: a for m, a in samples.items()})
  result = dict(
      what="tiny random-weight joint sampling of latents (decoders arrive with later issues)",
      preset=config.preset, outputs=[m.value for m in outputs], seed=config.seed,
      ddim_steps=config.sample.ddim_steps, eta=config.sample.eta,
      guidance_scale=config.sample.guidance_scale, alignment=model_cfg.alignment.value,
      num_samples=n, latent_shapes={m.value: list(s) for m, s in shapes.items()},
      devices=len(jax.devices()), processes=jax.process_count(), mesh=dict(mesh.shape),
      sampler_traces=sampler.trace_count,
      seconds_compile_and_first_sample=round(first, 3), seconds_compiled_sample=round(steady, 3),
      latent_stats={m.value: dict(mean=float(a.mean()), std=float(a.std()))
                    for m, a in samples.items()})
  atomic_write_json(workdir / "result.json", result)
  cells = "\n".join(
      f'<figure><img src="{html.escape(f)}" style="image-rendering:pixelated">'
      f"<figcaption>{html.escape(m)} #{i}</figcaption></figure>" for m, i, f in files)
  atomic_write_text(workdir / "index.html", (
      "<!doctype html><meta charset=utf-8><title>codi-jax demo</title>"
      "<style>body{font-family:sans-serif}figure{display:inline-block;margin:8px}</style>"
      f"<h1>codi-jax demo: joint latent sampling</h1><p>{html.escape(result['what'])}; "
      f"preset {config.preset}, {config.sample.ddim_steps} DDIM steps, guidance "
      f"{config.sample.guidance_scale}, alignment {model_cfg.alignment.value}.</p>\n{cells}\n"))
  print(f"\nNOTE: {result['what']}.")
  print(f"Sampled {', '.join(m.value for m in outputs)} jointly: {n} samples, "
        f"{config.sample.ddim_steps} DDIM steps; compile+first {first:.1f}s, "
        f"compiled {steady:.2f}s.")
  print(f"Outputs in {workdir.resolve()}: index.html, result.json, latents.npz, "
        f"{len(files)} PNG previews")
  return 0
