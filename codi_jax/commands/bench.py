r"""codi-jax bench: train-step or sampling throughput, FLOP/s, MFU and memory on this machine.

  codi-jax bench train --config configs/codi.py:tiny --config.stage=diffuse_image \
      [--steps 10 --warmup 2] [--peak_tflops T] [--json FILE]
  codi-jax bench sample --config configs/codi.py:tiny --outputs image,audio \
      [--ddim_steps 50] [--batch N] [--ckpt DIR] [--json FILE]

`train` times the real compiled train step of the stage (`--stage` or --config.stage; a
multi-phase stage is timed on its first phase) on one batch from its data pipeline, with random
weights (or `--config.init_from` checkpoints). `sample` times the compiled joint sampling program
(DDIM with guidance + decoding) on batches of N text-prompted items (default: one per batch
shard), random weights unless --ckpt. Compile time is reported apart; MFU needs the device's
peak (known for H100/H200/A100 and TPU v4/v5e/v5p/v6e, or --peak_tflops), else it is null.
JSON keys: steps_per_s / items_per_s, compile_s, flops_per_step_per_device /
flops_per_item, tflops_per_s_per_device, mfu, memory_peak_bytes, ...
"""

from __future__ import annotations

import pathlib

import jax
from absl import flags

from codi_jax.commands import common
from codi_jax.io_utils import atomic_write_json

WHAT = ("train", "sample")

STEPS = flags.DEFINE_integer("steps", None,
                             "Timed iterations: train steps, or sampling batches (default 10 / 3).",
                             lower_bound=1)
WARMUP = flags.DEFINE_integer("warmup", None,
                              "Untimed iterations after compiling (default 2 / 1).", lower_bound=0)
PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None,
                                 "Peak dense TFLOP/s per device for MFU (default: by device kind; "
                                 "unknown on CPUs).")
STAGE = flags.DEFINE_string("stage", None, "Stage to time (default: --config.stage).")
INIT = flags.DEFINE_enum("init", "random", ["random", "xla"],
                         "train: host-side random weights, or the modules' jitted initialisers "
                         "(faster for full-size models on accelerators).")
OUTPUTS = flags.DEFINE_list("outputs", ["image", "audio"], "sample: output modalities.")
DDIM_STEPS = flags.DEFINE_integer("ddim_steps", None,
                                  "sample: DDIM steps (default: config.sample.ddim_steps).",
                                  lower_bound=1)
BATCH = flags.DEFINE_integer("batch", None,
                             "sample: items per batch, a multiple of the batch shards (default: "
                             "one per batch shard).", lower_bound=1)
CKPT = flags.DEFINE_string("ckpt", None,
                           "sample: model checkpoint (its config replaces --config); default "
                           "random weights.")
TOKENIZERS = flags.DEFINE_string("tokenizers", None, f"sample: {common.TOKENIZERS_HELP}")
QUIET = flags.DEFINE_bool("quiet", False, "No progress bar.")

USAGE = "usage: codi-jax bench train|sample [flags]   (codi-jax bench --help for the flags)"


def _what(argv: list[str]) -> str:
  rest = argv[1:]
  if len(rest) != 1 or rest[0] not in WHAT:
    got = " ".join(rest) if rest else "nothing"
    raise SystemExit(f"codi-jax bench: expected one of {' | '.join(WHAT)} after `bench`, got "
                     f"{got}\n{USAGE}")
  return rest[0]


def main(argv: list[str]) -> int:
  what = _what(argv)
  from codi_jax import bench

  config = common.CONFIG.value
  if STAGE.value:
    config.stage = STAGE.value
  progress = not QUIET.value and jax.process_index() == 0
  try:
    if what == "train":
      result = bench.bench_train(config, steps=STEPS.value or 10, warmup=_warmup(2),
                                 init=INIT.value, peak=PEAK_TFLOPS.value, progress=progress)
    else:
      result = bench.bench_sample(config, OUTPUTS.value, tokenizers=TOKENIZERS.value,
                                  ddim_steps=DDIM_STEPS.value, batch=BATCH.value,
                                  ckpt=CKPT.value, steps=STEPS.value or 3, warmup=_warmup(1),
                                  peak=PEAK_TFLOPS.value, progress=progress)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"codi-jax bench {what}: error: {e}") from None
  if jax.process_index() == 0:
    print(bench.report(result))
    if common.JSON.value:
      atomic_write_json(common.JSON.value, result)
      print(f"Wrote {pathlib.Path(common.JSON.value).resolve()}")
  return 0


def _warmup(default: int) -> int:
  return default if WARMUP.value is None else WARMUP.value
