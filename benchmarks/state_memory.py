r"""Per-chip memory of each stage's train state, exactly, from parameter shapes (no compile).

  python benchmarks/state_memory.py [--preset full] [--fsdp 1,4,64] [--json FILE]

For every stage: trainable and frozen parameter counts, and the bytes one chip holds when the
parameters are FSDP-sharded over N chips: float32 master weights, Adam's two moments and the
EMA for trainable leaves (16 bytes each), plus the float32 frozen leaves (4 bytes), divided by N
(every large leaf has an `embed`/`mlp`/`heads` axis the rules shard over fsdp). Gradients and
activations come on top; `codi-jax compile-check` measures those for a real TPU topology (its
per-chip number includes this state). This is the quick first answer to "how many chips does a
stage's state need".
"""

from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from codi_jax.io_utils import atomic_write_json  # noqa: E402
from codi_jax.parallel.mesh import create_mesh  # noqa: E402
from codi_jax.train.stages import STAGES  # noqa: E402
from codi_jax.train.step import Trainer  # noqa: E402
from configs.codi import get_config  # noqa: E402

GIB = 1024 ** 3


def stage_counts(preset: str) -> dict[str, tuple[int, int]]:
  """{stage: (trainable, frozen) parameter counts} of a preset."""
  config = get_config(preset)
  mesh = create_mesh(config.mesh.ici, config.mesh.dcn, devices=jax.devices()[:1])
  count = lambda flat: sum(math.prod(v.shape) for leaves in flat.values()
                           for v in leaves.values())
  out = {}
  for stage in STAGES:
    config.stage = stage
    trainer = Trainer(config, mesh)
    trainable, frozen = trainer.split(trainer.abstract_params())
    out[stage] = (count(trainable), count(frozen))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="full")
  parser.add_argument("--fsdp", default="1,4,64", help="comma-separated shard counts")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  shards = [int(n) for n in args.fsdp.split(",")]
  rows = []
  for stage, (trainable, frozen) in stage_counts(args.preset).items():
    state = 16 * trainable + 4 * frozen
    rows.append(dict(stage=stage, trainable=trainable, frozen=frozen, state_bytes=state,
                     grad_bytes=4 * trainable,
                     per_chip_state_bytes={n: state / n for n in shards}))
  head = f"{'stage':15s} {'trainable':>10s} {'frozen':>10s} " + " ".join(
      f"{f'fsdp {n}':>9s}" for n in shards)
  print(f"{args.preset}: train state per chip (GiB; + gradients and activations)\n{head}")
  for r in rows:
    print(f"{r['stage']:15s} {r['trainable'] / 1e6:9.1f}M {r['frozen'] / 1e6:9.1f}M " +
          " ".join(f"{r['per_chip_state_bytes'][n] / GIB:9.2f}" for n in shards))
  if args.json:
    atomic_write_json(args.json, dict(preset=args.preset, stages=rows))


if __name__ == "__main__":
  main()
