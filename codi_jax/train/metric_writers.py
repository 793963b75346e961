"""Metric writers for training: TensorBoard event files without TensorFlow, and metrics.jsonl.

Training logs through clu's `MetricWriter` interface. clu's own TensorBoard writer
(`clu.metric_writers.SummaryWriter`) is built on TensorFlow, which this project does not install
(it would turn tensorflow-datasets onto its TF code paths and add ~1 GB), so `TensorBoardWriter`
writes the event files with the `tensorboard` package alone, the way torch's SummaryWriter does:
`EventFileWriter` plus the `Summary` protos.

Layout in the workdir of process 0 (`create_writers`):
  tensorboard/events.out.tfevents.*   scalars, images, videos (as frame strips), audio, text,
                                      histograms, hparams; one file per start of the run
  metrics.jsonl                       one JSON line per `write_scalars` call, flushed at once

On resume from step s, both drop what a killed run wrote after s, so no step appears twice:
metrics.jsonl is rewritten atomically without those lines, and the new event file starts with a
`SessionLog.START` at s + 1, which makes TensorBoard discard the older events at steps > s
(`--load_fast=false`; the default Rust loader ignores it, but drops a tag's older points once the
resumed run writes that tag again).

Import note: clu 0.0.12's `clu/metric_writers/__init__.py` imports its TF SummaryWriter, so a
plain `import clu.metric_writers` fails without TensorFlow. Importing this module first installs
a stand-in for that one submodule (see `_import_clu_metric_writers`); afterwards
`clu.metric_writers` (MultiWriter, AsyncMultiWriter, ensure_flushes, ...) imports as usual.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib
import sys
import time
import types
import wave
from typing import Any, Mapping

import numpy as np
from clu.internal.utils import flatten_dict
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
from tensorboard.compat.proto import types_pb2
from tensorboard.plugins.audio import metadata as audio_metadata
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

from codi_jax.io_utils import atomic_write_text


def _import_clu_metric_writers() -> types.ModuleType:
  """`clu.metric_writers`, imported without TensorFlow.

  Its `__init__` runs `from clu.metric_writers.summary_writer import SummaryWriter`, which imports
  TensorFlow. We register a stand-in for that submodule whose `SummaryWriter` imports the real one
  only when instantiated, so clu's TF writer still works where TF is installed.
  """
  name = "clu.metric_writers.summary_writer"
  if "clu.metric_writers" not in sys.modules and name not in sys.modules:
    stand_in = types.ModuleType(name, "Lazy stand-in for clu's TF SummaryWriter (codi_jax).")

    class SummaryWriter:
      """Imports TensorFlow only when built; use `TensorBoardWriter` in codi_jax."""

      def __new__(cls, *args, **kwargs):
        from clu.metric_writers.tf import summary_writer
        return summary_writer.SummaryWriter(*args, **kwargs)

    stand_in.SummaryWriter = SummaryWriter
    sys.modules[name] = stand_in
  from clu import metric_writers
  return metric_writers


clu_writers = _import_clu_metric_writers()

MetricWriter = clu_writers.MetricWriter
Array = clu_writers.interface.Array
Scalar = clu_writers.interface.Scalar

_RESERVED_JSONL_KEYS = ("step", "time")
_DEFAULT_HISTOGRAM_BUCKETS = 30  # as clu's LoggingWriter and tf.summary.histogram


def _scalar(key: str, value: Scalar) -> float:
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f"scalar {key!r} must hold one value, got shape {array.shape}")
  return float(array.reshape(()))


def _float_array(kind: str, key: str, value: Array) -> np.ndarray:
  """float32 copy of a float array (bfloat16 included); ints and bools are refused by name."""
  array = np.asarray(value)
  if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer):
    raise ValueError(f"{kind} {key!r} must be floating point, got dtype {array.dtype}")
  return array.astype(np.float32)


def _uint8_images(key: str, images: Array) -> np.ndarray:
  """[N, H, W, C] uint8 from uint8 or float [0, 1] images, [N, H, W, C] or [H, W, C]."""
  array = np.asarray(images)
  if array.ndim == 3:
    array = array[None]  # [1, H, W, C]
  if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
    raise ValueError(f"image {key!r} must be [N, H, W, C] or [H, W, C] with C in (1, 3, 4), "
                     f"got shape {np.shape(images)}")
  if array.dtype == np.uint8:
    return array
  array = _float_array("image", key, array)
  return np.round(np.clip(np.nan_to_num(array), 0.0, 1.0) * 255.0).astype(np.uint8)


def _string_tensor(blobs: list[bytes], shape: list[int]) -> tensor_pb2.TensorProto:
  dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in shape]
  return tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=blobs,
                                tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims))


def _image_value(tag: str, images: np.ndarray) -> summary_pb2.Summary.Value:
  """The image plugin's summary of uint8 [N, H, W, C] images: [width, height, PNG, ...]."""
  n, h, w, c = images.shape
  pngs = []
  for image in images:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if c == 1 else image).save(buffer, format="PNG")
    pngs.append(buffer.getvalue())
  md = image_metadata.create_summary_metadata(display_name=None, description=None)
  return summary_pb2.Summary.Value(
      tag=tag, metadata=md, tensor=_string_tensor([b"%d" % w, b"%d" % h, *pngs], [2 + n]))


def _wav(wave_tc: np.ndarray, sample_rate: int) -> bytes:
  """16-bit PCM WAV bytes of one float [T, C] waveform in [-1, 1] (clipped)."""
  pcm = np.round(np.clip(np.nan_to_num(wave_tc), -1.0, 1.0) * 32767.0).astype("<i2")
  buffer = io.BytesIO()
  with wave.open(buffer, "wb") as f:
    f.setnchannels(wave_tc.shape[1])
    f.setsampwidth(2)
    f.setframerate(sample_rate)
    f.writeframes(pcm.tobytes())  # frames interleave channels: [T, C] in C order
  return buffer.getvalue()


def _histogram(values: np.ndarray, num_buckets: int) -> summary_pb2.HistogramProto:
  """Equal-width buckets over [min, max], as clu's LoggingWriter computes them."""
  low, high = float(values.min()), float(values.max())
  if low == high:
    counts, edges = np.asarray([values.size]), np.asarray([low - 0.5, high + 0.5])
  else:
    counts, edges = np.histogram(values, bins=max(num_buckets, 2), range=(low, high))
  values64 = values.astype(np.float64)
  # bucket_limit holds each bucket's right edge; TensorBoard takes `min` as the first left edge.
  return summary_pb2.HistogramProto(
      min=low, max=high, num=float(values.size), sum=float(values64.sum()),
      sum_squares=float(np.square(values64).sum()), bucket_limit=edges[1:].tolist(),
      bucket=counts.astype(np.float64).tolist())


def _hparam_value(value: Any) -> bool | int | float | str:
  """What the hparams plugin accepts: bool, int, float or str (anything else as its str)."""
  if isinstance(value, np.generic):
    value = value.item()
  return value if isinstance(value, (bool, int, float, str)) else str(value)


class TensorBoardWriter(MetricWriter):
  """Writes TensorBoard event files into `logdir`, without TensorFlow.

  The summaries are those `tf.summary` writes (so clu's SummaryWriter), one tag per key: scalars
  (legacy `simple_value`), images and audio as their plugins' string tensors (an [N, ...] batch
  is one tag with N samples), text, histograms, hparams. Videos [N, T, H, W, C] are shown as
  images, one per clip, with its T frames side by side.

  resume_step: the step a resumed run restarts from, or None for a fresh start. The new event
    file opens with a `SessionLog.START` at resume_step + 1 (0 when fresh): TensorBoard takes
    every START after a run's first as a restart and drops the events it has at steps >= its
    step, so a killed run's tail (or, when fresh, an earlier run's events) is not shown twice.
  flush_secs: how often the background thread flushes pending events to disk.
  """

  def __init__(self, logdir: str | os.PathLike, *, resume_step: int | None = None,
               flush_secs: float = 120.0):
    self._writer = EventFileWriter(os.fspath(logdir), flush_secs=flush_secs)
    self._writer.add_event(event_pb2.Event(
        wall_time=time.time(), step=0 if resume_step is None else int(resume_step) + 1,
        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  @property
  def logdir(self) -> str:
    return self._writer.get_logdir()

  def _add(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    if values:
      self._writer.add_event(event_pb2.Event(
          wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))

  def write_summaries(self, step: int, values: Mapping[str, Array],
                      metadata: Mapping[str, Any] | None = None):
    summary_values = []
    for key, value in values.items():
      md = (metadata or {}).get(key)
      if isinstance(md, bytes):
        md = summary_pb2.SummaryMetadata.FromString(md)
      summary_values.append(summary_pb2.Summary.Value(
          tag=key, metadata=md, tensor=tensor_util.make_tensor_proto(np.asarray(value))))
    self._add(step, summary_values)

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]):
    self._add(step, [summary_pb2.Summary.Value(tag=key, simple_value=_scalar(key, value))
                     for key, value in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, Array]):
    self._add(step, [_image_value(key, _uint8_images(key, value))
                     for key, value in images.items()])

  def write_videos(self, step: int, videos: Mapping[str, Array]):
    values = []
    for key, value in videos.items():
      array = np.asarray(value)
      if array.ndim == 4:
        array = array[None]  # [1, T, H, W, C]
      if array.ndim != 5 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"video {key!r} must be [N, T, H, W, C] or [T, H, W, C] with C in "
                         f"(1, 3, 4), got shape {np.shape(value)}")
      n, t, h, w, c = array.shape
      strips = array.transpose(0, 2, 1, 3, 4).reshape(n, h, t * w, c)  # [N, H, T*W, C]
      values.append(_image_value(key, _uint8_images(key, strips)))
    self._add(step, values)

  def write_audios(self, step: int, audios: Mapping[str, Array], *, sample_rate: int):
    values = []
    for key, value in audios.items():
      array = _float_array("audio", key, value)
      if array.ndim == 2:
        array = array[..., None]  # [N, T, 1]
      if array.ndim != 3:
        raise ValueError(f"audio {key!r} must be [N, T, C] or [N, T], got shape {np.shape(value)}")
      # One row per clip: [WAV bytes, label], as tf.summary.audio writes.
      blobs = [blob for clip in array for blob in (_wav(clip, int(sample_rate)), b"")]
      md = audio_metadata.create_summary_metadata(
          display_name=None, description=None, encoding=audio_metadata.Encoding.Value("WAV"))
      values.append(summary_pb2.Summary.Value(
          tag=key, metadata=md, tensor=_string_tensor(blobs, [len(array), 2])))
    self._add(step, values)

  def write_texts(self, step: int, texts: Mapping[str, str]):
    md = text_metadata.create_summary_metadata(display_name=None, description=None)
    self._add(step, [summary_pb2.Summary.Value(
        tag=key, metadata=md, tensor=_string_tensor([str(text).encode("utf-8")], []))
        for key, text in texts.items()])

  def write_histograms(self, step: int, arrays: Mapping[str, Array],
                       num_buckets: Mapping[str, int] | None = None):
    values = []
    for key, value in arrays.items():
      array = _float_array("histogram", key, value).ravel()
      finite = array[np.isfinite(array)]
      if finite.size < array.size:
        logging.warning("histogram %r at step %d: dropped %d non-finite of %d values", key, step,
                        array.size - finite.size, array.size)
      if finite.size:
        buckets = (num_buckets or {}).get(key) or _DEFAULT_HISTOGRAM_BUCKETS
        values.append(summary_pb2.Summary.Value(tag=key, histo=_histogram(finite, buckets)))
    self._add(step, values)

  def write_hparams(self, hparams: Mapping[str, Any]):
    flat = {key: _hparam_value(value) for key, value in flatten_dict(hparams)}
    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=0,
                                           summary=hparams_summary.hparams_pb(flat)))

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def _truncate_jsonl(path: pathlib.Path, resume_step: int) -> None:
  """Rewrites `path` atomically without the lines of steps > resume_step (and torn lines)."""
  kept, dropped = [], 0
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      dropped += 1  # a line cut short when the killed run died mid-write
      continue
    if isinstance(record, dict) and record.get("step", resume_step) > resume_step:
      dropped += 1
    else:
      kept.append(line + "\n")
  if dropped:
    logging.info("%s: dropped %d lines after resume step %d", path, dropped, resume_step)
    atomic_write_text(path, "".join(kept))


def _ends_line(path: pathlib.Path) -> bool:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


class JsonlWriter(MetricWriter):
  """Appends metrics to a JSON-lines file, one line per write, flushed at once.

  Lines: `write_scalars` -> {"step", "time", <key>: float, ...}; `write_texts` ->
  {"step", "time", "text/<key>": str, ...}; `write_hparams` -> {"time", "hparams": {...}}.
  Images, videos, audio, histograms and raw summaries are not logged here. Non-finite values are
  written as NaN / Infinity, as Python's json does.

  resume_step: when given, lines of steps > resume_step (a killed run's tail) are removed first,
    by an atomic rewrite; lines without a step (hparams) are kept.
  """

  def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if resume_step is not None and self.path.exists():
      _truncate_jsonl(self.path, int(resume_step))
    torn = self.path.exists() and self.path.stat().st_size and not _ends_line(self.path)
    self._file = open(self.path, "a", encoding="utf-8")
    if torn:
      self._file.write("\n")  # end a line torn by a killed run, so the next one stays whole

  def _write(self, record: dict[str, Any]) -> None:
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def write_summaries(self, step: int, values: Mapping[str, Array],
                      metadata: Mapping[str, Any] | None = None):
    pass

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]):
    reserved = [key for key in scalars if key in _RESERVED_JSONL_KEYS]
    if reserved:
      raise ValueError(f"scalar names {reserved} are reserved in {self.path.name}")
    self._write({"step": int(step), "time": time.time(),
                 **{key: _scalar(key, value) for key, value in scalars.items()}})

  def write_images(self, step: int, images: Mapping[str, Array]):
    pass

  def write_videos(self, step: int, videos: Mapping[str, Array]):
    pass

  def write_audios(self, step: int, audios: Mapping[str, Array], *, sample_rate: int):
    pass

  def write_texts(self, step: int, texts: Mapping[str, str]):
    self._write({"step": int(step), "time": time.time(),
                 **{f"text/{key}": str(text) for key, text in texts.items()}})

  def write_histograms(self, step: int, arrays: Mapping[str, Array],
                       num_buckets: Mapping[str, int] | None = None):
    pass

  def write_hparams(self, hparams: Mapping[str, Any]):
    self._write({"time": time.time(),
                 "hparams": {key: _hparam_value(value) for key, value in flatten_dict(hparams)}})

  def flush(self):
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self):
    if not self._file.closed:
      self.flush()
      self._file.close()


def create_writers(workdir: str | os.PathLike, *, is_primary: bool, resume_step: int | None,
                   asynchronous: bool = True) -> MetricWriter:
  """The run's metric writer, clu's convention: only process 0 writes files.

  is_primary (process 0): logging + `<workdir>/tensorboard/` + `<workdir>/metrics.jsonl`, in a
  background thread when `asynchronous` (call `flush()` / `close()` before exiting); any other
  process: logging only. resume_step: the restored checkpoint's step, or None on a fresh start.
  A fresh start hides an earlier run's events in TensorBoard but keeps metrics.jsonl as it is;
  pass the start step instead to also drop the lines of a run killed before its first checkpoint.
  """
  if not is_primary:
    return clu_writers.LoggingWriter()
  workdir = pathlib.Path(workdir)
  writers = [clu_writers.LoggingWriter(),
             TensorBoardWriter(workdir / "tensorboard", resume_step=resume_step),
             JsonlWriter(workdir / "metrics.jsonl", resume_step)]
  if asynchronous:
    return clu_writers.AsyncMultiWriter(writers)
  return clu_writers.MultiWriter(writers)
