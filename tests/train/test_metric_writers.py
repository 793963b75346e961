"""TensorBoard event files written without TensorFlow, metrics.jsonl, per-process writers."""

import io
import json
import os
import pathlib
import subprocess
import sys
import time
import wave

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator

from codi_jax import io_utils
from codi_jax.train import metric_writers as mw
from codi_jax.train.metric_writers import JsonlWriter, TensorBoardWriter, create_writers

REPO = pathlib.Path(__file__).resolve().parents[2]


def _load(logdir) -> event_accumulator.EventAccumulator:
  acc = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={kind: 0 for kind in event_accumulator.DEFAULT_SIZE_GUIDANCE})
  return acc.Reload()


def _blobs(acc, tag, step):
  (event,) = [e for e in acc.Tensors(tag) if e.step == step]
  return list(event.tensor_proto.string_val), [d.size for d in event.tensor_proto.tensor_shape.dim]


def _scalars(acc, tag):
  return [(e.step, e.value) for e in acc.Scalars(tag)]


def _lines(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def _next_second():
  """Event file names carry whole seconds; TensorBoard reads a folder's files in name order."""
  time.sleep(1.01 - time.time() % 1)


def test_tensorboard_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  writer = TensorBoardWriter(tmp_path)
  writer.write_hparams({"lr": 1e-4, "model": {"depth": 2, "name": "tiny"}, "none": None})
  for step, loss in [(1, 2.5), (2, 1.25), (5, 0.5)]:
    writer.write_scalars(step, {"loss": np.float32(loss), "lr": 1e-4})
  images = rng.uniform(size=(2, 8, 6, 3)).astype(np.float32)
  writer.write_images(5, {"rgb": images, "gray": np.full((5, 7, 1), 200, np.uint8)})
  writer.write_videos(5, {"clip": np.zeros((1, 3, 4, 5, 3), np.float32)})
  mono = np.sin(np.linspace(0, 60, 1600, dtype=np.float32))[None].repeat(2, 0) * 0.5  # [2, T]
  writer.write_audios(5, {"mono": mono}, sample_rate=16000)
  writer.write_audios(5, {"stereo": rng.uniform(-1, 1, (1, 800, 2))}, sample_rate=8000)
  writer.write_texts(5, {"caption": "a **dog** on grass"})
  writer.write_histograms(5, {"weights": np.arange(100.0)}, num_buckets={"weights": 10})
  writer.close()

  acc = _load(tmp_path)
  assert _scalars(acc, "loss") == [(1, 2.5), (2, 1.25), (5, 0.5)]
  assert [s for s, _ in _scalars(acc, "lr")] == [1, 2, 5]
  assert _scalars(acc, "lr")[0][1] == pytest.approx(1e-4)

  blobs, shape = _blobs(acc, "rgb", 5)  # [width, height, PNG per image]
  assert shape == [4] and blobs[:2] == [b"6", b"8"]
  decoded = [np.asarray(Image.open(io.BytesIO(png))) for png in blobs[2:]]
  assert [d.shape for d in decoded] == [(8, 6, 3)] * 2
  np.testing.assert_allclose(decoded[1] / 255.0, images[1], atol=0.5 / 255 + 1e-6)
  blobs, _ = _blobs(acc, "gray", 5)
  assert np.array_equal(np.asarray(Image.open(io.BytesIO(blobs[2]))), np.full((5, 7), 200))
  blobs, _ = _blobs(acc, "clip", 5)  # the 3 frames side by side
  assert Image.open(io.BytesIO(blobs[2])).size == (15, 4)

  blobs, shape = _blobs(acc, "mono", 5)  # [N, 2]: (WAV, label) per clip
  assert shape == [2, 2]
  with wave.open(io.BytesIO(blobs[2])) as f:
    assert (f.getframerate(), f.getnchannels(), f.getsampwidth(), f.getnframes()) == \
        (16000, 1, 2, 1600)
    pcm = np.frombuffer(f.readframes(1600), "<i2")
  np.testing.assert_allclose(pcm / 32767.0, mono[1], atol=1 / 32767)
  blobs, _ = _blobs(acc, "stereo", 5)
  with wave.open(io.BytesIO(blobs[0])) as f:
    assert (f.getframerate(), f.getnchannels(), f.getnframes()) == (8000, 2, 800)
  assert acc.SummaryMetadata("mono").plugin_data.plugin_name == "audio"

  blobs, _ = _blobs(acc, "caption", 5)
  assert blobs == [b"a **dog** on grass"]
  assert acc.SummaryMetadata("caption").plugin_data.plugin_name == "text"
  (histogram,) = acc.Histograms("weights")
  assert histogram.histogram_value.num == 100 and histogram.histogram_value.sum == 4950
  assert list(histogram.histogram_value.bucket) == [10.0] * 10
  assert "_hparams_/session_start_info" in acc.Tags()["tensors"]


@pytest.mark.parametrize("loader", [event_accumulator, plugin_event_accumulator],
                         ids=["legacy_loader", "server_loader"])
def test_tensorboard_resume_hides_killed_tail(tmp_path, loader):
  killed = TensorBoardWriter(tmp_path)
  for step in range(1, 6):
    killed.write_scalars(step, {"a": step, "b": 10 * step})
  killed.close()
  _next_second()
  resumed = TensorBoardWriter(tmp_path, resume_step=3)  # the checkpoint was at step 3
  resumed.write_scalars(4, {"a": -4})
  resumed.close()
  assert len(os.listdir(tmp_path)) == 2

  # `b` was not written again, yet its steps 4 and 5 are gone: the resume START dropped them.
  acc = loader.EventAccumulator(str(tmp_path), size_guidance={}).Reload()
  steps = {tag: [e.step for e in acc.Tensors(tag)] if loader is plugin_event_accumulator
           else [e.step for e in acc.Scalars(tag)] for tag in ("a", "b")}
  assert steps == {"a": [1, 2, 3, 4], "b": [1, 2, 3]}


def test_tensorboard_refuses_bad_inputs(tmp_path):
  writer = TensorBoardWriter(tmp_path)
  with pytest.raises(ValueError, match=r"scalar 'loss' must hold one value, got shape \(2,\)"):
    writer.write_scalars(1, {"loss": np.ones(2)})
  with pytest.raises(ValueError, match=r"image 'x' must be .* got shape \(4, 4, 2\)"):
    writer.write_images(1, {"x": np.zeros((4, 4, 2))})
  with pytest.raises(ValueError, match="image 'x' must be floating point, got dtype int32"):
    writer.write_images(1, {"x": np.zeros((4, 4, 3), np.int32)})
  with pytest.raises(ValueError, match="audio 'y' must be floating point"):
    writer.write_audios(1, {"y": np.zeros((1, 10), np.int16)}, sample_rate=16000)
  with pytest.raises(ValueError, match=r"audio 'y' must be \[N, T, C\] or \[N, T\]"):
    writer.write_audios(1, {"y": np.zeros(10)}, sample_rate=16000)
  with pytest.raises(ValueError, match=r"video 'v' must be .* got shape \(4, 4, 3\)"):
    writer.write_videos(1, {"v": np.zeros((4, 4, 3))})
  writer.close()


def test_jsonl_one_flushed_line_per_write(tmp_path):
  path = tmp_path / "metrics.jsonl"
  writer = JsonlWriter(path)
  writer.write_hparams({"lr": 1e-4, "model": {"depth": 2}})
  writer.write_scalars(1, {"loss": np.float32(0.5), "grad_norm": np.array(3.0)})
  writer.write_images(1, {"x": np.zeros((2, 4, 4, 3))})  # not logged here
  writer.write_audios(1, {"y": np.zeros((1, 10))}, sample_rate=16000)
  writer.write_scalars(2, {"loss": 0.25})
  writer.write_texts(2, {"caption": "a dog"})
  lines = _lines(path)  # before flush() or close(): each line is on disk once written
  assert [{k: v for k, v in line.items() if k != "time"} for line in lines] == [
      {"hparams": {"lr": 1e-4, "model.depth": 2}},
      {"step": 1, "loss": 0.5, "grad_norm": 3.0},
      {"step": 2, "loss": 0.25},
      {"step": 2, "text/caption": "a dog"},
  ]
  assert all(abs(line["time"] - time.time()) < 60 for line in lines)
  with pytest.raises(ValueError, match=r"scalar names \['step'\] are reserved"):
    writer.write_scalars(3, {"step": 3})
  writer.close()


def _killed_run(path):
  """A killed run's metrics.jsonl: steps 1..5, then a line torn by the kill."""
  lines = [{"time": 0.0, "hparams": {"lr": 0.1}}]
  lines += [{"step": step, "time": 0.0, "loss": 1.0 / step} for step in range(1, 6)]
  path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 6, "lo')


def test_jsonl_resume_drops_later_steps(tmp_path):
  path = tmp_path / "metrics.jsonl"
  _killed_run(path)
  inode = path.stat().st_ino
  writer = JsonlWriter(path, resume_step=3)
  assert path.stat().st_ino != inode  # rewritten beside and renamed over, not edited in place
  writer.write_scalars(4, {"loss": 0.0})
  writer.close()
  lines = _lines(path)
  assert lines[0]["hparams"] == {"lr": 0.1}
  assert [line["step"] for line in lines[1:]] == [1, 2, 3, 4]
  assert lines[-1]["loss"] == 0.0
  assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_jsonl_resume_rewrite_is_atomic(tmp_path, monkeypatch):
  path = tmp_path / "metrics.jsonl"
  _killed_run(path)
  before = path.read_bytes()

  def fail(*args):
    raise OSError("disk full")

  monkeypatch.setattr(io_utils.os, "replace", fail)
  with pytest.raises(OSError, match="disk full"):
    JsonlWriter(path, resume_step=3)
  assert path.read_bytes() == before
  assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temp file left


def test_jsonl_without_resume_appends_after_torn_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  _killed_run(path)
  writer = JsonlWriter(path)
  writer.write_scalars(6, {"loss": 0.1})
  writer.close()
  text_lines = path.read_text().splitlines()
  assert len(text_lines) == 8 and text_lines[-2] == '{"step": 6, "lo'
  assert json.loads(text_lines[-1])["loss"] == 0.1


def test_create_writers_primary(tmp_path):
  writer = create_writers(tmp_path, is_primary=True, resume_step=None)
  assert isinstance(writer, mw.clu_writers.AsyncMultiWriter)
  writer.write_scalars(1, {"loss": 1.5})
  writer.write_texts(1, {"note": "hello"})
  writer.close()
  assert [line.get("loss") for line in _lines(tmp_path / "metrics.jsonl")] == [1.5, None]
  assert _scalars(_load(tmp_path / "tensorboard"), "loss") == [(1, 1.5)]
  sync = create_writers(tmp_path, is_primary=True, resume_step=1, asynchronous=False)
  assert type(sync) is mw.clu_writers.MultiWriter
  sync.close()


def test_create_writers_other_processes_write_no_files(tmp_path):
  writer = create_writers(tmp_path / "run", is_primary=False, resume_step=7)
  assert type(writer) is mw.clu_writers.LoggingWriter
  writer.write_scalars(8, {"loss": 1.0})
  writer.write_images(8, {"x": np.zeros((1, 2, 2, 3))})
  writer.close()
  assert list(tmp_path.iterdir()) == []


def test_import_does_not_import_tensorflow():
  code = (
      "import sys\n"
      "import codi_jax.train.metric_writers\n"
      "from clu import metric_writers\n"
      "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow')\n"
      "assert not loaded, loaded\n"
      "assert metric_writers.MultiWriter is codi_jax.train.metric_writers.clu_writers.MultiWriter\n"
  )
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr
