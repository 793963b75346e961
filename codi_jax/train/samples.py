"""Sample media in TensorBoard while a stage trains: what its model makes of fixed examples.

Every `config.train.sample_every` steps and at the last step (0 switches it off), the loop calls
`SampleLogger.write`, which runs one jitted program per phase (compiled at its first use, then
reused) and writes its media under `samples/`:

  diffuse_*        DDIM samples (`sample_ddim_steps`, guidance `config.sample.guidance_scale`) of
                   the stage's modality from the EMA parameters, conditioned like training on the
                   first `sample_count` validation examples (their captions; their images for
                   diffuse_text), decoded by the frozen decoders
  latent_align     the phase's pair generated jointly, conditioned on the captions (audio_video,
                   which has none: on the clip's CLAP token, one of the conditions it trains on)
  autoencoders     reconstructions of those examples: image input | reconstruction side by side,
                   audio through the audio VAE and/or the audio decoder, Optimus' greedy text
  align_encoders   nothing: it trains no generator

Tags: `samples/image`, `samples/video` (frames side by side), `samples/audio` (16 kHz),
`samples/audio_input` (autoencoders: the clip the mel comes from), `samples/audio_mel` (a mel
spectrogram image, low frequencies at the bottom, when no vocoder can be had; a Griffin-Lim
`config.model.audio_decoder` needs none), `samples/text` (a markdown table), and the conditions:
`samples/prompts` (captions) or `samples/condition` (image or audio). Decoders the stage does not read (the vocoder) come from `config.init_from`
when a checkpoint there holds them; otherwise that medium is skipped with one logged note.

The examples are the first `sample_count` of the validation split (a fixed order, centre crops),
the same on every process and at every sampling step, and the noise comes from a fixed key of
its own, so samples are comparable over the run. Sampling reads the state and changes nothing:
the losses, checkpoints and a resumed run are what they would be without it. Every process runs
the program (the parameters may be sharded across processes); only process 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from codi_jax import checkpoint
from codi_jax.audio import decoder as audio_decoder
from codi_jax.audio.mel import HOP, SAMPLE_RATE, fbank_clip, wav_to_fbank
from codi_jax.data import pipeline
from codi_jax.diffusion.ddim import DDIMSampler, initial_noise
from codi_jax.diffusion.schedule import ScheduleConfig
from codi_jax.modality import Modality
from codi_jax.models import autoencoder, optimus, optimus_decode
from codi_jax.pipeline_options import PixelQuantization, quantize_pixels
from codi_jax.text.bpe import clean_generated
from codi_jax.train import data as train_data
from codi_jax.train import objectives
from codi_jax.train.stages import Phase, Stage
from codi_jax.train.state import Flat, init_sources, load_params, merge, positive_int
from codi_jax.train.step import Trainer

TAG = "samples"
VOCODER = "hifigan_vocoder"
# Sampling's own key: fold_in(key(seed), _SAMPLE_STREAM); training's is fold_in(key(seed), step).
_SAMPLE_STREAM = 0x53414D50
_NOISE, _TEXT = 0, 1  # streams of the sampling key
# The parts that turn each modality's latent (or mel) into media.
_DECODERS = {Modality.IMAGE: "autokl", Modality.VIDEO: "autokl", Modality.AUDIO: "audioldm_vae",
             Modality.TEXT: "optimus"}

Raw = dict[str, jax.Array]
ROUND = PixelQuantization.ROUND  # training samples' pixels: the nearest level



def _mel_image(mel: jax.Array) -> jax.Array:
  """Log-mel [N, T, M] -> a [0, 1] image [N, M, T, 1] per clip, low frequencies at the bottom."""
  img = jnp.flip(jnp.swapaxes(mel.astype(jnp.float32), 1, 2), axis=1)  # [N, M, T]
  low = jnp.min(img, axis=(1, 2), keepdims=True)
  high = jnp.max(img, axis=(1, 2), keepdims=True)
  return ((img - low) / jnp.maximum(high - low, 1e-6))[..., None]


def _table(header: tuple[str, str], rows: list[tuple[str, str]]) -> str:
  cell = lambda s: s.replace("|", "\\|").replace("\n", " ") or " "
  lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
  return "\n".join(lines + [f"| {cell(a)} | {cell(b)} |" for a, b in rows])


def _validation_split(config: ml_collections.ConfigDict) -> str:
  """"validation", or "train" (with a note) for a tfds dataset prepared without one."""
  if config.data.source != "tfds":
    return "validation"  # synthetic has one; record shards have no splits and are read as they are
  info = pathlib.Path(config.data.tfds_dir) / "dataset_info.json"
  splits = [s.get("name") for s in json.loads(info.read_text()).get("splits", [])]
  if "validation" in splits:
    return "validation"
  logging.warning("samples: %s has no validation split (it has %s); conditioning samples on the "
                  "first train examples", config.data.tfds_dir, splits)
  return "train"


def validation_examples(config: ml_collections.ConfigDict, modalities, count: int
                        ) -> dict[str, Any]:
  """The first `count` validation examples reading `modalities`, as one host batch: the same on
  every process and every call (fixed shuffle seed, centre crops)."""
  d = config.data
  spec = pipeline.StageData(
      name="samples", modalities=tuple(modalities),
      sources=tuple(train_data.sources(config, _validation_split(config))),
      image_size=d.image_size, num_frames=d.num_frames, audio_samples=d.audio_samples,
      crop=pipeline.Crop.CENTER)
  return next(iter(pipeline.build_pipeline(spec, batch_size=count, seed=config.seed,
                                           process_index=0, process_count=1)))


@dataclasses.dataclass(frozen=True)
class _Program:
  """One phase's compiled sampling: fn(trainable, frozen, extra, batch) -> raw outputs."""

  fn: Callable[..., Raw]
  batch: dict[str, jax.Array]  # the examples, replicated over the mesh
  host: Mapping[str, Any]  # the same examples on the host (captions, condition media)
  condition: Modality | None  # what generation is conditioned on (None: reconstructions)


class SampleLogger:
  """Writes sample media of the stage being trained; build it with `create`."""

  def __init__(self, config: ml_collections.ConfigDict, trainer: Trainer,
               tokenizers: train_data.Tokenizers, frozen: Flat):
    self.config = config
    self.stage: Stage = trainer.stage
    self.models: objectives.Models = trainer.models
    self.every = int(config.train.sample_every)
    self.count = positive_int(config.train, "sample_count")
    self.ddim_steps = positive_int(config.train, "sample_ddim_steps")
    self.tokenizers = tokenizers
    self.frozen = frozen
    self.replicated = NamedSharding(trainer.mesh, PartitionSpec())
    self.nulls = train_data.null_inputs(config, tokenizers)
    self.primary = jax.process_index() == 0
    self.extra, self.unavailable = self._extra_decoders(trainer.mesh)
    self.trace_count = 0  # incremented when a program is traced; one per phase proves no retrace
    self._programs: dict[int, _Program] = {}

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, trainer: Trainer,
             tokenizers: train_data.Tokenizers, frozen: Flat) -> SampleLogger | None:
    """A logger, or None when sampling is off (`sample_every` 0) or the stage makes nothing."""
    every = config.train.sample_every
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
      raise ValueError(f"config.train.sample_every must be a non-negative integer (0: off), "
                       f"got {every!r}")
    if not every:
      return None
    if trainer.stage.name == "align_encoders":
      logging.info("samples: align_encoders trains no generator; no samples are written")
      return None
    return cls(config, trainer, tokenizers, frozen)

  def due(self, step: int, total: int) -> bool:
    return step % self.every == 0 or step == total

  # --- decoders the stage does not read ---------------------------------------------------

  def _wanted_decoders(self) -> set[str]:
    vocoder_needed = audio_decoder.needs_vocoder(self.config.model)
    if self.stage.name == "autoencoders":
      return {VOCODER} if "audioldm_vae" in self.stage.parts and vocoder_needed else set()
    wanted = {_DECODERS[m] for phase in self.stage.phases for m in phase.outputs}
    return wanted | ({VOCODER} if "audioldm_vae" in wanted and vocoder_needed else set())

  def _extra_decoders(self, mesh: Mesh) -> tuple[Flat, set[str]]:
    """(decoders loaded from `init_from`, decoders that could not be had)."""
    missing = sorted(self._wanted_decoders() - set(self.stage.parts))
    sources = init_sources(self.config.init_from)
    held = [p for p in missing if any(p in checkpoint.saved_parts(d) for d in sources)]
    for part in sorted(set(missing) - set(held)):
      what = ("audio is logged as a mel spectrogram image" if part == VOCODER
              else "that medium is not sampled")
      logging.warning("samples: no checkpoint in config.init_from holds %s; %s", part, what)
    extra = load_params(self.config, held, mesh)[0] if held else {}
    return extra, set(missing) - set(held)

  def _has(self, part: str) -> bool:
    return part not in self.unavailable

  def _can_vocode(self) -> bool:
    """Whether log-mel can become a wave: Griffin-Lim always, HiFi-GAN with its parameters."""
    return not audio_decoder.needs_vocoder(self.config.model) or self._has(VOCODER)

  # --- the programs -----------------------------------------------------------------------

  def _program(self, phase_index: int) -> _Program:
    if phase_index not in self._programs:
      phase = self.stage.phases[phase_index]
      host = validation_examples(self.config, phase.modalities, self.count)
      arrays = dict(train_data.arrays(host, self.tokenizers, self.config), **self.nulls)
      batch = {k: jax.make_array_from_callback(v.shape, self.replicated,
                                               lambda i, v=v: v[i])
               for k, v in arrays.items()}
      if phase.outputs:
        condition = phase.condition or (Modality.TEXT if Modality.TEXT in phase.outputs
                                        else phase.outputs[0])
        fn = self._generate_fn(phase, condition)
      else:
        condition, fn = None, self._reconstruct_fn(phase)
      self._programs[phase_index] = _Program(
          jax.jit(fn, out_shardings=self.replicated), batch, host, condition)
    return self._programs[phase_index]

  def _key(self, stream: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed),
                                                 _SAMPLE_STREAM), stream)

  def _decode_audio_mel(self, params, mel: jax.Array, out: Raw, name: str) -> None:
    """Log-mel [N, T, M] -> out[name] wave [N, T * HOP] (the span of its frames), or
    out[name_mel], a mel image, without a vocoder (`audio_decoder.mel_to_wave`)."""
    if self._can_vocode():
      wave = audio_decoder.mel_to_wave(self.config.model, mel, self.models.vocoder,
                                       params.get(VOCODER))
      out[name] = wave[:, :mel.shape[1] * HOP]  # [N, T * HOP]
    else:
      out[f"{name}_mel"] = _mel_image(mel)

  def _generate_fn(self, phase: Phase, condition: Modality) -> Callable[..., Raw]:
    models, config = self.models, self.config
    null_modality = phase.condition or Modality.TEXT  # latent_align trains with the null caption
    sampler = DDIMSampler(lambda p, x, t, c: models.diffusers.apply({"params": p}, x, t, c),
                          self.ddim_steps, 0.0, schedule=ScheduleConfig(**config.diffusion))
    guidance = float(config.sample.guidance_scale)

    def run(trainable: Flat, frozen: Flat, extra: Flat, batch: Raw) -> Raw:
      self.trace_count += 1
      params = merge(trainable, frozen, extra)
      cond = objectives.condition_token(models, params, batch, condition)[:, None]  # [N, 1, D]
      null = objectives.null_token(models, params, batch, null_modality)  # [D]
      # The latents training diffuses, by shape only (eval_shape computes nothing).
      shapes = {m: jax.eval_shape(lambda p, b, m=m: objectives.latent(models, p, b, m),
                                  params, batch).shape for m in phase.outputs}
      x_T = initial_noise(self._key(_NOISE), shapes)
      latents = sampler(params["diffusers"], x_T, cond, jnp.broadcast_to(null, cond.shape),
                        guidance).samples
      out: Raw = {}
      for m, z in latents.items():
        if not self._has(_DECODERS[m]):
          continue  # noted when the logger was built
        if m in (Modality.IMAGE, Modality.VIDEO):
          out[m.value] = quantize_pixels(
              autoencoder.decode_image(models.image_vae, params["autokl"], z), ROUND)
        elif m is Modality.AUDIO:
          mel = autoencoder.decode_audio(models.audio_vae, params["audioldm_vae"], z)
          self._decode_audio_mel(params, mel[..., 0], out, "audio")
        else:
          text = optimus_decode.codi_generate(models.optimus, params["optimus"], z,
                                              self._key(_TEXT), greedy=True)
          out["text_ids"], out["text_lengths"] = text.ids, text.lengths
      return out

    return run

  def _reconstruct_fn(self, phase: Phase) -> Callable[..., Raw]:
    models, parts = self.models, self.stage.parts

    def run(trainable: Flat, frozen: Flat, extra: Flat, batch: Raw) -> Raw:
      self.trace_count += 1
      params = merge(trainable, frozen, extra)
      out: Raw = {}
      if "autokl" in parts:
        vae, p = models.image_vae, {"params": params["autokl"]}
        posterior = vae.apply(p, batch["image"], method=autoencoder.AutoencoderKL.encode)
        recon = vae.apply(p, posterior.mean, method=autoencoder.AutoencoderKL.decode)
        pair = jnp.concatenate([batch["image"], recon], axis=2)  # [N, S, 2S, 3]
        out["image"] = quantize_pixels(pair, ROUND)
      if "audioldm_vae" in parts or VOCODER in parts:
        frames = objectives.audio_frames(batch["audio"].shape[1])
        fbank = wav_to_fbank(batch["audio"], frames)  # [N, T, M]
        mel = fbank
        if "audioldm_vae" in parts:
          vae, p = models.audio_vae, {"params": params["audioldm_vae"]}
          posterior = vae.apply(p, fbank[..., None], method=autoencoder.AutoencoderKL.encode)
          mel = vae.apply(p, posterior.mean, method=autoencoder.AutoencoderKL.decode)[..., 0]
        if self._can_vocode():
          self._decode_audio_mel(params, mel, out, "audio")
          out["audio_input"] = fbank_clip(batch["audio"], frames)  # [N, T * HOP]
        else:
          out["audio_mel"] = _mel_image(jnp.concatenate([fbank, mel], axis=1))  # input | recon
      if "optimus" in parts:
        model, p = models.optimus, params["optimus"]
        posterior = model.apply({"params": p}, batch["bert_ids"], method=optimus.Optimus.encode)
        text = optimus_decode.generate(model, p, posterior.mu, self._key(_TEXT), greedy=True)
        out["text_ids"], out["text_lengths"] = text.ids, text.lengths
      return out

    return run

  # --- writing ----------------------------------------------------------------------------

  def write(self, step: int, phase_index: int, state, writer) -> None:
    """Samples with `state.ema_params` and writes them at `step` (collective: every process
    calls it at the same steps; process 0 writes)."""
    t0 = time.perf_counter()
    program = self._program(phase_index)
    raw = program.fn(state.ema_params, self.frozen, self.extra, program.batch)
    if not self.primary:
      return
    raw = jax.device_get(raw)
    images, videos, audios, texts = {}, {}, {}, {}
    for name in ("image", "audio_mel"):
      if name in raw:
        images[f"{TAG}/{name}"] = raw[name]
    if "video" in raw:
      videos[f"{TAG}/video"] = raw["video"]
    for name in ("audio", "audio_input"):
      if name in raw:
        audios[f"{TAG}/{name}"] = raw[name]
    captions = [str(t) for t in program.host.get("text", [])]
    if "text_ids" in raw:
      made = [clean_generated(self.tokenizers.gpt2.decode_generated(row[:n].tolist()))
              for row, n in zip(raw["text_ids"], raw["text_lengths"])]
      header = {None: ("input", "reconstruction"), Modality.TEXT: ("caption", "sample")}.get(
          program.condition, ("reference caption", "sample"))
      texts[f"{TAG}/text"] = _table(header, list(zip(captions, made)))
    if program.condition is Modality.TEXT:
      texts[f"{TAG}/prompts"] = "\n".join(f"{i + 1}. {c}" for i, c in enumerate(captions))
    elif program.condition is Modality.IMAGE:
      images[f"{TAG}/condition"] = ((np.asarray(program.host["image"]) + 1.0) / 2.0)
    elif program.condition is Modality.AUDIO:
      audios[f"{TAG}/condition"] = np.asarray(program.host["audio"], np.float32)
    if images:
      writer.write_images(step, images)
    if videos:
      writer.write_videos(step, videos)
    if audios:
      writer.write_audios(step, audios, sample_rate=SAMPLE_RATE)
    if texts:
      writer.write_texts(step, texts)
    logging.info("samples at step %d: %s in %.1f s", step,
                 ", ".join(sorted([*images, *videos, *audios, *texts])),
                 time.perf_counter() - t0)

