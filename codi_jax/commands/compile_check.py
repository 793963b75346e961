r"""codi-jax compile-check: will a stage's train step fit a TPU slice? Asked from a CPU machine.

  codi-jax compile-check --config configs/codi.py:full --config.stage=diffuse_image \
      --topology v5p:4x4x4 [--config.train.batch_size=256] [--config.mesh.ici.fsdp=-1 \
      --config.mesh.ici.data=1] [--config.model.dtype=bfloat16] [--json FILE]

Needs the `tpu` extra (pip install -e '.[tpu]'): libtpu AOT-compiles the real train step for the
topology's chips (nothing is allocated) and reports per-chip memory (arguments, outputs,
temporaries), FLOPs per step and whether it fits the chip's HBM. Exit status 1 when it does not.
JSON keys: per_chip_bytes, hbm_bytes, flops_per_step, fits, phases, mesh, ...
"""

from __future__ import annotations

import os

from absl import flags

from codi_jax.commands import common
from codi_jax.io_utils import atomic_write_json

TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:4x4x4 or v5e:4x4.")


def main(argv: list[str]) -> int:
  del argv
  if not TOPOLOGY.value:
    raise SystemExit("codi-jax compile-check: --topology is required (e.g. v5p:4x4x4)")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the chips are described, not used
  # No chips are opened, so several compile-checks (or tests) may share libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from codi_jax.train.compile_check import compile_check, report

  try:
    result = compile_check(common.CONFIG.value, TOPOLOGY.value)
  except RuntimeError as e:
    raise SystemExit(f"codi-jax compile-check: {e}") from e
  print(report(result))
  if common.JSON.value:
    atomic_write_json(common.JSON.value, result)
  return 0 if result["fits"] else 1
