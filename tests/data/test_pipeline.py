"""grain pipelines: fixed-shape batches per stage, determinism, process sharding, record sources,
checkpointed iterators, and the `data-throughput` command."""

import collections
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from codi_jax.audio.resample import resample
from codi_jax.data import media, pipeline, preprocess, records, synthetic
from codi_jax.modality import Modality
from codi_jax.text import BertTokenizer
from tests import procs
from tests.conftest import REPO

TRAIN_SIZE = 12


def tiny_config(**overrides) -> synthetic.SyntheticConfig:
  sizes = {"train_size": TRAIN_SIZE, "validation_size": 4, "test_size": 4, "audio_seconds": 0.5}
  return dataclasses.replace(synthetic.SyntheticConfig(), **{**sizes, **overrides})


def synthetic_stage(stage="diffuse_image", weights=(1.0,), **shapes):
  sources = [pipeline.SyntheticSource(tiny_config(), split, w)
             for split, w in zip(("train", "validation"), weights)]
  shapes = {"image_size": 16, "num_frames": 2, "audio_samples": 3000, **shapes}
  return pipeline.stage_data(stage, sources, **shapes)


def take(ds, n):
  it = iter(ds)
  try:
    return [next(it) for _ in range(n)]
  finally:
    it.close()


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for name in x:
      np.testing.assert_array_equal(np.asarray(x[name]), np.asarray(y[name]), err_msg=name)


# ------------------------------------------------------------------------------- preprocessing


def test_crop_box_and_image_preprocessing():
  assert preprocess.crop_box(40, 80, 20) == (20, 40, 0, 10)
  assert preprocess.crop_box(90, 30, 15) == (45, 15, 15, 0)
  rng = np.random.default_rng(0)
  boxes = {preprocess.crop_box(20, 40, 20, rng)[3] for _ in range(50)}
  assert boxes <= set(range(21)) and len(boxes) > 5
  image = np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8)
  out = preprocess.preprocess_image(image, 16)
  assert out.dtype == np.float32 and out.shape == (16, 16, 3)
  np.testing.assert_array_equal(out, image[:, 4:20].astype(np.float32) / 127.5 - 1)
  flat = np.full((64, 32, 3), 255, np.uint8)
  np.testing.assert_allclose(preprocess.preprocess_image(flat, 8), 1.0, atol=1e-6)
  with pytest.raises(ValueError, match="uint8"):
    preprocess.preprocess_image(image.astype(np.float32), 8)
  with pytest.raises(ValueError, match="positive integer"):
    preprocess.preprocess_image(image, 0)


def test_video_frames_and_audio_fit():
  np.testing.assert_array_equal(preprocess.frame_indices(10, 4), [0, 3, 6, 9])
  np.testing.assert_array_equal(preprocess.frame_indices(2, 4), [0, 0, 1, 1])
  video = np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((5, 8, 8, 3), np.uint8)
  out = preprocess.preprocess_video(video, 8, 3)
  assert out.shape == (3, 8, 8, 3)
  np.testing.assert_array_equal(out[:, 0, 0, 0], np.float32([0, 2, 4]) / 127.5 - 1)
  wave = np.linspace(-1, 1, 100, dtype=np.float32)
  np.testing.assert_array_equal(preprocess.fit_audio(wave, 40), wave[:40])
  padded = preprocess.fit_audio(wave, 130)
  np.testing.assert_array_equal(padded, np.concatenate([wave, np.zeros(30, np.float32)]))
  window = preprocess.fit_audio(wave, 40, np.random.default_rng(3))
  start = int(np.argmin(np.abs(wave - window[0])))
  np.testing.assert_array_equal(window, wave[start:start + 40])
  with pytest.raises(ValueError, match="float waveform"):
    preprocess.fit_audio(np.zeros((2, 5), np.float32), 4)


# ------------------------------------------------------------------------------------ stages


def test_stage_validation_errors():
  source = pipeline.SyntheticSource(tiny_config())
  with pytest.raises(ValueError, match="unknown stage"):
    pipeline.stage_data("diffuse_smell", [source])
  with pytest.raises(ValueError, match="no sources"):
    pipeline.stage_data("diffuse_image", [])
  with pytest.raises(ValueError, match="image_size"):
    pipeline.stage_data("diffuse_image", [source], image_size=0)
  with pytest.raises(ValueError, match="distinct"):
    pipeline.StageData("x", (Modality.TEXT, "text"), (source,))
  with pytest.raises(ValueError, match="unknown split"):
    pipeline.SyntheticSource(tiny_config(), "dev")
  with pytest.raises(ValueError, match="weight"):
    pipeline.SyntheticSource(tiny_config(), "train", -1.0)
  with pytest.raises(TypeError, match="not one string"):
    pipeline.RecordShards("shards/*.array_record")
  with pytest.raises(ValueError, match="process_index"):
    pipeline.build_pipeline(synthetic_stage(), batch_size=2, seed=0, process_index=2,
                            process_count=2)
  with pytest.raises(ValueError, match="batch_size"):
    pipeline.build_pipeline(synthetic_stage(), batch_size=0, seed=0)


@pytest.mark.parametrize("stage, fields", [
    ("diffuse_image", {"image": (16, 16, 3), "text": None}),
    ("latent_align_audio_video", {"audio": (3000,), "video": (2, 16, 16, 3)}),
    ("autoencode_audio", {"audio": (3000,)}),
])
def test_synthetic_batches_have_fixed_shapes(stage, fields):
  batch, = take(pipeline.build_pipeline(synthetic_stage(stage), batch_size=3, seed=0,
                                        process_index=0, process_count=1), 1)
  assert set(batch) == {"key", "source", "index", *fields}
  assert len(batch["key"]) == 3 and batch["source"] == ["synthetic/train"] * 3
  assert batch["index"].tolist() == [0, 1, 2]  # positions in the global stream
  for name, shape in fields.items():
    if shape is None:
      assert [type(t) for t in batch[name]] == [str] * 3
      continue
    assert batch[name].dtype == np.float32 and batch[name].shape == (3, *shape)
    assert -1.0 <= batch[name].min() and batch[name].max() <= 1.0


def test_synthetic_audio_is_resampled_to_the_stage_rate():
  config = tiny_config(sample_rate=8000)
  spec = pipeline.stage_data("autoencode_audio", [pipeline.SyntheticSource(config)],
                             audio_samples=9000, crop="center")
  batch, = take(pipeline.build_pipeline(spec, batch_size=1, seed=0, process_index=0,
                                        process_count=1), 1)
  example = next(e for e in (synthetic.generate(config, "train", i) for i in range(TRAIN_SIZE))
                 if e.key == batch["key"][0])
  expected = np.asarray(resample(example.audio, 8000, 16000))  # [8000]
  np.testing.assert_allclose(batch["audio"][0, :8000], expected, atol=1e-6)
  assert not batch["audio"][0, 8000:].any()


def test_center_crop_keeps_generated_content():
  spec = synthetic_stage("diffuse_image", image_size=32, crop="center")
  batch, = take(pipeline.build_pipeline(spec, batch_size=4, seed=0, process_index=0,
                                        process_count=1), 1)
  examples = {e.key: e for e in (synthetic.generate(tiny_config(), "train", i)
                                  for i in range(TRAIN_SIZE))}
  for key, image, text in zip(batch["key"], batch["image"], batch["text"]):
    np.testing.assert_array_equal(image, examples[key].image.astype(np.float32) / 127.5 - 1)
    assert text == examples[key].text


def test_order_is_deterministic_and_seeded():
  spec = synthetic_stage("autoencode_image")

  def build(seed):
    return pipeline.build_pipeline(spec, batch_size=4, seed=seed, process_index=0,
                                   process_count=1)

  first, again, other = take(build(7), 2), take(build(7), 2), take(build(8), 2)
  assert_batches_equal(first, again)
  assert [b["key"] for b in first] != [b["key"] for b in other]


def test_two_processes_see_each_example_once_per_epoch():
  spec = synthetic_stage("diffuse_audio")
  per_process = TRAIN_SIZE // 2 // 3  # batches of 3 per process per epoch
  keys = []
  for index in range(2):
    batches = take(pipeline.build_pipeline(spec, batch_size=3, seed=1, process_index=index,
                                           process_count=2), 2 * per_process)
    keys.append([k for b in batches for k in b["key"]])
  all_keys = {synthetic.generate(tiny_config(), "train", i).key for i in range(TRAIN_SIZE)}
  half = TRAIN_SIZE // 2
  epochs = []
  for epoch in range(2):
    seen = keys[0][epoch * half:(epoch + 1) * half] + keys[1][epoch * half:(epoch + 1) * half]
    assert sorted(seen) == sorted(all_keys), f"epoch {epoch}"
    epochs.append(seen)
  assert epochs[0] != epochs[1]  # reshuffled each epoch
  single = take(pipeline.build_pipeline(spec, batch_size=3, seed=1), 1)[0]  # jax.process_*()
  assert single["key"] == [keys[0][0], keys[1][0], keys[0][1]]


def test_minimal_pairs_stay_together_in_a_batch():
  source = pipeline.SyntheticSource(tiny_config(minimal_pairs=True), "train")
  spec = pipeline.stage_data("autoencode_image", [source], image_size=16, num_frames=2,
                             audio_samples=3000)
  per_epoch = TRAIN_SIZE // 4
  epochs = []
  for process_count in (1, 2):
    keys = []
    for index in range(process_count):
      batches = take(pipeline.build_pipeline(spec, batch_size=4 // process_count, seed=3,
                                             process_index=index, process_count=process_count),
                     2 * per_epoch)
      keys.append([b["key"] for b in batches])
    global_batches = [sum(parts, []) for parts in zip(*keys)]  # the global batch of 4
    for batch in global_batches:
      numbers = sorted(int(k.rsplit("-", 1)[1]) for k in batch)
      assert numbers[0] % 2 == 0 and numbers[1] == numbers[0] + 1, batch
      assert numbers[2] % 2 == 0 and numbers[3] == numbers[2] + 1, batch
    epoch = [sorted(k for b in global_batches[e * per_epoch:(e + 1) * per_epoch] for k in b)
             for e in range(2)]
    assert epoch[0] == epoch[1] and len(set(epoch[0])) == TRAIN_SIZE  # each once per epoch
    epochs.append([k for b in global_batches for k in b])
  assert epochs[0][:TRAIN_SIZE] != epochs[0][TRAIN_SIZE:]  # the pairs are reshuffled
  with pytest.raises(ValueError, match="num_workers <= 1"):
    pipeline.build_pipeline(spec, batch_size=4, seed=3, num_workers=2)


def test_mixture_follows_weights():
  spec = synthetic_stage("autoencode_image", weights=(3.0, 1.0))
  batches = take(pipeline.build_pipeline(spec, batch_size=4, seed=0, process_index=0,
                                         process_count=1), 8)
  counts = collections.Counter(s for b in batches for s in b["source"])
  assert counts == {"synthetic/train": 24, "synthetic/validation": 8}


def test_tokenizer_gives_fixed_length_ids():
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "thing", "red", "circle"]
  tokenizer = BertTokenizer({w: i for i, w in enumerate(words)})
  spec = synthetic_stage("diffuse_image", text_length=40)
  batch, = take(pipeline.build_pipeline(spec, batch_size=2, seed=0, process_index=0,
                                        process_count=1, tokenizer=tokenizer), 1)
  tokens = batch["text_tokens"]
  assert tokens.dtype == np.int32 and tokens.shape == (2, 40)
  for row, text in zip(tokens, batch["text"]):
    ids = tokenizer.encode(text)[:40]
    np.testing.assert_array_equal(row[:len(ids)], ids)
    assert (row[len(ids):] == 0).all()


# ------------------------------------------------------------------------------ record shards


def write_shards(tmp_path):
  """Two shards: 6 usable image+text examples, plus ones a text-image stage must skip."""
  rng = np.random.default_rng(0)
  images = {f"ok{i}": rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for i in range(6)}
  usable = [records.Example(key, "test", "cc0", f"caption {key}", image=media.encode_png(img))
            for key, img in images.items()]
  wave = np.sin(np.arange(8000, dtype=np.float32) / 5) * 0.5
  skipped = [records.Example("text_only", "test", text="no picture"),
             records.Example("audio_only", "test", audio=media.encode_wav(wave, 8000)),
             records.Example("broken", "test", text="bad bytes", image=b"\x89PNG not really")]
  records.write_records(tmp_path / "a.array_record", usable[:3] + skipped[:2])
  records.write_records(tmp_path / "b.array_record", usable[3:] + skipped[2:])
  return images


def test_record_shards_decode_skip_and_preprocess(tmp_path):
  images = write_shards(tmp_path)
  spec = pipeline.stage_data("diffuse_image", [pipeline.RecordShards([str(tmp_path / "*")])],
                             image_size=20, crop="center")
  batches = take(pipeline.build_pipeline(spec, batch_size=3, seed=0, process_index=0,
                                         process_count=1), 2)
  keys = [k for b in batches for k in b["key"]]
  assert sorted(keys) == sorted(images)
  for batch in batches:
    for key, image, text in zip(batch["key"], batch["image"], batch["text"]):
      np.testing.assert_array_equal(image, images[key][:, 2:22].astype(np.float32) / 127.5 - 1)
      assert text == f"caption {key}"
  audio_spec = pipeline.stage_data("autoencode_audio", [pipeline.RecordShards([str(tmp_path)])],
                                   audio_samples=20000)
  batch, = take(pipeline.build_pipeline(audio_spec, batch_size=2, seed=0, process_index=0,
                                        process_count=1), 1)
  assert batch["key"] == ["audio_only"] * 2 and batch["audio"].shape == (2, 20000)
  resampled = batch["audio"][0]
  assert abs(np.abs(resampled[:16000]).max() - 0.5) < 0.02 and not resampled[16010:].any()
  with pytest.raises(ValueError, match="no files match"):
    pipeline.RecordShards([str(tmp_path / "*.nothing")]).files()


# -------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("num_workers", [0, 1])
def test_restored_iterator_continues_exactly(tmp_path, num_workers):
  spec = synthetic_stage("diffuse_video")

  def build():
    return pipeline.build_pipeline(spec, batch_size=2, seed=3, process_index=0, process_count=1,
                                   num_workers=num_workers)

  it = iter(build())
  try:
    for _ in range(3):
      next(it)
    pipeline.save_iterator_state(tmp_path / "state", it)
    expected = [next(it) for _ in range(4)]
    with pytest.raises(ValueError, match="already exists"):
      pipeline.save_iterator_state(tmp_path / "state", it)
  finally:
    it.close()
  restored = pipeline.restore_iterator_state(tmp_path / "state", iter(build()))
  try:
    assert_batches_equal([next(restored) for _ in range(4)], expected)
  finally:
    restored.close()
  with pytest.raises(ValueError, match="no iterator state"):
    pipeline.restore_iterator_state(tmp_path / "missing", iter(build()))


# ----------------------------------------------------------------------------- multi-process


_PROCESS_SCRIPT = """
import json
from codi_jax.parallel.distributed import initialize_from_env
initialize_from_env()
from codi_jax.data import pipeline, synthetic
config = synthetic.SyntheticConfig(**json.loads({config!r}))
spec = pipeline.stage_data("autoencode_image", [pipeline.SyntheticSource(config)], image_size=8)
build = lambda: iter(pipeline.build_pipeline(spec, batch_size=3, seed=5))
it = build()
keys = [k for _ in range(2) for k in next(it)["key"]]
pipeline.save_iterator_state({state!r}, it)
after = [next(it)["key"] for _ in range(2)]
restored = pipeline.restore_iterator_state({state!r}, build())
print(json.dumps({{"keys": keys, "resumed": [next(restored)["key"] for _ in range(2)] == after}}))
"""


def test_two_jax_processes_split_an_epoch_and_checkpoint(tmp_path):
  """Two real JAX processes, the pipeline's process index/count from jax.process_*(); their
  iterator states go to one folder and restore exactly."""
  port = procs.free_port()
  script = _PROCESS_SCRIPT.format(config=json.dumps(dataclasses.asdict(tiny_config())),
                                  state=str(tmp_path / "state"))
  started = []
  for pid in range(2):
    env = {**os.environ, "CODI_COORDINATOR": f"localhost:{port}", "CODI_NUM_PROCESSES": "2",
           "CODI_PROCESS_ID": str(pid), "JAX_PLATFORMS": "cpu"}
    started.append(procs.start([sys.executable, "-c", script], cwd=REPO, env=env))
  outs = procs.finish(started, 300)
  for p, out in zip(started, outs):
    assert p.returncode == 0, out[-3000:]
  results = [json.loads(procs.last_json_line(out)) for out in outs]
  keys = [r["keys"] for r in results]
  assert not set(keys[0]) & set(keys[1])
  assert sorted(keys[0] + keys[1]) == sorted(
      synthetic.generate(tiny_config(), "train", i).key for i in range(TRAIN_SIZE))
  assert [r["resumed"] for r in results] == [True, True]
  assert {p.name for p in (tmp_path / "state").glob("process_*.json")} == {
      "process_0-of-2.json", "process_1-of-2.json"}


# ---------------------------------------------------------------------------------- command


def test_throughput_command_reports(tmp_path):
  out = tmp_path / "throughput.json"
  proc = subprocess.run(
      [sys.executable, "-m", "codi_jax.cli", "data-throughput", "--source", "synthetic",
       "--stage", "latent_align_audio_text", "--batch_size", "2", "--steps", "3",
       "--num_workers", "0", "--json", str(out)],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  report = json.loads(out.read_text())
  assert report["steps"] == 3 and report["batch_size"] == 2
  assert report["examples_per_s"] == pytest.approx(2 * report["batches_per_s"])
  assert report["first_batch_s"] > 0 and "examples/s" in proc.stdout
  bad = subprocess.run([sys.executable, "-m", "codi_jax.cli", "data-throughput", "--source",
                        "records", "--stage", "diffuse_image"], cwd=REPO, capture_output=True,
                       text=True, timeout=300, check=False)
  assert bad.returncode != 0 and "--records" in bad.stderr


def test_processes_see_their_positions_of_the_global_stream():
  """Process p of P gets positions p, p + P, ...: the index field names them."""
  spec = synthetic_stage("autoencode_audio")
  one, = take(pipeline.build_pipeline(spec, batch_size=4, seed=0, process_index=0,
                                      process_count=1), 1)
  halves = [next(iter(pipeline.build_pipeline(spec, batch_size=2, seed=0, process_index=p,
                                              process_count=2))) for p in range(2)]
  assert [h["index"].tolist() for h in halves] == [[0, 2], [1, 3]]
  for h in halves:
    for j, i in enumerate(h["index"]):
      np.testing.assert_array_equal(h["audio"][j], one["audio"][i])
