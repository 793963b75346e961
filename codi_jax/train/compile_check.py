"""Ahead-of-time compilation of a stage's real train step for a TPU topology, on any machine.

With the `tpu` extra (libtpu), `jax.experimental.topologies` describes e.g. `v5p:4x4x4` (64
chips) without the chips; the train step is lowered against sharded `ShapeDtypeStruct`s on a mesh
over those devices and compiled by the TPU compiler. Nothing is allocated. The compiled program
reports per-chip memory (arguments, outputs, temporaries, code) and FLOPs per step, compared with
the chip's HBM.
"""

from __future__ import annotations

import time
from typing import Any

import ml_collections

from codi_jax.parallel.mesh import create_mesh
from codi_jax.train import data as train_data
from codi_jax.train.step import Trainer

GIB = 1024 ** 3
# HBM per chip by TPU generation (the prefix of a topology name).
HBM_BYTES = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5litepod": 16 * GIB, "v5p": 95 * GIB,
             "v6e": 32 * GIB}


def hbm_bytes(topology: str) -> int:
  generation = topology.split(":")[0].lower()
  if generation not in HBM_BYTES:
    raise ValueError(f"unknown TPU generation {generation!r} in {topology!r}; known: "
                     f"{sorted(HBM_BYTES)}")
  return HBM_BYTES[generation]


def topology_devices(topology: str) -> list[Any]:
  """The devices of a TPU topology such as 'v5p:4x4x4' (needs libtpu: the `tpu` extra)."""
  try:
    from jax.experimental import topologies
    desc = topologies.get_topology_desc(topology, "tpu")
  except Exception as e:  # no libtpu, or a name libtpu does not know
    raise RuntimeError(f"cannot describe TPU topology {topology!r} ({type(e).__name__}: {e}); "
                       "install the tpu extra: pip install -e '.[tpu]'") from e
  return list(desc.devices)


def compile_check(config: ml_collections.ConfigDict, topology: str) -> dict[str, Any]:
  """Compiles every phase of `config.stage` for `topology`; returns the largest phase's numbers
  (`per_chip_bytes`, `hbm_bytes`, `flops_per_step`, `fits`, ...) and each phase's."""
  devices = topology_devices(topology)
  mesh = create_mesh(config.mesh.ici, config.mesh.dcn, devices=devices)
  trainer = Trainer(config, mesh)
  hbm = hbm_bytes(topology)
  phases = []
  for index, phase in enumerate(trainer.stage.phases):
    state, frozen, batch = trainer.abstract_inputs(index)
    nulls = train_data.null_inputs(config, None)  # only their shapes matter here
    t0 = time.perf_counter()
    jitted = trainer.jitted_step(index, state.params, frozen, nulls)
    compiled = jitted.lower(state, frozen, batch).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    per_chip = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes
                - mem.alias_size_in_bytes)
    phases.append(dict(
        phase=phase.name, global_batch=phase.batch(config), argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), code_bytes=int(mem.generated_code_size_in_bytes),
        per_chip_bytes=int(per_chip), flops_per_step=float(cost.get("flops", 0.0)),
        compile_seconds=seconds))
  worst = max(phases, key=lambda p: p["per_chip_bytes"])
  return dict(
      stage=trainer.stage.name, preset=config.get("preset"), topology=topology,
      chips=len(devices), mesh=dict(mesh.shape), global_batch=int(config.train.batch_size),
      dtype=config.model.dtype, per_chip_bytes=worst["per_chip_bytes"], hbm_bytes=hbm,
      flops_per_step=worst["flops_per_step"], fits=worst["per_chip_bytes"] <= hbm,
      phases=phases)


def report(result: dict[str, Any]) -> str:
  lines = [f"{result['stage']} ({result['preset']}) on {result['topology']}: {result['chips']} "
           f"chips, mesh {result['mesh']}, global batch {result['global_batch']}, "
           f"{result['dtype']}"]
  for p in result["phases"]:
    lines.append(f"  {p['phase']}: per chip {p['per_chip_bytes'] / GIB:.2f} GiB (arguments "
                 f"{p['argument_bytes'] / GIB:.2f}, outputs {p['output_bytes'] / GIB:.2f}, "
                 f"temporaries {p['temp_bytes'] / GIB:.2f}, aliased {p['alias_bytes'] / GIB:.2f})"
                 f"; {p['flops_per_step'] / 1e12:.2f} TFLOP/step/chip; compiled in "
                 f"{p['compile_seconds']:.0f} s")
  verdict = "fits" if result["fits"] else "does NOT fit"
  lines.append(f"  {verdict} in {result['hbm_bytes'] / GIB:.0f} GiB HBM per chip")
  return "\n".join(lines)
