"""Any-to-any generation: CoDi's inference path, inputs of any modalities -> outputs of any others.

`CoDiPipeline.generate` runs what the original's `model_module_infer.inference` does
(CODI_REFERENCE §3-4): each input is encoded to a unit-norm token (CLIP text / vision, CLAP audio)
and mixed by weights with its null token beside it (`conditioning.encode_conditions`); the
requested outputs' latents start from one seeded noise draw and are denoised JOINTLY by the DDIM
sampler with classifier-free guidance; the latents are then decoded: the image VAE (per frame for
video), the audio VAE -> the audio decoder (`config.model.audio_decoder`: the HiFi-GAN vocoder,
or Griffin-Lim on the tiny preset), and Optimus' GPT-2 decoder -> GPT-2 tokenizer text.
Everything is deterministic from the seed, row by row: sample i of a request draws its noise, its
DDIM eta noise and its text tokens from (seed, i) alone, so the same request gives the same result
alone (`generate`) or batched with others (`codi_jax.sample`). `initial_noise` replaces the drawn
x_T with given latents, e.g. to reproduce a run of the original from its noise.

Where ours and the original's inference differ on purpose (pixel rounding, audio trimming, the
original's 512 x 512 regularisation and random flip of image inputs), `config.sample` chooses
(`codi_jax.pipeline_options`); the `full` preset behaves as the original. The end-to-end parity
(`codi_jax.parity.e2e`) runs this pipeline against recorded runs of the original's inference.

Inputs: text a non-empty string; image uint8 [H, W, 3]; video uint8 [F, H, W, 3]; audio float32
[S] mono at 16 kHz. Outputs (`Generated`): N samples each, image uint8 [N, H, W, 3], video uint8
[N, F, H, W, 3], audio float32 [N, S] at 16 kHz (S: the requested length when
`config.sample.trim_audio`, else the whole decoded wave), text N strings.
Latents (x_T, `initial_noise`) are channels last: image [N, h, w, 4], video [N, F, h, w, 4],
audio [N, t, m, 8] (t mel frames / 4, m = 16 bins), text [N, 768] (the original's are channels
first: [N, 4, h, w], [N, 4, F, h, w], [N, 8, t, m]).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from codi_jax import checkpoint, components
from codi_jax.audio import decoder as audio_decoder
from codi_jax.audio.mel import HOP, N_MELS, SAMPLE_RATE
from codi_jax.conditioning import (Conditions, PromptEncoders, encode_conditions,
                                   normalized_weights)
from codi_jax.data.preprocess import to_unit_range
from codi_jax.diffusion.ddim import DDIMSampler, initial_noise as initial_noise_draw
from codi_jax.diffusion.schedule import ScheduleConfig, ddim_parameters, ddpm_schedule
from codi_jax.modality import Alignment, Modality
from codi_jax.models import autoencoder, optimus, optimus_decode, vocoder
from codi_jax.models.clip import FrozenCLIP
from codi_jax.models.codi import CoDiUNet, codi_config_from_dict
from codi_jax.pipeline_options import (PipelineOptions, TextDecoding, quantize_pixels,
                                       regularize_image)
from codi_jax.text import CLIPTokenizer, GPT2Tokenizer, vocab_dir
from codi_jax.text.bpe import clean_generated

PyTree = Any

_RNG_NOISE, _RNG_ETA, _RNG_TEXT, _RNG_IMAGE = 0, 1, 2, 3  # streams of a request's seed
MAX_SEED = 2 ** 32 - 1  # a seed is a JAX PRNG seed: 32 bits; larger ones would be truncated
# The parts that decode each output's latents.
_DECODERS = {Modality.IMAGE: ("autokl",), Modality.VIDEO: ("autokl",),
             Modality.AUDIO: ("audioldm_vae", audio_decoder.VOCODER_PART),
             Modality.TEXT: ("optimus",)}


def required_parts(model_config: Mapping[str, Any]) -> tuple[str, ...]:
  """The parts a pipeline reads: every part, less the vocoder when audio is decoded without it
  (`config.model.audio_decoder`: Griffin-Lim, which the tiny preset trains no vocoder for)."""
  return tuple(p for p in checkpoint.PARTS if p != audio_decoder.VOCODER_PART
               or audio_decoder.needs_vocoder(model_config))


def load_model(directory: str | os.PathLike) -> tuple[ml_collections.ConfigDict, dict[str, PyTree]]:
  """(config, params) of the parts a pipeline reads (`required_parts`) from a model checkpoint."""
  config = checkpoint.load_config(directory)
  return checkpoint.load_model(directory, required_parts(config.model))


class Tokenizers(NamedTuple):
  clip: CLIPTokenizer  # text prompts -> CLIP text tower
  gpt2: GPT2Tokenizer  # Optimus decoder ids -> generated text


def load_tokenizers(directory: str | os.PathLike | None = None) -> Tokenizers:
  """The CLIP BPE and GPT-2 vocabularies from one folder (`vocab_dir`: `directory`,
  $CODI_TOKENIZERS or the bundled ones)."""
  directory = vocab_dir(directory)
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
  text_decoding: str = TextDecoding.SAMPLE.value
  image_flip: bool | None = None  # mirror image inputs (None: as `config.sample` says)
  image_crop: int | None = None  # square crop offset of a non-square image (None: seeded)

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


class Rows(NamedTuple):
  """Host arrays of R sampling rows (`num_samples` per request), as the program takes them.

  Every field is per row, so rows of different requests can be concatenated into one batch.
  Keys are raw key data (`jax.random.key_data`, uint32 [R, K]) so they cross process and device
  boundaries as plain arrays.
  """

  x_T: dict[Modality, np.ndarray]  # initial noise, [R, ...latent] per output
  cond: np.ndarray  # mixed condition tokens [R, 1, D]
  uncond: np.ndarray  # mixed null tokens [R, 1, D]
  guidance: np.ndarray  # classifier-free guidance scale [R]
  eta_keys: np.ndarray  # DDIM eta-noise keys [R, K]
  text_keys: np.ndarray  # Optimus sampling keys [R, K]


@dataclasses.dataclass(frozen=True)
class Program:
  """What one compiled sampling program is specialised to; requests that agree on it can share a
  batch (the guidance scale, seed, inputs and weights are per row)."""

  outputs: tuple[Modality, ...]
  row_shapes: tuple[tuple[Modality, tuple[int, ...]], ...]  # latent shape of one row per output
  num_samples: int  # rows per request (the audio clipping decision spans a request's rows)
  ddim_steps: int
  eta: float
  alignment: Alignment
  text_decoding: TextDecoding = TextDecoding.SAMPLE
  # Also return every step's latents and the decoders' raw outputs (`program_fn`).
  trace: bool = False

  @classmethod
  def of(cls, settings: Settings, *, trace: bool = False) -> Program:
    outputs = tuple(Modality(m) for m in settings.outputs)
    return cls(outputs=outputs,
               row_shapes=tuple((m, tuple(settings.latent_shapes[m.value][1:])) for m in outputs),
               num_samples=settings.num_samples, ddim_steps=settings.ddim_steps,
               eta=settings.eta, alignment=Alignment(settings.alignment),
               text_decoding=TextDecoding(settings.text_decoding), trace=trace)


def _is_integer(value: Any) -> bool:
  return (isinstance(value, (int, np.integer, float)) and not isinstance(value, bool)
          and math.isfinite(value) and int(value) == value)


def _unet_factor(branch) -> int:
  """How many times a 2-D diffuser halves its latent (its levels or its connector's)."""
  return 2 ** max(len(branch.channel_mult) - 1, len(branch.connector_channel_mult) - 1)


def _check_input(m: Modality, data: Any) -> Any:
  """One user input, validated: text as a batch of one, audio float32 [1, S], image and video
  as given (uint8)."""
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
  return x


def _given_noise(shapes: Mapping[Modality, tuple[int, ...]], noise: Mapping[Modality | str, Any]
                 ) -> dict[Modality, np.ndarray]:
  """`initial_noise`, validated against the planned latent shapes -> float32 host arrays."""
  given = {Modality.parse(k): v for k, v in noise.items()}
  if sorted(given) != sorted(shapes):
    raise ValueError(f"initial_noise is given for {sorted(m.value for m in given)}, the outputs "
                     f"are {sorted(m.value for m in shapes)}")
  out = {}
  for m, v in given.items():
    x = np.asarray(v)
    if x.shape != shapes[m] or not np.issubdtype(x.dtype, np.floating):
      raise ValueError(f"initial_noise[{m.value}] must be a float latent {list(shapes[m])} "
                       f"(channels last), got {x.dtype} {list(x.shape)}")
    if not np.all(np.isfinite(x)):
      raise ValueError(f"initial_noise[{m.value}] contains NaN or infinite values")
    out[m] = x.astype(np.float32)
  return out


def _place(tree: PyTree, shardings: PyTree | None) -> PyTree:
  """Host params -> device arrays: on the default device, or laid out by `shardings` (every
  process passes the same host values and keeps only its own shards)."""
  if shardings is None:
    return jax.tree_util.tree_map(jnp.asarray, tree)
  return jax.tree_util.tree_map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
      tree, shardings)


class CoDiPipeline:
  """CoDi with all its parts loaded: `generate(inputs, outputs, ...)` -> `Generated`.

  Args:
    config: the run config (`configs/codi.py`); `config.model` describes every part and
      `config.sample` / `config.diffusion` give the default sizes and the noise schedule.
    params: {part: tree} for every name in `required_parts(config.model)` (`clap` is
      {"params", "batch_stats"}); other parts are ignored.
    tokenizers: the CLIP and GPT-2 tokenizers (`load_tokenizers`).
    shardings: optional {part: tree of `jax.sharding.Sharding`}: those parts are placed with
      them (e.g. FSDP over a mesh, `codi_jax.sample`); other parts go to the default device.
  Jitted functions compile once per shape and are reused across calls.
  """

  def __init__(self, config: ml_collections.ConfigDict, params: Mapping[str, PyTree],
               tokenizers: Tokenizers, shardings: Mapping[str, PyTree] | None = None):
    parts = required_parts(config.model)
    missing = [p for p in parts if p not in params]
    if missing:
      raise ValueError(f"the pipeline needs parameters for {missing} (has {sorted(params)})")
    for p in parts:
      checkpoint.check_params(config.model, p, params[p])
    self.config = config
    self.options = PipelineOptions.from_config(config.sample)
    self.tokenizers = tokenizers
    shardings = dict(shardings or {})
    self.params = {p: _place(nn.meta.unbox(params[p]), shardings.get(p)) for p in parts}
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
    self._programs: dict[Program, Callable] = {}

  @classmethod
  def from_checkpoint(cls, directory: str | os.PathLike,
                      tokenizers_dir: str | os.PathLike | None = None) -> CoDiPipeline:
    """A pipeline from a model checkpoint folder (`codi_jax.checkpoint`) and a tokenizer folder
    (`load_tokenizers`)."""
    config, params = load_model(directory)
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

  def _sampler(self, alignment: Alignment, ddim_steps: int, eta: float, trace: bool
               ) -> DDIMSampler:
    key = (alignment, ddim_steps, eta, trace)
    if key not in self._samplers:
      model = CoDiUNet(dataclasses.replace(self.codi_config, alignment=alignment))
      self._samplers[key] = DDIMSampler(lambda p, x, t, c: model.apply({"params": p}, x, t, c),
                                        ddim_steps, eta, schedule=self.schedule,
                                        return_intermediates=trace)
    return self._samplers[key]

  # --- generation, in reusable steps --------------------------------------------------------
  #
  # plan (validate settings, no model work) -> prepare (one request's rows: conditions, noise,
  # keys) -> program (jitted: joint DDIM + decoding of a batch of rows) -> finish (host-side:
  # trimming, text detokenising). `generate` runs them for one request; `codi_jax.sample` runs
  # them for many requests batched together across devices. Every row's randomness comes from its
  # request's seed and sample index alone, so a request's outputs do not depend on its batch.

  def plan(self, inputs: Iterable[Modality | str], outputs: Sequence[Modality | str], *,
           weights: Mapping[Modality | str, float] | None = None, guidance_scale: float = 7.5,
           ddim_steps: int = 50, eta: float = 0.0, seed: int = 0, num_samples: int = 1,
           image_size: int | None = None, num_frames: int | None = None,
           audio_seconds: float | None = None, alignment: Alignment | str | None = None,
           text_decoding: TextDecoding | str = TextDecoding.SAMPLE,
           image_flip: bool | None = None, image_crop: int | None = None) -> Settings:
    """Every setting of one request, validated and with defaults filled (see `generate`)."""
    sample = self.config.sample
    given = list(inputs)
    parsed_inputs = sorted({Modality.parse(k) for k in given})
    if not parsed_inputs:
      raise ValueError("at least one input is required")
    if len(parsed_inputs) != len(given):
      raise ValueError(f"an input modality is repeated in {given}")
    outs = [Modality.parse(m) for m in outputs]
    if not outs:
      raise ValueError("at least one output modality is required")
    if len(set(outs)) != len(outs):
      raise ValueError(f"an output modality is repeated in {[m.value for m in outs]}")
    outs = sorted(outs)
    for k, v in (weights or {}).items():
      m = Modality.parse(k)
      if m not in parsed_inputs:
        raise ValueError(f"a weight is given for {m.value}, which is not an input "
                         f"({[i.value for i in parsed_inputs]})")
      if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
        raise ValueError(f"the weight of {m.value} must be positive, got {v!r}")
    norm = normalized_weights(parsed_inputs, weights)
    default_seconds = (sample.audio_latent_frames * self.audio_vae.config.downsample_factor
                       * HOP / SAMPLE_RATE)
    if image_size is None:
      image_size = sample.image_latent_size * self.image_vae.config.downsample_factor
    num_frames = sample.num_frames if num_frames is None else num_frames
    audio_seconds = default_seconds if audio_seconds is None else audio_seconds
    for name, value in (("num_samples", num_samples), ("ddim_steps", ddim_steps),
                        ("image_size", image_size), ("num_frames", num_frames)):
      if not _is_integer(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not _is_integer(seed) or not 0 <= seed <= MAX_SEED:
      raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    for name, value in (("audio_seconds", audio_seconds), ("guidance_scale", guidance_scale),
                        ("eta", eta)):
      if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) \
         or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not audio_seconds > 0:
      raise ValueError(f"audio_seconds must be positive, got {audio_seconds}")
    try:
      decoding = TextDecoding(text_decoding)
    except ValueError:
      raise ValueError(f"text_decoding must be one of {[d.value for d in TextDecoding]}, got "
                       f"{text_decoding!r}") from None
    if image_flip is not None and not isinstance(image_flip, (bool, np.bool_)):
      raise ValueError(f"image_flip must be true, false or None, got {image_flip!r}")
    if image_crop is not None and (not _is_integer(image_crop) or image_crop < 0):
      raise ValueError(f"image_crop must be a non-negative integer or None, got {image_crop!r}")
    for name, value in (("image_flip", image_flip), ("image_crop", image_crop)):
      if value is not None and not self.options.image_prompt_size:
        raise ValueError(f"{name} is given, but this config does not regularise image inputs "
                         "(config.sample.image_prompt_size is 0)")
    # The DDIM schedule the request would run (cheap, host-side): step counts it cannot serve
    # and a negative eta fail here, before any batch is built.
    ddim_parameters(int(ddim_steps), float(eta), ddpm_schedule(self.schedule))
    align = (self.codi_config.alignment if alignment is None else Alignment.parse(alignment))
    shapes = self.latent_shapes(outs, int(num_samples), int(image_size), int(num_frames),
                                float(audio_seconds))
    return Settings(
        inputs=tuple(m.value for m in parsed_inputs), outputs=tuple(m.value for m in outs),
        weights={m.value: w for m, w in sorted(norm.items())},
        guidance_scale=float(guidance_scale), ddim_steps=int(ddim_steps), eta=float(eta),
        seed=int(seed), num_samples=int(num_samples), image_size=int(image_size),
        num_frames=int(num_frames), audio_seconds=float(audio_seconds), alignment=align.value,
        latent_shapes={m.value: list(s) for m, s in shapes.items()},
        text_decoding=decoding.value, image_flip=None if image_flip is None else bool(image_flip),
        image_crop=None if image_crop is None else int(image_crop))

  def condition_input(self, settings: Settings, modality: Modality | str, data: Any) -> Any:
    """One user input, validated and prepared as the prompt encoders take it (a batch of one):
    an image input regularised as `config.sample` says (`pipeline_options`; the flip from
    `settings.image_flip`, else drawn from the seed, as is the square crop of a non-square image
    unless `settings.image_crop` gives its offset)."""
    m = Modality.parse(modality)
    x = _check_input(m, data)
    size = self.options.image_prompt_size
    if m is not Modality.IMAGE or not size:
      return to_unit_range(x)[None] if m in (Modality.IMAGE, Modality.VIDEO) else x
    rng = np.random.default_rng((settings.seed, _RNG_IMAGE))  # both draws, whatever is given
    coin = bool(rng.random() < 0.5)
    drawn_flip = self.options.image_prompt_flip and coin
    drawn_offset = int(rng.integers(max(x.shape[:2]) - min(x.shape[:2]) + 1))
    flip = drawn_flip if settings.image_flip is None else settings.image_flip
    offset = drawn_offset if settings.image_crop is None else settings.image_crop
    return regularize_image(x, size, flip=flip, offset=offset)[None]  # [1, S, S, 3]

  def conditions(self, settings: Settings, inputs: Mapping[Modality | str, Any]) -> Conditions:
    """One request's condition and null tokens, mixed and per input ([1, 1, D] each)."""
    parsed = {Modality.parse(k): v for k, v in inputs.items()}
    if sorted(m.value for m in parsed) != sorted(settings.inputs):
      raise ValueError(f"inputs {sorted(m.value for m in parsed)} are not the planned "
                       f"{list(settings.inputs)}")
    checked = {m: self.condition_input(settings, m, v) for m, v in parsed.items()}
    return encode_conditions(self.encoders, checked, settings.weights)

  def prepare(self, settings: Settings, inputs: Mapping[Modality | str, Any],
              initial_noise: Mapping[Modality | str, Any] | None = None) -> Rows:
    """One request's `num_samples` rows: its mixed condition and null tokens (encoded once),
    the initial noise (`initial_noise`, else drawn from its seed), and its per-row DDIM and text
    keys."""
    conditions = self.conditions(settings, inputs)
    n = settings.num_samples
    batch = (n,) + conditions.cond.shape[1:]  # [N, 1, D]
    rng = jax.random.key(settings.seed)
    shapes = {Modality(m): tuple(s) for m, s in settings.latent_shapes.items()}
    if initial_noise is None:
      x_T = {m: np.asarray(v) for m, v in
             initial_noise_draw(jax.random.fold_in(rng, _RNG_NOISE), shapes).items()}
    else:
      x_T = _given_noise(shapes, initial_noise)
    keys = lambda stream: np.asarray(jax.random.key_data(
        jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(rng, stream), i))(jnp.arange(n))))
    return Rows(x_T=x_T,
                cond=np.broadcast_to(np.asarray(conditions.cond, np.float32), batch),
                uncond=np.broadcast_to(np.asarray(conditions.uncond, np.float32), batch),
                guidance=np.full((n,), settings.guidance_scale, np.float32),
                eta_keys=keys(_RNG_ETA), text_keys=keys(_RNG_TEXT))

  def program_params(self, program: Program) -> dict[str, PyTree]:
    """The parts `program` uses: the diffusers and the decoders of its outputs."""
    parts = ["diffusers"]
    for m in program.outputs:
      parts += _DECODERS[m]
    return {p: self.params[p] for p in dict.fromkeys(parts) if p in self.params}

  def program_fn(self, program: Program) -> Callable[[PyTree, Rows], dict[str, jax.Array]]:
    """The pure function `(program_params, rows) -> raw outputs` for rows of `program`'s shape:
    joint DDIM from x_T, then decoding. Raw outputs, one row each: image/video uint8
    (`config.sample.pixel_quantization`), audio the full decoded wave float32 [B, L] (trimmed by
    `finish` if `config.sample.trim_audio`), text_ids [B, T] / text_lengths [B].

    With `program.trace` also, per output m: `latent_<m>` (the final latent), `x_t_<m>` and
    `pred_x0_<m>` [B, steps, ...] (every DDIM step's), `decoded_<m>` (image/video: the VAE's
    float output before quantisation), `mel_audio` [B, T, 64, 1] (the audio VAE's log-mel) and
    `text_latent` [B, Z] (what the GPT-2 decoder reads: latent / scale factor + shift).
    """
    sampler = self._sampler(program.alignment, program.ddim_steps, program.eta, program.trace)
    n = program.num_samples
    pixels = self.options.pixel_quantization
    greedy = program.text_decoding is TextDecoding.GREEDY

    def run(params: PyTree, rows: Rows) -> dict[str, jax.Array]:
      sampled = sampler(params["diffusers"], rows.x_T, rows.cond, rows.uncond, rows.guidance,
                        jax.random.wrap_key_data(rows.eta_keys))
      out = {}
      for m, z in sampled.samples.items():
        if program.trace:
          out[f"latent_{m.value}"] = z
          out[f"x_t_{m.value}"] = jnp.moveaxis(sampled.x_t[m], 0, 1)  # [B, steps, ...]
          out[f"pred_x0_{m.value}"] = jnp.moveaxis(sampled.pred_x0[m], 0, 1)
        if m in (Modality.IMAGE, Modality.VIDEO):
          x = autoencoder.decode_image(self.image_vae, params["autokl"], z)
          out[m.value] = quantize_pixels(x, pixels)
          if program.trace:
            out[f"decoded_{m.value}"] = x
        elif m is Modality.AUDIO:
          # The original clips a batch's latents together: here, each request's rows together.
          mel = autoencoder.decode_audio(self.audio_vae, params["audioldm_vae"], z, clip_group=n)
          out[m.value] = audio_decoder.mel_to_wave(  # [B, L]
              self.config.model, mel[..., 0], self.vocoder,
              params.get(audio_decoder.VOCODER_PART))
          if program.trace:
            out["mel_audio"] = mel
        else:
          latent = optimus_decode.decoder_latent(self.optimus.config, z)
          generated = optimus_decode.generate(self.optimus, params["optimus"], latent,
                                              jax.random.wrap_key_data(rows.text_keys),
                                              greedy=greedy)
          out["text_ids"], out["text_lengths"] = generated.ids, generated.lengths
          if program.trace:
            out["text_latent"] = latent
      return out

    return run

  def finish(self, settings: Settings, raw: Mapping[str, np.ndarray]) -> Generated:
    """One request's raw program outputs (its `num_samples` rows, on the host) -> `Generated`."""
    out: dict[str, Any] = {}
    for name in settings.outputs:
      m = Modality(name)
      if m in (Modality.IMAGE, Modality.VIDEO):
        out[name] = np.asarray(raw[name], np.uint8)
      elif m is Modality.AUDIO:
        wave = np.asarray(raw[name], np.float32)  # [N, L]
        out[name] = wave[:, :round(settings.audio_seconds * SAMPLE_RATE)] \
            if self.options.trim_audio else wave
      else:
        ids, lengths = np.asarray(raw["text_ids"]), np.asarray(raw["text_lengths"])
        out[name] = [clean_generated(self.tokenizers.gpt2.decode_generated(row[:n].tolist()))
                     for row, n in zip(ids, lengths)]
    return Generated(settings, **out)

  def generate(self, inputs: Mapping[Modality | str, Any], outputs: Sequence[Modality | str], *,
               weights: Mapping[Modality | str, float] | None = None,
               guidance_scale: float = 7.5, ddim_steps: int = 50, eta: float = 0.0,
               seed: int = 0, num_samples: int = 1, image_size: int | None = None,
               num_frames: int | None = None, audio_seconds: float | None = None,
               alignment: Alignment | str | None = None,
               text_decoding: TextDecoding | str = TextDecoding.SAMPLE,
               image_flip: bool | None = None, image_crop: int | None = None,
               initial_noise: Mapping[Modality | str, Any] | None = None) -> Generated:
    """Generate `outputs` conditioned on `inputs` (see the module docstring for the layouts).

    weights: per input modality (default equal), positive, normalised to sum 1.
    image_size, num_frames, audio_seconds: output sizes (default: `config.sample`'s).
    alignment: self | others (default: the model config's).
    text_decoding: "sample" (the original's draw from the softmax) or "greedy" (argmax).
    image_flip: mirror an image input left-right (True/False), where the config regularises image
      inputs as the original does (`config.sample.image_prompt_size`); None: drawn from the seed
      when `config.sample.image_prompt_flip`, as the original's random flip, else never.
    image_crop: where such a regularised image input that is not square is cut to a square: the
      offset along its longer side (None: drawn from the seed, as the original's RandomCrop).
    initial_noise: {output: x_T} to start from instead of noise drawn from the seed, each float
      [num_samples, ...latent], channels last (`latent_shapes`; the original's channels-first
      latents need their channel axis moved last, `convert.layout.to_channels_last`).
    """
    settings = self.plan(inputs, outputs, weights=weights, guidance_scale=guidance_scale,
                         ddim_steps=ddim_steps, eta=eta, seed=seed, num_samples=num_samples,
                         image_size=image_size, num_frames=num_frames,
                         audio_seconds=audio_seconds, alignment=alignment,
                         text_decoding=text_decoding, image_flip=image_flip,
                         image_crop=image_crop)
    rows = self.prepare(settings, inputs, initial_noise)
    program = Program.of(settings)
    if program not in self._programs:
      self._programs[program] = jax.jit(self.program_fn(program))
    raw = self._programs[program](self.program_params(program), rows)
    return self.finish(settings, jax.tree_util.tree_map(np.asarray, raw))
