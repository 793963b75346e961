"""tfds builders: what they write reads back identical, for synthetic and imported data."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from codi_jax.data import analyzers, builders, media, records, synthetic
from codi_jax.data.records import Example

TINY = synthetic.SyntheticConfig(train_size=3, validation_size=2, test_size=2, seed=7)


def _all(source) -> dict[str, Example]:
  return {example.key: example for example in (source[i] for i in range(len(source)))}


def test_synthetic_builder_round_trip(tmp_path):
  builder = builders.CodiSynthetic(
      config=builders.CodiSyntheticConfig(name="tiny", synthetic=TINY), data_dir=tmp_path,
      file_format="array_record")
  builder.download_and_prepare()
  assert {s: builder.info.splits[s].num_examples for s in synthetic.SPLITS} == {
      "train": 3, "validation": 2, "test": 2}
  for split in synthetic.SPLITS:
    stored = _all(builders.data_source(builder, split))
    expected = [builders.synthetic_to_example(synthetic.generate(TINY, split, i), TINY)
                for i in range(synthetic.split_size(TINY, split))]
    assert stored == {e.key: e for e in expected}
  # The stored media decode to the generated arrays.
  generated = synthetic.generate(TINY, "validation", 1)
  stored = _all(builders.data_source(builder, "validation"))[generated.key]
  np.testing.assert_array_equal(media.decode_image(stored.image), generated.image)
  video = media.decode_video(stored.video)
  assert video.shape == generated.video.shape
  assert np.abs(video.astype(int) - generated.video).max() <= 2
  np.testing.assert_allclose(media.decode_audio(stored.audio, TINY.sample_rate), generated.audio,
                             atol=1.0 / 32768)
  assert stored.metadata["attributes"] == generated.attributes.as_dict()
  assert analyzers.analyze_image(media.decode_image(stored.image))["colour"] == \
      generated.attributes.colour.value
  clone = pickle.loads(pickle.dumps(builders.data_source(builder, "test")))
  assert len(clone) == 2 and clone[0].source == builders.SYNTHETIC_SOURCE


def test_records_builder_round_trip(tmp_path):
  made = {
      "train": [Example(key=f"web/{i}", source="web", license=None if i else "CC0-1.0",
                        text=f"caption {i}", image=bytes([i + 1]) * 5, metadata={"i": i})
                for i in range(4)],
      "test": [Example(key="web/t", source="web", audio=b"flac", text=None)],
  }
  for split, examples in made.items():
    records.write_records(tmp_path / "records" / split / "shard-00000.array_record", examples)
  builder = builders.CodiRecords(
      config=builders.CodiRecordsConfig(name="web", records_dir=str(tmp_path / "records")),
      data_dir=tmp_path / "tfds", file_format="array_record")
  builder.download_and_prepare()
  assert set(builder.info.splits) == {"train", "test"}
  for split, examples in made.items():
    assert _all(builders.data_source(builder, split)) == {e.key: e for e in examples}
  with pytest.raises(ValueError, match="no split 'validation'"):
    builders.data_source(builder, "validation")


def test_records_builder_needs_shards(tmp_path):
  builder = builders.CodiRecords(
      config=builders.CodiRecordsConfig(name="empty", records_dir=str(tmp_path)),
      data_dir=tmp_path / "tfds", file_format="array_record")
  with pytest.raises(ValueError, match="no record shards"):
    builder.download_and_prepare()


def test_pipeline_reads_a_prepared_dataset(tmp_path):
  from codi_jax.data import pipeline

  builder = builders.CodiSynthetic(
      config=builders.CodiSyntheticConfig(name="tiny", synthetic=TINY), data_dir=tmp_path,
      file_format="array_record")
  builder.download_and_prepare()
  source = pipeline.TfdsSource(builder.data_dir, "train")
  assert source.name == "tfds:codi_synthetic/train"
  spec = pipeline.stage_data("diffuse_image", [source], image_size=32)
  batches = iter(pipeline.build_pipeline(spec, batch_size=3, seed=0, process_index=0,
                                         process_count=1))
  batch = next(batches)
  assert sorted(batch["key"]) == sorted(synthetic.generate(TINY, "train", i).key for i in range(3))
  assert batch["image"].shape == (3, 32, 32, 3) and len(batch["text"]) == 3
  with pytest.raises(ValueError, match="not a prepared tfds dataset"):
    pipeline.TfdsSource(tmp_path, "train")
