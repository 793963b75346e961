r"""codi-jax data-throughput: how fast a stage's input pipeline delivers batches.

  codi-jax data-throughput --source synthetic --stage diffuse_image --batch_size 32 \
      --num_workers 4 --steps 50 [--json throughput.json]
  codi-jax data-throughput --source records --records 'data/shards/*.array_record' ...

Builds the stage's grain pipeline (`codi_jax.data.pipeline`), times the first batch apart (worker
start-up, first reads) and then `--steps` more batches: examples/s and batches/s. Each JAX process
reads its own shard of the data and reports its own rate.
"""

from __future__ import annotations

import time

import jax
from absl import flags

from codi_jax.commands import common
from codi_jax.data import pipeline, synthetic
from codi_jax.io_utils import atomic_write_json

STAGE = flags.DEFINE_enum("stage", "diffuse_image", list(pipeline.STAGE_MODALITIES),
                          "Training stage whose modalities and shapes the batches have.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Examples per batch (per process).",
                                  lower_bound=1)
NUM_WORKERS = flags.DEFINE_integer("num_workers", 0,
                                   "Prefetching worker processes (0: read in this process).",
                                   lower_bound=0)
STEPS = flags.DEFINE_integer("steps", 20, "Batches timed after the first one.", lower_bound=1)
IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Side of images and video frames.",
                                  lower_bound=1)
NUM_FRAMES = flags.DEFINE_integer("num_frames", 4, "Video frames per example.", lower_bound=1)
AUDIO_SAMPLES = flags.DEFINE_integer("audio_samples", 16000, "Audio samples per example (16 kHz).",
                                     lower_bound=1)


def _source() -> pipeline.Source:
  if common.SOURCE.value == "synthetic":
    return pipeline.SyntheticSource(synthetic.SyntheticConfig(seed=_seed()))
  if not common.RECORDS.value:
    raise SystemExit("codi-jax data-throughput: --source records needs --records (files, "
                     "folders or globs)")
  return pipeline.RecordShards(tuple(common.RECORDS.value))


def _seed() -> int:
  return 0 if common.SEED.value is None else common.SEED.value


def main(argv: list[str]) -> int:
  del argv
  spec = pipeline.stage_data(STAGE.value, [_source()], image_size=IMAGE_SIZE.value,
                             num_frames=NUM_FRAMES.value, audio_samples=AUDIO_SAMPLES.value)
  batch_size = BATCH_SIZE.value
  dataset = pipeline.build_pipeline(spec, batch_size=batch_size, seed=_seed(),
                                    num_workers=NUM_WORKERS.value)
  start = time.perf_counter()
  iterator = iter(dataset)
  try:
    next(iterator)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(STEPS.value):
      next(iterator)
    elapsed = time.perf_counter() - start
  finally:
    iterator.close()
  report = {
      "stage": spec.name, "source": common.SOURCE.value, "batch_size": batch_size,
      "num_workers": NUM_WORKERS.value, "steps": STEPS.value, "first_batch_s": first,
      "timed_s": elapsed, "batches_per_s": STEPS.value / elapsed,
      "examples_per_s": STEPS.value * batch_size / elapsed,
      "process_index": jax.process_index(), "process_count": jax.process_count(),
  }
  print(f"{spec.name} ({common.SOURCE.value}, batch {batch_size}, {NUM_WORKERS.value} workers, "
        f"process {report['process_index']}/{report['process_count']}): first batch "
        f"{first:.3f} s, then {report['examples_per_s']:.1f} examples/s, "
        f"{report['batches_per_s']:.2f} batches/s over {STEPS.value} batches")
  if common.JSON.value:
    atomic_write_json(common.JSON.value, report)
  return 0
