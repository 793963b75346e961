"""Sample media in TensorBoard during training: written at the right steps, sane, and harmless.

Tiny config, one device; parts from a host-random model checkpoint (`init_from`), as in
test_train.py.
"""

import io
import json
import pathlib
import wave

import jax
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from codi_jax import checkpoint
from codi_jax.audio.mel import HOP, N_MELS, SAMPLE_RATE
from codi_jax.modality import Modality
from codi_jax.parallel.mesh import create_mesh
from codi_jax.train import data as train_data
from codi_jax.train import loop, samples
from codi_jax.train.metric_writers import TensorBoardWriter
from codi_jax.train.state import load_params
from codi_jax.train.step import Trainer
from configs.codi import get_config


def tiny(stage: str, init_from: pathlib.Path, **train):
  config = get_config("tiny")
  config.stage = stage
  config.init_from = str(init_from)
  config.train.update(dict(batch_size=4, warmup_steps=0, decay="constant", log_every=1,
                           async_checkpoints=False), **train)
  return config


def one_device_train(config, workdir, monkeypatch):
  """Trains on the first device; returns the SampleLogger the loop built (or None)."""
  made = []
  create = samples.SampleLogger.create
  monkeypatch.setattr(loop, "create_mesh",
                      lambda ici, dcn: create_mesh(ici, dcn, devices=jax.devices()[:1]))
  monkeypatch.setattr(samples.SampleLogger, "create",
                      classmethod(lambda cls, *args: made.append(create(*args)) or made[-1]))
  loop.train(config, str(workdir), export=False, progress=False)
  return made[0]


def events(workdir) -> event_accumulator.EventAccumulator:
  acc = event_accumulator.EventAccumulator(
      str(pathlib.Path(workdir) / "tensorboard"),
      size_guidance={kind: 0 for kind in event_accumulator.DEFAULT_SIZE_GUIDANCE})
  return acc.Reload()


def blobs(acc, tag) -> dict[int, list[bytes]]:
  """{step: the summary's strings} of a tag ({} when it was never written)."""
  if tag not in acc.Tags()["tensors"]:
    return {}
  return {e.step: list(e.tensor_proto.string_val) for e in acc.Tensors(tag)}


def pngs(blob_list) -> list[np.ndarray]:
  return [np.asarray(Image.open(io.BytesIO(b))) for b in blob_list[2:]]


def wavs(blob_list) -> list[tuple[int, np.ndarray]]:
  out = []
  for blob in blob_list[::2]:  # (WAV, label) per clip
    with wave.open(io.BytesIO(blob)) as f:
      out.append((f.getframerate(), np.frombuffer(f.readframes(f.getnframes()), "<i2")))
  return out


def losses(workdir) -> dict[int, float]:
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text()
          .splitlines()]
  return {row["step"]: row["loss"] for row in rows if "loss" in row}


def test_diffuse_image_run_writes_image_samples_and_trains_as_without(random_model, tmp_path,
                                                                      monkeypatch):
  config = tiny("diffuse_image", random_model, steps=3, sample_every=2, sample_count=3,
                sample_ddim_steps=4)
  logger = one_device_train(config, tmp_path / "sampled", monkeypatch)
  acc = events(tmp_path / "sampled")
  images = blobs(acc, "samples/image")
  assert sorted(images) == [2, 3]  # every 2 steps and at the last step
  for step, blob_list in images.items():
    assert blob_list[:2] == [b"32", b"32"]  # width, height
    decoded = pngs(blob_list)
    assert len(decoded) == 3
    for image in decoded:
      assert image.shape == (32, 32, 3) and image.dtype == np.uint8
      assert image.std() > 1.0  # decoded noise from random weights, not a blank
  # Conditioned on the first validation captions, the same at every sampling step.
  captions = samples.validation_examples(config, (Modality.IMAGE, Modality.TEXT), 3)["text"]
  prompts = blobs(acc, "samples/prompts")
  assert sorted(prompts) == [2, 3] and prompts[2] == prompts[3]
  assert prompts[2][0].decode() == "\n".join(f"{i + 1}. {c}" for i, c in enumerate(captions))
  assert logger.trace_count == 1  # compiled once, reused at step 3

  config.train.sample_every = 0
  assert one_device_train(config, tmp_path / "plain", monkeypatch) is None
  assert not blobs(events(tmp_path / "plain"), "samples/image")
  assert losses(tmp_path / "sampled") == losses(tmp_path / "plain")
  assert sorted(losses(tmp_path / "plain")) == [1, 2, 3]


def test_autoencoders_run_writes_audio_through_the_vocoder_of_init_from(random_model, tmp_path,
                                                                       monkeypatch):
  # The stage trains the audio VAE only; the vocoder comes from the init_from checkpoint.
  config = tiny("autoencoders", random_model, steps=1, sample_every=5, sample_count=2,
                autoencoders="audioldm_vae")
  config.model.audio_decoder = "hifigan"  # tiny's default, Griffin-Lim, needs no vocoder
  logger = one_device_train(config, tmp_path, monkeypatch)
  assert "hifigan_vocoder" in logger.extra and not logger.unavailable
  acc = events(tmp_path)
  for tag in ("samples/audio", "samples/audio_input"):
    clips = wavs(blobs(acc, tag)[1])  # the last step
    assert len(clips) == 2
    for rate, pcm in clips:
      # The clip the mel is computed from (whole 10 ms frames) and its reconstruction.
      assert rate == SAMPLE_RATE and pcm.shape == (config.data.audio_samples * 16 // 2500 * HOP,)
      assert np.abs(pcm).max() > 0
  assert not blobs(acc, "samples/image")  # the image VAE is not trained here


def test_without_a_vocoder_audio_is_shown_as_a_mel_image(random_model, tmp_path):
  params = checkpoint.random_model_params(get_config("tiny"), 0, ["audioldm_vae"])
  checkpoint.save_model(tmp_path / "init", params, get_config("tiny"))
  config = tiny("autoencoders", tmp_path / "init", sample_every=1, sample_count=2,
                autoencoders="audioldm_vae")
  config.model.audio_decoder = "hifigan"  # tiny's default, Griffin-Lim, needs no vocoder
  mesh = create_mesh({"data": 1}, devices=jax.devices()[:1])
  trainer = Trainer(config, mesh)
  trainable, frozen = trainer.split(load_params(config, trainer.stage.parts, mesh)[0])
  tokenizers = train_data.load_tokenizers("")
  logger = samples.SampleLogger.create(config, trainer, tokenizers, frozen)
  assert logger.unavailable == {"hifigan_vocoder"} and not logger.extra
  writer = TensorBoardWriter(tmp_path / "run" / "tensorboard")
  logger.write(7, 0, trainer.create_state(trainable), writer)
  writer.close()
  acc = events(tmp_path / "run")
  mels = pngs(blobs(acc, "samples/audio_mel")[7])
  frames = 2 * config.data.audio_samples * 16 // 2500  # input | reconstruction, side by side
  assert len(mels) == 2
  assert all(m.shape == (N_MELS, frames) and m.dtype == np.uint8 and m.std() > 1 for m in mels)
  assert not blobs(acc, "samples/audio")


def test_sampling_settings_are_checked(random_model):
  config = tiny("diffuse_image", random_model, sample_every=-1)
  mesh = create_mesh({"data": 1}, devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="sample_every must be a non-negative integer"):
    samples.SampleLogger.create(config, Trainer(config, mesh), None, {})
  config.train.update(sample_every=10, sample_count=0)
  with pytest.raises(ValueError, match="sample_count must be a positive integer, got 0"):
    samples.SampleLogger.create(config, Trainer(config, mesh), None, {})
  config.train.sample_every = 0
  assert samples.SampleLogger.create(config, Trainer(config, mesh), None, {}) is None
  config.stage = "align_encoders"
  config.train.sample_every = 10
  assert samples.SampleLogger.create(config, Trainer(config, mesh), None, {}) is None
