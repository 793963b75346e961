"""KL autoencoders of CoDi: the SD image VAE (`autokl`) and the AudioLDM mel VAE (`audioldm`).

Ported from the original `vae/autokl.py` + `autokl_modules/diffusion_modules.py` and
`vae/audioldm.py` + `audioldm_modules/variational_autoencoder/modules.py` (CODI_REFERENCE
§1.3-1.4). Both are the same network: conv_in, levels of ResnetBlocks (GroupNorm(32, eps 1e-6),
swish, 3x3 convs, 1x1 `nin_shortcut` when the width changes), a stride-2 3x3 downsample with
asymmetric (0, 1) zero padding, a middle block (ResnetBlock, single-head 1x1-conv attention,
ResnetBlock), GN-swish-conv out; the decoder mirrors it with num_res_blocks + 1 blocks per level
and nearest x2 + 3x3 conv upsampling. `quant_conv` maps encoder features to the posterior moments
(mean, logvar), `post_quant_conv` maps a latent back. Used settings of the original only: no
timestep embedding, dropout 0, vanilla attention, no video decoder layers (`use_video_arch` is
commented out in `sd.yaml`), no time-stride-4 resampling (AudioLDM's `downsample_time` yaml field
is swallowed by the Encoder's `**ignore_kwargs` and changes nothing).

The module tree mirrors the torch keys (`encoder/down/0/block/1/norm1/scale` =
`encoder.down.0.block.1.norm1.weight`), so the key map is `keymap.AUTOENCODER`.

CoDi-level helpers (`encode_image`, `decode_image`, `encode_audio`, `decode_audio`) add the latent
scale factors (0.18215 image/video, 0.9228 audio) and AudioLDM's waveform -> log-mel step.

Layout: channels last. B batch, F frames, H/W spatial (audio: H = T mel frames, W = M = 64 mel
bins), C channels, Z latent channels (embed_dim), L = H*W positions.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Mapping, NamedTuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from codi_jax.audio.mel import SAMPLE_RATE, fbank_frames, wav_to_fbank
from codi_jax.models.layers import Dtype, GroupNorm, Upsample, default_init

PyTree = Any

GROUPNORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)
IMAGE_SCALE_FACTOR = 0.18215
AUDIO_SCALE_FACTOR = 0.9228
# `CoDi.audioldm_decode`: latents whose max |z| exceeds this are clipped to +-AUDIO_CLIP first.
AUDIO_CLIP_THRESHOLD = 100.0
AUDIO_CLIP = 10.0
# Logical axes of activations at level boundaries ([N, H, W, C]).
ACTIVATION_AXES = ("batch", "act_height", "act_width", "act_embed")


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """One KL autoencoder; field names follow the original `ddconfig` (+ embed_dim, scale)."""

  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = ()
  in_channels: int = 3
  out_ch: int = 3
  z_channels: int = 4
  embed_dim: int = 4
  double_z: bool = True
  resolution: int = 256
  scale_factor: float = IMAGE_SCALE_FACTOR
  # Diffusion latent = scale_factor * (z - shift_factor). The released VAEs use a scale only
  # (shift 0); a VAE trained from scratch gets both from its latents' statistics
  # (`codi_jax.train.latent_stats`), so the diffusers see a latent of mean ~0 and std ~1.
  shift_factor: float = 0.0
  # Input normalisation: the encoder reads (x - input_shift) / input_scale and `decode` maps its
  # output back (x * input_scale + input_shift), so callers always see the data's own units. The
  # released VAEs read raw inputs (0 / 1, graphs unchanged); the tiny audio VAE trained from
  # scratch reads log-mel normalised to mean ~0 and std ~1 (`configs/codi.py`).
  input_shift: float = 0.0
  input_scale: float = 1.0

  def __post_init__(self):
    object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
    object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
    if not self.ch_mult or min(self.ch_mult) < 1:
      raise ValueError(f"AutoencoderConfig.ch_mult must be non-empty and positive, got "
                       f"{self.ch_mult}")
    for m in (1,) + self.ch_mult:
      if (self.ch * m) % 32:
        raise ValueError(f"AutoencoderConfig: width ch*{m} = {self.ch * m} is not divisible into "
                         "the 32 GroupNorm groups")
    for name in ("num_res_blocks", "in_channels", "out_ch", "z_channels", "embed_dim",
                 "resolution"):
      if getattr(self, name) < 1:
        raise ValueError(f"AutoencoderConfig.{name} must be positive, got {getattr(self, name)}")
    if not self.double_z:
      raise ValueError("AutoencoderConfig.double_z must be True: quant_conv reads 2*z_channels "
                       "(mean and logvar) as in the original")
    if not self.scale_factor > 0:
      raise ValueError(f"AutoencoderConfig.scale_factor must be positive, got {self.scale_factor}")
    if not self.input_scale > 0:
      raise ValueError(f"AutoencoderConfig.input_scale must be positive, got {self.input_scale}")

  @property
  def normalises_input(self) -> bool:
    return self.input_shift != 0.0 or self.input_scale != 1.0

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)


# The released CoDi VAEs (`configs/model/sd.yaml`, `audioldm.yaml`).
IMAGE_VAE = AutoencoderConfig()
AUDIO_VAE = AutoencoderConfig(ch_mult=(1, 2, 4), in_channels=1, out_ch=1, z_channels=8,
                              embed_dim=8, scale_factor=AUDIO_SCALE_FACTOR)

# ddconfig fields of the original that must keep their default for this port to be exact.
_REQUIRED_DEFAULTS = {"dropout": 0.0, "resamp_with_conv": True, "use_linear_attn": False,
                      "attn_type": "vanilla", "use_video_arch": False, "give_pre_end": False,
                      "tanh_out": False, "downsample_time_stride4_levels": []}
_DDCONFIG_FIELDS = {"ch", "ch_mult", "num_res_blocks", "attn_resolutions", "in_channels",
                    "out_ch", "z_channels", "double_z", "resolution", "downsample_time"}


def autoencoder_config_from_original(args: Mapping[str, Any],
                                     scale_factor: float) -> AutoencoderConfig:
  """The original's model `args` (`ddconfig` + `embed_dim`, as in `sd.yaml`/`audioldm.yaml`)."""
  try:
    dd = dict(args["ddconfig"])
    embed_dim = int(args["embed_dim"])
  except KeyError as e:
    raise ValueError(f"autoencoder config is missing the field {e.args[0]!r}") from None
  unknown = set(dd) - _DDCONFIG_FIELDS - set(_REQUIRED_DEFAULTS)
  if unknown:
    raise ValueError(f"autoencoder ddconfig: unknown fields {sorted(unknown)}")
  for name, default in _REQUIRED_DEFAULTS.items():
    if name in dd and dd[name] != default:
      raise ValueError(f"autoencoder ddconfig: {name}={dd[name]!r} is not supported (only the "
                       f"original's default {default!r})")
  try:
    return AutoencoderConfig(
        ch=int(dd["ch"]), ch_mult=tuple(dd["ch_mult"]), num_res_blocks=int(dd["num_res_blocks"]),
        attn_resolutions=tuple(dd["attn_resolutions"]), in_channels=int(dd["in_channels"]),
        out_ch=int(dd["out_ch"]), z_channels=int(dd["z_channels"]), embed_dim=embed_dim,
        double_z=bool(dd.get("double_z", True)), resolution=int(dd["resolution"]),
        scale_factor=float(scale_factor))
  except KeyError as e:
    raise ValueError(f"autoencoder ddconfig is missing the field {e.args[0]!r}") from None


def _conv(features: int, *, kernel: int = 3, stride: int = 1,
          padding: tuple[tuple[int, int], tuple[int, int]] | None = None, name: str | None = None,
          dtype: Dtype = jnp.float32) -> nn.Conv:
  """A Conv2d, kernel HWIO; torch's symmetric `padding=k//2` unless `padding` is given."""
  pad = kernel // 2
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride),
      padding=((pad, pad), (pad, pad)) if padding is None else padding,
      dtype=dtype, param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(
          default_init, ("conv_height", "conv_width", "embed_in", "embed")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
      name=name)


def _norm(name: str, dtype: Dtype) -> GroupNorm:
  return GroupNorm(epsilon=GROUPNORM_EPS, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
  """GN-swish-conv1, GN-swish-conv2, plus x (through `nin_shortcut` when widths differ)."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.swish(_norm("norm1", self.dtype)(x))
    h = _conv(self.features, name="conv1", dtype=self.dtype)(h)
    h = nn.swish(_norm("norm2", self.dtype)(h))
    h = _conv(self.features, name="conv2", dtype=self.dtype)(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, kernel=1, name="nin_shortcut", dtype=self.dtype)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all positions with 1x1-conv q/k/v/proj_out, residual."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, height, width, c = x.shape
    h = _norm("norm", self.dtype)(x)
    q, k, v = (einops.rearrange(_conv(c, kernel=1, name=name, dtype=self.dtype)(h),
                                "n h w c -> n (h w) c") for name in ("q", "k", "v"))  # [N, L, C]
    logits = jnp.einsum("nic,njc->nij", q, k).astype(jnp.float32) * c ** -0.5  # [N, L, L]
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    h = jnp.einsum("nij,njc->nic", weights, v).reshape(n, height, width, c)  # [N, H, W, C]
    return x + _conv(c, kernel=1, name="proj_out", dtype=self.dtype)(h)


class Downsample(nn.Module):
  """Zero-pad bottom/right by 1, then a stride-2 3x3 valid conv (`downsample.conv`)."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _conv(x.shape[-1], stride=2, padding=((0, 1), (0, 1)), name="conv",
                 dtype=self.dtype)(x)


class _ResnetBlocks(nn.Module):
  """A level's `block` ModuleList: child str(j) is ResnetBlock j, built on its first call."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, index: int, x: jax.Array, features: int) -> jax.Array:
    return ResnetBlock(features, self.dtype, name=str(index))(x)


class _AttnBlocks(nn.Module):
  """A level's `attn` ModuleList: child str(j) follows ResnetBlock j."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, index: int, x: jax.Array) -> jax.Array:
    return AttnBlock(self.dtype, name=str(index))(x)


class Resample(enum.Enum):
  """What follows a level's blocks: `downsample` (encoder) or `upsample` (decoder)."""

  DOWN = "downsample"
  UP = "upsample"


class Level(nn.Module):
  """One resolution level (`down.i` / `up.i`): blocks (+ attention), then the resampler."""

  features: int
  num_blocks: int
  attention: bool
  resample: Resample | None  # None: the encoder's last level, the decoder's level 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    blocks = _ResnetBlocks(self.dtype, name="block")
    attns = _AttnBlocks(self.dtype, name="attn")
    for j in range(self.num_blocks):
      h = blocks(j, h, self.features)
      if self.attention:
        h = attns(j, h)
    if self.resample is Resample.DOWN:
      h = Downsample(self.dtype, name=Resample.DOWN.value)(h)
    elif self.resample is Resample.UP:
      h = Upsample(self.dtype, name=Resample.UP.value)(h)
    return nn.with_logical_constraint(h, ACTIVATION_AXES)


class _Levels(nn.Module):
  """The `down` / `up` ModuleList: child str(i) is level i."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, index: int, h: jax.Array, **level: Any) -> jax.Array:
    return Level(**level, dtype=self.dtype, name=str(index))(h)


class Mid(nn.Module):
  """`mid`: block_1, attn_1, block_2 at constant width."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    c = h.shape[-1]
    h = ResnetBlock(c, self.dtype, name="block_1")(h)
    h = AttnBlock(self.dtype, name="attn_1")(h)
    h = ResnetBlock(c, self.dtype, name="block_2")(h)
    return nn.with_logical_constraint(h, ACTIVATION_AXES)


class Encoder(nn.Module):
  """x [N, H, W, in_channels] -> features [N, H/f, W/f, 2 z_channels], f = 2**(levels-1)."""

  config: AutoencoderConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    h = _conv(cfg.ch, name="conv_in", dtype=self.dtype)(x)
    down = _Levels(self.dtype, name="down")
    res = cfg.resolution  # attention placement follows the configured, not the actual, size
    for i, mult in enumerate(cfg.ch_mult):
      last = i == len(cfg.ch_mult) - 1
      h = down(i, h, features=cfg.ch * mult, num_blocks=cfg.num_res_blocks,
               attention=res in cfg.attn_resolutions, resample=None if last else Resample.DOWN)
      res = res if last else res // 2
    h = Mid(self.dtype, name="mid")(h)
    h = nn.swish(_norm("norm_out", self.dtype)(h))
    return _conv(2 * cfg.z_channels, name="conv_out", dtype=self.dtype)(h)


class Decoder(nn.Module):
  """z [N, h, w, z_channels] -> x [N, h*f, w*f, out_ch]."""

  config: AutoencoderConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg = self.config
    h = _conv(cfg.ch * cfg.ch_mult[-1], name="conv_in", dtype=self.dtype)(z)
    h = Mid(self.dtype, name="mid")(h)
    up = _Levels(self.dtype, name="up")
    res = cfg.resolution // cfg.downsample_factor
    for i in reversed(range(len(cfg.ch_mult))):
      h = up(i, h, features=cfg.ch * cfg.ch_mult[i], num_blocks=cfg.num_res_blocks + 1,
             attention=res in cfg.attn_resolutions, resample=Resample.UP if i else None)
      res = res * 2 if i else res
    h = nn.swish(_norm("norm_out", self.dtype)(h))
    return _conv(cfg.out_ch, name="conv_out", dtype=self.dtype)(h)


class DiagonalGaussian(NamedTuple):
  """The posterior N(mean, exp(logvar)), logvar clamped to [-30, 20]; a (mean, logvar) pair."""

  mean: jax.Array
  logvar: jax.Array

  def mode(self) -> jax.Array:
    return self.mean

  def sample(self, rng: jax.Array) -> jax.Array:
    noise = jax.random.normal(rng, self.mean.shape, self.mean.dtype)
    return self.mean + jnp.exp(0.5 * self.logvar) * noise

  def latent(self, rng: jax.Array | None) -> jax.Array:
    """A sample with `rng`, the mode without."""
    return self.mode() if rng is None else self.sample(rng)


class AutoencoderKL(nn.Module):
  """Image (`autokl`) or audio (`audioldm`) KL autoencoder.

  `encode`/`decode` take 4-D [B, H, W, C] or, folded per frame like the original's video path,
  5-D [B, F, H, W, C] arrays.
  """

  config: AutoencoderConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype)
    self.decoder = Decoder(cfg, self.dtype)
    self.quant_conv = _conv(2 * cfg.embed_dim, kernel=1, dtype=self.dtype)
    self.post_quant_conv = _conv(cfg.z_channels, kernel=1, dtype=self.dtype)

  def _fold(self, x: jax.Array, channels: int, what: str) -> tuple[jax.Array, int | None]:
    if x.ndim not in (4, 5) or x.shape[-1] != channels:
      raise ValueError(f"AutoencoderKL.{what}: expected [B, H, W, {channels}] or "
                       f"[B, F, H, W, {channels}] (channels last), got shape {x.shape}")
    if x.ndim == 4:
      return x, None
    return einops.rearrange(x, "b f h w c -> (b f) h w c"), x.shape[1]  # [B*F, H, W, C]

  @staticmethod
  def _unfold(x: jax.Array, frames: int | None) -> jax.Array:
    if frames is None:
      return x
    return einops.rearrange(x, "(b f) h w c -> b f h w c", f=frames)  # [B, F, H, W, C]

  def encode(self, x: jax.Array) -> DiagonalGaussian:
    """x [B, (F,) H, W, in_channels] -> posterior over [B, (F,) H/f, W/f, Z]."""
    x, frames = self._fold(x, self.config.in_channels, "encode")
    if self.config.normalises_input:
      x = (x - self.config.input_shift) / self.config.input_scale
    f = self.config.downsample_factor
    if x.shape[1] < f or x.shape[2] < f:
      raise ValueError(f"AutoencoderKL.encode: spatial size {x.shape[1:3]} is smaller than the "
                       f"downsampling factor {f}")
    moments = self._unfold(self.quant_conv(self.encoder(x.astype(self.dtype))), frames)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)  # [..., Z] each
    return DiagonalGaussian(mean, jnp.clip(logvar, *LOGVAR_RANGE))

  def decode(self, z: jax.Array) -> jax.Array:
    """z [B, (F,) h, w, Z] -> x [B, (F,) h*f, w*f, out_ch], float32."""
    z, frames = self._fold(z, self.config.embed_dim, "decode")
    x = self.decoder(self.post_quant_conv(z.astype(self.dtype)))
    if self.config.normalises_input:
      x = x.astype(jnp.float32) * self.config.input_scale + self.config.input_shift
    return self._unfold(x, frames).astype(jnp.float32)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None
               ) -> tuple[jax.Array, DiagonalGaussian]:
    """Reconstruction of x through a posterior sample (`rng`) or its mode, and the posterior."""
    posterior = self.encode(x)
    return self.decode(posterior.latent(rng)), posterior


def init_params(config: AutoencoderConfig, rng: jax.Array) -> PyTree:
  """Initial (logically partitioned) parameters."""
  f = config.downsample_factor
  x = jnp.zeros((1, f, f, config.in_channels), jnp.float32)
  return AutoencoderKL(config).init(rng, x)["params"]


def param_shapes(config: AutoencoderConfig) -> PyTree:
  """`jax.eval_shape` of `init_params`: the full tree with no memory allocated."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


# --- CoDi-level latent helpers (`core/models/codi.py`, CODI_REFERENCE §1.4). ---------------------

def encode_image(model: AutoencoderKL, params: PyTree, x: jax.Array,
                 rng: jax.Array | None = None) -> jax.Array:
  """`CoDi.autokl_encode`: x in [-1, 1], [B, H, W, 3] or video [B, F, H, W, 3] -> scaled latent.

  The original draws a posterior sample; pass `rng` for that, or None for the mode.
  """
  posterior = model.apply({"params": params}, x, method=AutoencoderKL.encode)
  return scale_latent(model.config, posterior.latent(rng))


def decode_image(model: AutoencoderKL, params: PyTree, z: jax.Array) -> jax.Array:
  """`CoDi.autokl_decode`: scaled latent [B, (F,) h, w, 4] -> x [B, (F,) 8h, 8w, 3], ~[-1, 1]."""
  return model.apply({"params": params}, unscale_latent(model.config, z),
                     method=AutoencoderKL.decode)


def scale_latent(config: AutoencoderConfig, z: jax.Array) -> jax.Array:
  """VAE latent -> diffusion latent: scale_factor * (z - shift_factor)."""
  return config.scale_factor * (z - config.shift_factor)


def unscale_latent(config: AutoencoderConfig, z: jax.Array) -> jax.Array:
  """Diffusion latent -> VAE latent (the inverse of `scale_latent`)."""
  return z / config.scale_factor + config.shift_factor


def encode_audio(model: AutoencoderKL, params: PyTree, wave: jax.Array, *, time: float,
                 rng: jax.Array | None = None, sample_rate: int = SAMPLE_RATE) -> jax.Array:
  """`CoDi.audioldm_encode`: 16 kHz mono wave [B, T] -> scaled latent [B, t/4, 16, 8].

  The first `int(time * 102.4)` log-mel frames of the (peak-normalised, padded/cropped) clip
  are encoded; the original's CoDi default is time=2.0, the released latents use 10.24 s.
  """
  if model.config.in_channels != 1:
    raise ValueError(f"encode_audio: the autoencoder takes {model.config.in_channels} input "
                     "channels; the AudioLDM VAE takes one log-mel channel")
  fbank = wav_to_fbank(wave, fbank_frames(time), sample_rate=sample_rate)  # [B, t, M]
  posterior = model.apply({"params": params}, fbank[..., None], method=AutoencoderKL.encode)
  return scale_latent(model.config, posterior.latent(rng))


def decode_audio(model: AutoencoderKL, params: PyTree, z: jax.Array,
                 clip_group: int | None = None) -> jax.Array:
  """`CoDi.audioldm_decode`: scaled latent [B, t, 16, 8] -> log-mel [B, 4t, 64, 1].

  As in the original, if any |z| in the batch exceeds 100 the whole batch is clipped to
  [-10, 10] first. clip_group: decide that per consecutive group of this many rows instead (the
  original's batch is one request's samples; a sampling job batches many requests together).
  """
  if z.ndim != 4:
    raise ValueError(f"decode_audio: expected a latent [B, t, m, Z], got shape {z.shape}")
  group = z.shape[0] if clip_group is None else clip_group
  if group < 1 or z.shape[0] % group:
    raise ValueError(f"decode_audio: clip_group {clip_group} does not divide the batch "
                     f"{z.shape[0]}")
  peak = jnp.max(jnp.abs(z).reshape(-1, group, math.prod(z.shape[1:])), axis=(1, 2))  # [B/g]
  clipped = jnp.repeat(peak > AUDIO_CLIP_THRESHOLD, group)[:, None, None, None]  # [B, 1, 1, 1]
  z = jnp.where(clipped, jnp.clip(z, -AUDIO_CLIP, AUDIO_CLIP), z)
  return model.apply({"params": params}, unscale_latent(model.config, z),
                     method=AutoencoderKL.decode)

