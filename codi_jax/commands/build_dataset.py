r"""codi-jax build-dataset: write a tfds dataset (ArrayRecord files) for training pipelines.

  codi-jax build-dataset --dataset synthetic --data_dir data/tfds --name tiny \
      --image_size 32 --num_frames 4 --train_size 4096
  codi-jax build-dataset --dataset records --data_dir data/tfds --name audiocaps \
      --records_dir data/audiocaps      # holds train/ validation/ test/ record shards

`synthetic` stores the embedded procedural dataset (lossless PNG, H.264 4:4:4, FLAC) with its
attributes; `records` stores shards made by `codi-jax import-data`. The printed folder is what
`codi_jax.data.pipeline.TfdsSource(builder_dir, split)` reads. Nothing is downloaded.
"""

from __future__ import annotations

from absl import flags

from codi_jax.commands import common
from codi_jax.data import builders, synthetic
from codi_jax.io_utils import atomic_write_json

DATASET = flags.DEFINE_enum("dataset", None, ["synthetic", "records"], "Which builder.")
DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data folder to write into.")
NAME = flags.DEFINE_string("name", "default", "Builder config name (keeps builds apart).")
RECORDS_DIR = flags.DEFINE_string("records_dir", None,
                                  "records: folder with <split>/*.array_record shards.")
IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "synthetic: image side.", lower_bound=32)
NUM_FRAMES = flags.DEFINE_integer("num_frames", 4, "synthetic: video frames.", lower_bound=2)
AUDIO_SECONDS = flags.DEFINE_float("audio_seconds", 1.0, "synthetic: clip length (s).")
TRAIN_SIZE = flags.DEFINE_integer("train_size", 4096, "synthetic: train examples.", lower_bound=1)
VALIDATION_SIZE = flags.DEFINE_integer("validation_size", 256, "synthetic: validation examples.",
                                       lower_bound=1)
TEST_SIZE = flags.DEFINE_integer("test_size", 256, "synthetic: test examples.", lower_bound=1)


def main(argv: list[str]) -> int:
  del argv
  if not DATASET.value or not DATA_DIR.value:
    raise SystemExit("codi-jax build-dataset: --dataset and --data_dir are required")
  try:
    if DATASET.value == "synthetic":
      config = synthetic.SyntheticConfig(
          image_size=IMAGE_SIZE.value, num_frames=NUM_FRAMES.value,
          audio_seconds=AUDIO_SECONDS.value, train_size=TRAIN_SIZE.value,
          validation_size=VALIDATION_SIZE.value, test_size=TEST_SIZE.value,
          seed=0 if common.SEED.value is None else common.SEED.value)
      builder = builders.CodiSynthetic(
          config=builders.CodiSyntheticConfig(name=NAME.value, synthetic=config),
          data_dir=DATA_DIR.value, file_format="array_record")
    else:
      if not RECORDS_DIR.value:
        raise SystemExit("codi-jax build-dataset: --dataset records needs --records_dir")
      builder = builders.CodiRecords(
          config=builders.CodiRecordsConfig(name=NAME.value, records_dir=RECORDS_DIR.value),
          data_dir=DATA_DIR.value, file_format="array_record")
    builder.download_and_prepare()
  except ValueError as e:
    raise SystemExit(f"codi-jax build-dataset: {e}") from e
  splits = {name: info.num_examples for name, info in builder.info.splits.items()}
  print(f"{builder.data_dir}: {splits}")
  if common.JSON.value:
    atomic_write_json(common.JSON.value, {"builder_dir": str(builder.data_dir), "splits": splits})
  return 0
