"""Any-to-any generation: CoDi's inference path, inputs of any modalities -> outputs of any others.

`CoDiPipeline.generate` runs what the original's `model_module_infer.inference` does
(CODI_REFERENCE §3-4): each input is encoded to a unit-norm token (CLIP text / vision, CLAP audio)
and mixed by weights with its null token beside it (`conditioning.encode_conditions`); the
requested outputs' latents start from one seeded noise draw and are denoised JOINTLY by the DDIM
sampler with classifier-free guidance; the latents are then decoded: the image VAE (per frame for
video), the audio VAE -> HiFi-GAN vocoder (trimmed to the requested length), and Optimus' GPT-2
decoder -> GPT-2 tokenizer text. Everything is deterministic from the seed.

Inputs: text a non-empty string; image uint8 [H, W, 3]; video uint8 [F, H, W, 3]; audio float32
[S] mono at 16 kHz. Outputs (`Generated`): N samples each, image uint8 [N, H, W, 3], video uint8
[N, F, H, W, 3], audio float32 [N, S] at 16 kHz, text N strings.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from codi_jax import checkpoint, components
from codi_jax.audio.mel import HOP, N_MELS, SAMPLE_RATE
from codi_jax.conditioning import PromptEncoders, encode_conditions, normalized_weights
from codi_jax.data.preprocess import to_unit_range
from codi_jax.diffusion.ddim import DDIMSampler, initial_noise
from codi_jax.diffusion.schedule import ScheduleConfig
from codi_jax.modality import Alignment, Modality
from codi_jax.models import autoencoder, optimus, optimus_decode, vocoder
from codi_jax.models.clip import FrozenCLIP
from codi_jax.models.codi import CoDiUNet, codi_config_from_dict
from codi_jax.text import CLIPTokenizer, GPT2Tokenizer
from codi_jax.text.bpe import clean_generated

PyTree = Any

PARTS = checkpoint.PARTS  # a pipeline needs every part
_RNG_NOISE, _RNG_ETA, _RNG_TEXT = 0, 1, 2


class Tokenizers(NamedTuple):
  clip: CLIPTokenizer  # text prompts -> CLIP text tower
  gpt2: GPT2Tokenizer  # Optimus decoder ids -> generated text


def load_tokenizers(directory: str | os.PathLike) -> Tokenizers:
  """The CLIP BPE and GPT-2 vocabularies from one folder (as `shared/tokenizers`)."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"tokenizer folder {directory} does not exist")
  return Tokenizers(CLIPTokenizer.from_file(directory / "clip_bpe_simple_vocab_16e6.txt.gz"),
                    GPT2Tokenizer.from_files(directory / "gpt2-vocab.json",
                                             directory / "gpt2-merges.txt"))


@dataclasses.dataclass(frozen=True)
class Settings:
  """Every setting one `generate` call used (what `result.json` records)."""

  inputs: tuple[str, ...]
  outputs: tuple[str, ...]
  weights: dict[str, float]  # normalised to sum 1
  guidance_scale: float
  ddim_steps: int
  eta: float
  seed: int
  num_samples: int
  image_size: int
  num_frames: int
  audio_seconds: float
  alignment: str
  latent_shapes: dict[str, list[int]]

  def as_json(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in
            dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class Generated:
  """The requested outputs (None for one not requested) and the settings that made them."""

  settings: Settings
  image: np.ndarray | None = None  # uint8 [N, H, W, 3]
  video: np.ndarray | None = None  # uint8 [N, F, H, W, 3]
  audio: np.ndarray | None = None  # float32 [N, S], 16 kHz
  text: list[str] | None = None  # N strings


def _unet_factor(branch) -> int:
  """How many times a 2-D diffuser halves its latent (its levels or its connector's)."""
  return 2 ** max(len(branch.channel_mult) - 1, len(branch.connector_channel_mult) - 1)


def _to_uint8(x: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 pixels (values outside are clipped, as the original does)."""
  return np.round((np.clip(np.asarray(x, np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def _check_input(m: Modality, data: Any) -> Any:
  """One user input, validated -> what `encode_conditions` takes for a batch of one."""
  if m is Modality.TEXT:
    if not isinstance(data, str):
      raise ValueError(f"text input must be a string, got {type(data).__name__}")
    if not data.strip():
      raise ValueError("text input is empty")
    return [data]
  x = np.asarray(data)
  if m is Modality.AUDIO:
    if x.ndim != 1 or x.size == 0 or not np.issubdtype(x.dtype, np.floating):
      raise ValueError(f"audio input must be a non-empty float mono wave [S] at {SAMPLE_RATE} Hz, "
                       f"got {x.dtype} {x.shape}")
    if not np.all(np.isfinite(x)):
      raise ValueError("audio input contains NaN or infinite samples")
    return x.astype(np.float32)[None]  # [1, S]
  rank, layout = (4, "[F, H, W, 3]") if m is Modality.VIDEO else (3, "[H, W, 3]")
  if x.dtype != np.uint8 or x.ndim != rank or x.shape[-1] != 3 or 0 in x.shape:
    raise ValueError(f"{m.value} input must be non-empty uint8 {layout} RGB, got {x.dtype} "
                     f"{x.shape}")
  return to_unit_range(x)[None]  # [1, ...] in [-1, 1]


class CoDiPipeline:
  """CoDi with all its parts loaded: `generate(inputs, outputs, ...)` -> `Generated`.

  Args:
    config: the run config (`configs/codi.py`); `config.model` describes every part and
      `config.sample` / `config.diffusion` give the default sizes and the noise schedule.
    params: {part: tree} for every name in `PARTS` (`clap` is {"params", "batch_stats"}).
    tokenizers: the CLIP and GPT-2 tokenizers (`load_tokenizers`).
  Jitted functions compile once per shape and are reused across calls.
  """

  def __init__(self, config: ml_collections.ConfigDict, params: Mapping[str, PyTree],
               tokenizers: Tokenizers):
    missing = [p for p in PARTS if p not in params]
    if missing:
      raise ValueError(f"the pipeline needs parameters for {missing} (has {sorted(params)})")
    for p in PARTS:
      checkpoint.check_params(config.model, p, params[p])
    self.config = config
    self.tokenizers = tokenizers
    self.params = {p: jax.tree_util.tree_map(jnp.asarray, nn.meta.unbox(params[p])) for p in PARTS}
    model = config.model
    self.codi_config = codi_config_from_dict(model)
    self.image_vae = autoencoder.AutoencoderKL(components.image_vae_config(model))
    self.audio_vae = autoencoder.AutoencoderKL(components.audio_vae_config(model))
    self.vocoder = vocoder.HiFiGAN(components.vocoder_config(model))
    self.optimus = optimus.Optimus(components.optimus_config(model))
    self.encoders = PromptEncoders(
        FrozenCLIP(components.clip_config(model), self.params["clip"]), tokenizers.clip,
        self.params["clap"], components.clap_config(model))
    self.schedule = ScheduleConfig(**config.diffusion)
    self._samplers: dict[tuple, DDIMSampler] = {}
    self._decode_image = jax.jit(functools.partial(autoencoder.decode_image, self.image_vae))
    self._decode_audio = jax.jit(lambda vae_p, voc_p, z: vocoder.mel_to_waveform(
        self.vocoder, voc_p, autoencoder.decode_audio(self.audio_vae, vae_p, z)[..., 0][:, None]))

  @classmethod
  def from_checkpoint(cls, directory: str | os.PathLike, tokenizers_dir: str | os.PathLike
                      ) -> CoDiPipeline:
    """A pipeline from a model checkpoint folder (`codi_jax.checkpoint`) and a tokenizer folder."""
    config, params = checkpoint.load_model(directory, PARTS)
    return cls(config, params, load_tokenizers(tokenizers_dir))

  # --- sizes ---------------------------------------------------------------------------------

  def _branch(self, m: Modality):
    branch = self.codi_config.branches.get(m.branch)
    if branch is None or (m is Modality.VIDEO and not branch.video):
      raise ValueError(f"this model has no diffuser that generates {m.value}")
    return branch

  def latent_shapes(self, outputs: Sequence[Modality], num_samples: int, image_size: int,
                    num_frames: int, audio_seconds: float) -> dict[Modality, tuple[int, ...]]:
    """The latent [N, ...] each output is sampled at, checked against the model's factors."""
    shapes = {}
    n = num_samples
    for m in outputs:
      branch = self._branch(m)
      c = branch.in_channels
      if m in (Modality.IMAGE, Modality.VIDEO):
        step = self.image_vae.config.downsample_factor * _unet_factor(branch)
        if image_size % step:
          raise ValueError(f"image_size {image_size} must be a multiple of {step} (the image "
                           "VAE's and the diffuser's downsampling)")
        s = image_size // self.image_vae.config.downsample_factor
        shapes[m] = (n, s, s, c) if m is Modality.IMAGE else (n, num_frames, s, s, c)
      elif m is Modality.AUDIO:
        f = self.audio_vae.config.downsample_factor
        step = _unet_factor(branch)
        frames = math.ceil(math.ceil(audio_seconds * SAMPLE_RATE / HOP) / f)
        t = step * math.ceil(frames / step)  # the diffuser needs whole halvings; trimmed later
        bins = N_MELS // f
        if bins % step:
          raise ValueError(f"the audio latent's {bins} mel bins do not halve {step} times")
        shapes[m] = (n, t, bins, c)
      else:
        shapes[m] = (n, c)
    return shapes

  def _sampler(self, alignment: Alignment, ddim_steps: int, eta: float) -> DDIMSampler:
    key = (alignment, ddim_steps, eta)
    if key not in self._samplers:
      model = CoDiUNet(dataclasses.replace(self.codi_config, alignment=alignment))
      self._samplers[key] = DDIMSampler(lambda p, x, t, c: model.apply({"params": p}, x, t, c),
                                        ddim_steps, eta, schedule=self.schedule)
    return self._samplers[key]

  # --- generation ----------------------------------------------------------------------------

  def generate(self, inputs: Mapping[Modality | str, Any], outputs: Sequence[Modality | str], *,
               weights: Mapping[Modality | str, float] | None = None,
               guidance_scale: float = 7.5, ddim_steps: int = 50, eta: float = 0.0,
               seed: int = 0, num_samples: int = 1, image_size: int | None = None,
               num_frames: int | None = None, audio_seconds: float | None = None,
               alignment: Alignment | str | None = None) -> Generated:
    """Generate `outputs` conditioned on `inputs` (see the module docstring for the layouts).

    weights: per input modality (default equal), positive, normalised to sum 1.
    image_size, num_frames, audio_seconds: output sizes (default: `config.sample`'s).
    alignment: self | others (default: the model config's).
    """
    sample = self.config.sample
    parsed_inputs = {Modality.parse(k): v for k, v in inputs.items()}
    if not parsed_inputs:
      raise ValueError("at least one input is required")
    if len(parsed_inputs) != len(inputs):
      raise ValueError(f"an input modality is repeated in {list(inputs)}")
    outs = [Modality.parse(m) for m in outputs]
    if not outs:
      raise ValueError("at least one output modality is required")
    if len(set(outs)) != len(outs):
      raise ValueError(f"an output modality is repeated in {[m.value for m in outs]}")
    outs = sorted(outs)
    for k, v in (weights or {}).items():
      if not v > 0:
        raise ValueError(f"the weight of {Modality.parse(k).value} must be positive, got {v}")
    norm = normalized_weights(list(parsed_inputs), weights)
    image_size = int(image_size or sample.image_latent_size
                     * self.image_vae.config.downsample_factor)
    num_frames = int(num_frames or sample.num_frames)
    default_seconds = (sample.audio_latent_frames * self.audio_vae.config.downsample_factor
                       * HOP / SAMPLE_RATE)
    audio_seconds = float(audio_seconds or default_seconds)
    for name, value in (("num_samples", num_samples), ("ddim_steps", ddim_steps),
                        ("image_size", image_size), ("num_frames", num_frames)):
      if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not audio_seconds > 0:
      raise ValueError(f"audio_seconds must be positive, got {audio_seconds}")
    if eta < 0:
      raise ValueError(f"eta must be >= 0, got {eta}")
    align = (self.codi_config.alignment if alignment is None else Alignment.parse(alignment))
    shapes = self.latent_shapes(outs, num_samples, image_size, num_frames, audio_seconds)
    settings = Settings(
        inputs=tuple(m.value for m in sorted(parsed_inputs)), outputs=tuple(m.value for m in outs),
        weights={m.value: w for m, w in sorted(norm.items())},
        guidance_scale=float(guidance_scale), ddim_steps=int(ddim_steps), eta=float(eta),
        seed=int(seed), num_samples=int(num_samples), image_size=image_size,
        num_frames=num_frames, audio_seconds=audio_seconds, alignment=align.value,
        latent_shapes={m.value: list(s) for m, s in shapes.items()})

    checked = {m: _check_input(m, v) for m, v in parsed_inputs.items()}
    conditions = encode_conditions(self.encoders, checked, weights)
    batch = (num_samples,) + conditions.cond.shape[1:]  # [N, 1, D]
    cond = jnp.broadcast_to(conditions.cond, batch)
    uncond = jnp.broadcast_to(conditions.uncond, batch)

    rng = jax.random.key(seed)
    x_T = initial_noise(jax.random.fold_in(rng, _RNG_NOISE), shapes)
    sampler = self._sampler(align, int(ddim_steps), float(eta))
    latents = sampler(self.params["diffusers"], x_T, cond, uncond, guidance_scale,
                      jax.random.fold_in(rng, _RNG_ETA)).samples
    return self._decode(latents, settings, jax.random.fold_in(rng, _RNG_TEXT))

  def _decode(self, latents: Mapping[Modality, jax.Array], settings: Settings,
              text_rng: jax.Array) -> Generated:
    out: dict[str, Any] = {}
    for m, z in latents.items():
      if m in (Modality.IMAGE, Modality.VIDEO):
        out[m.value] = _to_uint8(self._decode_image(self.params["autokl"], z))
      elif m is Modality.AUDIO:
        wave = self._decode_audio(self.params["audioldm_vae"], self.params["hifigan_vocoder"], z)
        length = round(settings.audio_seconds * SAMPLE_RATE)
        out[m.value] = np.asarray(wave[:, 0, :length], np.float32)  # [N, S]
      else:
        generated = optimus_decode.codi_generate(self.optimus, self.params["optimus"], z, text_rng)
        ids, lengths = np.asarray(generated.ids), np.asarray(generated.lengths)
        out[m.value] = [clean_generated(self.tokenizers.gpt2.decode_generated(row[:n].tolist()))
                        for row, n in zip(ids, lengths)]
    return Generated(settings, **out)
