"""CLAP audio encoder of CoDi: HTSAT (a Swin Transformer on a log-mel image) + projection.

Ported from the original `encoders/clap.py` (`CLAPAudioEmbeddingClassifierFreev2`, fusion
disabled) and its LAION-CLAP copy `clap_modules/open_clip/{htsat.py, model.py}` and
`training/data.py` (CODI_REFERENCE §1.2). CoDi's audio condition is
16 kHz wave -> 48 kHz (torchaudio sinc resampling) -> repeat-pad/crop to 480000 samples ->
log-mel (torchlibrosa) -> bn0 -> bicubic stretch and fold into a square image -> patch embed ->
Swin stages (window attention with relative position bias, shifted windows, patch merging) ->
LayerNorm -> mean over tokens ("embedding") -> `audio_projection` (Linear-ReLU-Linear) -> L2 norm.

Differences from the original, both for determinism: a clip longer than 480000 samples (10 s at
48 kHz) is cropped from its start instead of at a random offset; dropout and the training-only
spec augmentation are absent.

Module names mirror the torch state dict (`audio_branch/layers/0/blocks/1/attn/qkv`, ...), so
`keymap.CLAP` converts checkpoints. bn0's running mean/variance are inference state, not
trainable parameters: they live in the `batch_stats` collection (`bn0/mean`, `bn0/var`). The
relative-position indices and shifted-window masks (torch buffers) are recomputed here, the
torchlibrosa STFT/mel constants in `codi_jax.audio.clap_frontend`. `head` (HTSAT) and
`audio_transform` (CLAP's contrastive MLP) are checkpoint parameters CoDi never evaluates; they
are created at init so the tree covers the checkpoint one-to-one.

B batch, S samples, T frames, M mel bins, H/W token grid, L = H*W tokens, C channels,
nW windows, N = window*window tokens per window, K classes, D joint embedding width.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping, NamedTuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.audio.clap_frontend import log_mel_spectrogram, repeat_pad, spectrogram_to_image
from codi_jax.audio.resample import resample
from codi_jax.convert import keymap
from codi_jax.models.layers import Dtype, check_positive, dense, l2_normalize, layer_norm

# HTSAT's additive mask between tokens of different regions in a shifted window.
SHIFTED_WINDOW_MASK_VALUE = -100.0
_TOKEN_AXES = ("batch", "act_length", "act_embed")

# `create_htsat_model` sizes by `audio_cfg.model_name`.
HTSAT_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2)),
    "base": dict(embed_dim=128, depths=(2, 2, 12, 2)),
    "large": dict(embed_dim=256, depths=(2, 2, 12, 2)),
}


@dataclasses.dataclass(frozen=True)
class ClapAudioConfig:
  """The `audio_cfg` front-end: 48 kHz log-mel (HTSAT-large.json values by default)."""

  sample_rate: int = 48000
  window_size: int = 1024
  hop_size: int = 480
  mel_bins: int = 64
  fmin: float = 50.0
  fmax: float = 14000.0

  def __post_init__(self):
    check_positive("ClapAudioConfig", sample_rate=self.sample_rate, window_size=self.window_size,
              hop_size=self.hop_size, mel_bins=self.mel_bins)
    if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
      raise ValueError(f"ClapAudioConfig: need 0 <= fmin < fmax <= sample_rate / 2, got "
                       f"fmin={self.fmin}, fmax={self.fmax}, sample_rate={self.sample_rate}")


@dataclasses.dataclass(frozen=True)
class HTSATConfig:
  """HTSAT Swin sizes (the "large" model by default)."""

  spec_size: int = 256
  patch_size: int = 4
  patch_stride: int = 4
  embed_dim: int = 256
  depths: tuple[int, ...] = (2, 2, 12, 2)
  num_heads: tuple[int, ...] = (4, 8, 16, 32)
  window_size: int = 8
  mlp_ratio: float = 4.0
  num_classes: int = 527

  def __post_init__(self):
    object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
    object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
    check_positive("HTSATConfig", spec_size=self.spec_size, patch_size=self.patch_size,
              patch_stride=self.patch_stride, embed_dim=self.embed_dim,
              window_size=self.window_size, mlp_ratio=self.mlp_ratio,
              num_classes=self.num_classes)
    if not self.depths or len(self.depths) != len(self.num_heads):
      raise ValueError(f"HTSATConfig: depths {self.depths} and num_heads {self.num_heads} need "
                       "one entry per stage")
    if min(self.depths) < 1 or min(self.num_heads) < 1:
      raise ValueError(f"HTSATConfig: depths {self.depths} and num_heads {self.num_heads} must be "
                       "positive")
    pad = (self.patch_size - self.patch_stride) // 2
    if (self.spec_size + 2 * pad - self.patch_size) // self.patch_stride + 1 != self.grid:
      raise ValueError(f"HTSATConfig: patch_size {self.patch_size} / patch_stride "
                       f"{self.patch_stride} do not tile spec_size {self.spec_size}")
    if self.spec_size % self.patch_stride or self.grid % 2 ** (len(self.depths) - 1):
      raise ValueError(f"HTSATConfig: the {self.spec_size // self.patch_stride}-patch grid "
                       f"cannot be halved {len(self.depths) - 1} times")
    for i, heads in enumerate(self.num_heads):
      if self.stage_dim(i) % heads:
        raise ValueError(f"HTSATConfig: stage {i} width {self.stage_dim(i)} is not divisible "
                         f"by {heads} heads")
      res, window, _ = self.stage_window(i)
      if res % window:
        raise ValueError(f"HTSATConfig: stage {i} grid {res} is not a multiple of window "
                         f"{window}")

  @property
  def grid(self) -> int:
    """Patch grid side after the patch embedding."""
    return self.spec_size // self.patch_stride

  @property
  def num_features(self) -> int:
    """Width of the last stage (the `embedding` size, `model_cfg["embed_dim"]`)."""
    return self.stage_dim(len(self.depths) - 1)

  def stage_dim(self, i: int) -> int:
    return self.embed_dim * 2 ** i

  def stage_window(self, i: int) -> tuple[int, int, int]:
    """(grid side, window, shift of odd blocks) of stage i; a grid no larger than the window is
    one unshifted window, as `SwinTransformerBlock` does."""
    res = self.grid // 2 ** i
    if res <= self.window_size:
      return res, res, 0
    return res, self.window_size, self.window_size // 2


@dataclasses.dataclass(frozen=True)
class ClapConfig:
  """CoDi's CLAP audio encoder: front-end, HTSAT, projection and the CoDi call's constants."""

  audio: ClapAudioConfig = ClapAudioConfig()
  htsat: HTSATConfig = HTSATConfig()
  joint_embed_dim: int = 768
  # CoDi's `clap(wave)`: 16 kHz input; `get_audio_features(max_len=480000, "repeatpad")`.
  input_sample_rate: int = 16000
  clip_samples: int = 480000
  dtype: str = "float32"

  def __post_init__(self):
    check_positive("ClapConfig", joint_embed_dim=self.joint_embed_dim,
              input_sample_rate=self.input_sample_rate, clip_samples=self.clip_samples)
    jnp.dtype(self.dtype)  # raises on an unknown dtype name
    spec, mels = self.htsat.spec_size, self.audio.mel_bins
    if spec % mels:
      raise ValueError(f"ClapConfig: spec_size {spec} must be a multiple of mel_bins {mels}")
    frames = self.clip_samples // self.audio.hop_size + 1
    if frames > spec * self.freq_ratio:
      raise ValueError(f"ClapConfig: {self.clip_samples} samples give {frames} frames, more "
                       f"than the {spec * self.freq_ratio} the {spec}x{spec} image holds")
    final = self.htsat.grid // 2 ** (len(self.htsat.depths) - 1)
    if final % self.freq_ratio:
      raise ValueError(f"ClapConfig: final grid {final} is not a multiple of freq_ratio "
                       f"{self.freq_ratio}")

  @property
  def freq_ratio(self) -> int:
    """Time chunks stacked along frequency in the spectrogram image (spec_size // mel_bins)."""
    return self.htsat.spec_size // self.audio.mel_bins


def clap_config_from_original(model_cfg: Mapping[str, Any], *, joint_embed_shape: int = 768,
                              htsat_sizes: Mapping[str, Any] | None = None) -> ClapConfig:
  """ClapConfig from the original's model json (`HTSAT-large.json`) and wrapper arguments.

  HTSAT sizes come from `create_htsat_model`'s table by `audio_cfg.model_name` unless given
  (keys of HTSATConfig; the fixture registers its own tiny size).
  """
  audio_cfg = model_cfg["audio_cfg"]
  if audio_cfg.get("model_type", "HTSAT") != "HTSAT":
    raise ValueError(f"only the HTSAT audio tower is supported, got {audio_cfg['model_type']!r}")
  if htsat_sizes is None:
    name = audio_cfg.get("model_name")
    if name not in HTSAT_SIZES:
      raise ValueError(f"unknown HTSAT size {name!r}; expected one of {sorted(HTSAT_SIZES)}")
    htsat_sizes = HTSAT_SIZES[name]
  htsat = HTSATConfig(num_classes=int(audio_cfg["class_num"]), **htsat_sizes)
  if int(model_cfg["embed_dim"]) != htsat.num_features:
    raise ValueError(f"model_cfg embed_dim {model_cfg['embed_dim']} != HTSAT output width "
                     f"{htsat.num_features}")
  audio = ClapAudioConfig(sample_rate=int(audio_cfg["sample_rate"]),
                          window_size=int(audio_cfg["window_size"]),
                          hop_size=int(audio_cfg["hop_size"]), mel_bins=int(audio_cfg["mel_bins"]),
                          fmin=float(audio_cfg["fmin"]), fmax=float(audio_cfg["fmax"]))
  return ClapConfig(audio=audio, htsat=htsat, joint_embed_dim=int(joint_embed_shape))


# --- Swin pieces ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def relative_position_index(window: int) -> np.ndarray:
  """[N, N] index into the (2w-1)^2 bias table: (dy + w - 1) * (2w - 1) + dx + w - 1."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
  coords = coords.reshape(2, -1)  # [2, N] (row, col) of each window token
  rel = coords[:, :, None] - coords[:, None, :] + window - 1  # [2, N, N]
  return rel[0] * (2 * window - 1) + rel[1]


@functools.lru_cache(maxsize=16)
def shifted_window_mask(size: int, window: int, shift: int) -> np.ndarray:
  """[nW, N, N] additive mask of a cyclically shifted size x size grid (0 within a region)."""
  region = np.zeros((size, size), np.float32)
  bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  for i, (rows, cols) in enumerate((r, c) for r in bands for c in bands):
    region[rows, cols] = i
  ids = einops.rearrange(region, "(nh wh) (nw ww) -> (nh nw) (wh ww)", wh=window, ww=window)
  differs = ids[:, None, :] != ids[:, :, None]  # [nW, N, N]
  return np.where(differs, SHIFTED_WINDOW_MASK_VALUE, 0.0).astype(np.float32)


def _conv(features: int, kernel: tuple[int, int], *, name: str, stride: int = 1,
          padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0)),
          dtype: Dtype = jnp.float32) -> nn.Conv:
  return nn.Conv(features, kernel, strides=(stride, stride), padding=padding, dtype=dtype,
                 param_dtype=jnp.float32,
                 kernel_init=nn.with_logical_partitioning(
                     nn.initializers.lecun_normal(),
                     ("conv_height", "conv_width", "embed_in", "embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                 name=name)


class WindowAttention(nn.Module):
  """Multi-head self-attention inside windows with a learned relative position bias."""

  heads: int
  window: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: np.ndarray | None) -> jax.Array:
    """x [B, nW, N, C], mask [nW, N, N] or None -> [B, nW, N, C]."""
    c = x.shape[-1]
    table = self.param(
        "relative_position_bias_table",
        nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02),
                                     ("position", "unmodeled")),
        ((2 * self.window - 1) ** 2, self.heads), jnp.float32)
    qkv = dense(3 * c, ("embed_in", "heads"), name="qkv", dtype=self.dtype)(x)  # [B, nW, N, 3C]
    q, k, v = einops.rearrange(qkv, "b w n (s h d) -> s b w h n d", s=3, h=self.heads)
    q = q * (c // self.heads) ** -0.5
    logits = jnp.einsum("bwhnd,bwhmd->bwhnm", q, k)  # [B, nW, heads, N, N]
    index = relative_position_index(self.window)
    bias = einops.rearrange(table[index.reshape(-1)], "(n m) h -> h n m", n=index.shape[0])
    logits = logits + bias.astype(logits.dtype)
    if mask is not None:
      logits = logits + jnp.asarray(mask, logits.dtype)[None, :, None]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bwhnm,bwhmd->bwnhd", probs, v)  # [B, nW, N, heads, C/heads]
    out = out.reshape(out.shape[:3] + (c,))  # [B, nW, N, C]
    return dense(c, ("heads", "embed"), name="proj", dtype=self.dtype)(out)


class SwinBlock(nn.Module):
  """Pre-LN (shifted) window attention + GELU MLP, both residual. x [B, L, C] -> [B, L, C]."""

  heads: int
  size: int
  window: int
  shift: int
  mlp_ratio: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, _, c = x.shape
    w = self.window
    h = layer_norm(name="norm1", dtype=self.dtype)(x).reshape(b, self.size, self.size, c)
    if self.shift:
      h = jnp.roll(h, (-self.shift, -self.shift), axis=(1, 2))
    h = einops.rearrange(h, "b (nh wh) (nw ww) c -> b (nh nw) (wh ww) c", wh=w, ww=w)
    mask = shifted_window_mask(self.size, w, self.shift) if self.shift else None
    h = WindowAttention(self.heads, w, self.dtype, name="attn")(h, mask)  # [B, nW, N, C]
    h = einops.rearrange(h, "b (nh nw) (wh ww) c -> b (nh wh) (nw ww) c", nh=self.size // w,
                         wh=w)  # [B, H, W, C]
    if self.shift:
      h = jnp.roll(h, (self.shift, self.shift), axis=(1, 2))
    x = x + h.reshape(b, -1, c)
    h = Mlp(int(c * self.mlp_ratio), self.dtype, name="mlp")(
        layer_norm(name="norm2", dtype=self.dtype)(x))
    return nn.with_logical_constraint(x + h, _TOKEN_AXES)


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2, back to the input width."""

  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = dense(self.hidden, ("embed_in", "mlp"), name="fc1", dtype=self.dtype)(x)
    return dense(x.shape[-1], ("mlp", "embed"), name="fc2", dtype=self.dtype)(
        nn.gelu(h, approximate=False))


class PatchMerging(nn.Module):
  """2x2 token merge: LayerNorm(4C) -> bias-free Linear to 2C. [B, H*W, C] -> [B, H*W/4, 2C]."""

  size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, _, c = x.shape
    x = x.reshape(b, self.size, self.size, c)
    # Channel order of the original's cat: (even, even), (odd, even), (even, odd), (odd, odd).
    x = einops.rearrange(x, "b (h dh) (w dw) c -> b (h w) (dw dh c)", dh=2, dw=2)  # [B, L/4, 4C]
    x = layer_norm(name="norm", dtype=self.dtype)(x)
    return dense(2 * c, ("embed_in", "embed"), name="reduction", dtype=self.dtype,
                 use_bias=False)(x)


class SwinStage(nn.Module):
  """`BasicLayer`: `blocks/<j>` alternating plain and shifted windows, then `downsample`."""

  config: HTSATConfig
  index: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, i = self.config, self.index
    size, window, shift = cfg.stage_window(i)
    x = _Blocks(cfg.num_heads[i], size, window, shift, cfg.depths[i], cfg.mlp_ratio, self.dtype,
                name="blocks")(x)
    if i < len(cfg.depths) - 1:
      x = PatchMerging(size, self.dtype, name="downsample")(x)
    return x


class _Blocks(nn.Module):
  """The `blocks` ModuleList: SwinBlock `<j>`, shifted when j is odd."""

  heads: int
  size: int
  window: int
  shift: int
  depth: int
  mlp_ratio: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.depth):
      x = SwinBlock(self.heads, self.size, self.window, self.shift if j % 2 else 0,
                    self.mlp_ratio, self.dtype, name=str(j))(x)
    return x


class _Stages(nn.Module):
  """The `layers` ModuleList of SwinStages. [B, L, C] -> [B, L / 4^(stages-1), C * 2^(...)]."""

  config: HTSATConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(len(self.config.depths)):
      x = SwinStage(self.config, i, self.dtype, name=str(i))(x)
    return x


class PatchEmbed(nn.Module):
  """Strided conv `proj` to embed_dim, flattened row-major, then LayerNorm `norm`."""

  config: HTSATConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array) -> jax.Array:
    """image [B, spec, spec, 1] -> tokens [B, grid*grid, embed_dim]."""
    cfg = self.config
    pad = (cfg.patch_size - cfg.patch_stride) // 2
    x = _conv(cfg.embed_dim, (cfg.patch_size, cfg.patch_size), stride=cfg.patch_stride,
              padding=((pad, pad), (pad, pad)), name="proj", dtype=self.dtype)(image)
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, grid*grid, C]
    return layer_norm(name="norm", dtype=self.dtype)(x)


class HTSATOutput(NamedTuple):
  embedding: jax.Array  # [B, C] mean of the final tokens (what CLAP projects)
  clipwise_output: jax.Array  # [B, K] sigmoid class probabilities of the token-semantic head


class HTSAT(nn.Module):
  """`audio_branch`: log-mel [B, T, M] -> bn0 -> image -> Swin -> HTSATOutput."""

  config: ClapConfig

  @nn.compact
  def __call__(self, mel: jax.Array) -> HTSATOutput:
    cfg, dt = self.config.htsat, jnp.dtype(self.config.dtype)
    norm_init = lambda init: nn.with_logical_partitioning(init, ("norm",))
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=jnp.float32,
                     param_dtype=jnp.float32, scale_init=norm_init(nn.initializers.ones),
                     bias_init=norm_init(nn.initializers.zeros), name="bn0")(mel)  # [B, T, M]
    image = spectrogram_to_image(x, cfg.spec_size).astype(dt)  # [B, spec, spec, 1]
    x = PatchEmbed(cfg, dt, name="patch_embed")(image)  # [B, L, C]
    x = _Stages(cfg, dt, name="layers")(x)
    x = layer_norm(name="norm", dtype=dt)(x)  # [B, L', C']
    embedding = jnp.mean(x.astype(jnp.float32), axis=1)  # [B, C']

    # Token-semantic head: the grid's frequency rows are split into freq_ratio groups (one
    # per stacked time chunk); a (rows/freq_ratio x 3) conv over [row-in-group, (group, time)].
    side = cfg.grid // 2 ** (len(cfg.depths) - 1)
    rows = side // self.config.freq_ratio
    g = einops.rearrange(x, "b (a r t) c -> b r (a t) c", r=rows, t=side)  # [B, rows, ., C']
    logits = _conv(cfg.num_classes, (rows, 3), padding=((0, 0), (1, 1)), name="tscam_conv",
                   dtype=dt)(g)  # [B, 1, ., K]
    clipwise = jax.nn.sigmoid(jnp.mean(logits.astype(jnp.float32), axis=(1, 2)))  # [B, K]
    if self.is_initializing():
      dense(cfg.num_classes, ("embed_in", "embed"), name="head")(clipwise)
    return HTSATOutput(embedding, clipwise)


class _LinearReluLinear(nn.Module):
  """Linear -> ReLU -> Linear with the torch Sequential indices of the two Linears."""

  features: int
  names: tuple[str, str]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    first, second = self.names
    h = nn.relu(dense(self.features, ("embed_in", "embed"), name=first, dtype=self.dtype)(x))
    return dense(self.features, ("embed_in", "embed"), name=second, dtype=self.dtype)(h)


class _AudioTransform(nn.Module):
  """CLAP's `audio_transform` (MLPLayers: `sequential/0`, ReLU, Dropout, `sequential/3`)."""

  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _LinearReluLinear(self.features, ("0", "3"), name="sequential")(x)


def _check_waveform(waveform: jax.Array) -> None:
  if waveform.ndim != 3:
    raise ValueError(f"CLAP expects a waveform batch [B, 1, S], got shape {waveform.shape}")
  if waveform.shape[1] != 1:
    raise ValueError(f"CLAP takes mono audio: got {waveform.shape[1]} channels "
                     f"(shape {waveform.shape})")
  if waveform.shape[2] == 0:
    raise ValueError(f"CLAP got an empty waveform (shape {waveform.shape})")
  if not jnp.issubdtype(waveform.dtype, jnp.floating):
    raise ValueError(f"CLAP expects a floating point waveform, got {waveform.dtype}")


def prepare_waveform(waveform: jax.Array, config: ClapConfig) -> jax.Array:
  """CoDi's CLAP input: [B, 1, S] at input_sample_rate -> [B, clip_samples] at 48 kHz."""
  _check_waveform(waveform)
  wave = resample(waveform[:, 0].astype(jnp.float32), config.input_sample_rate,
                  config.audio.sample_rate)  # [B, S * 48k / 16k]
  return repeat_pad(wave, config.clip_samples)


class ClapAudioEncoder(nn.Module):
  """CoDi's `clap` (CLAPAudioEmbeddingClassifierFreev2): `__call__` is `clap(wave)`."""

  config: ClapConfig

  def setup(self):
    self.audio_branch = HTSAT(self.config)
    self.audio_projection = _LinearReluLinear(self.config.joint_embed_dim, ("0", "2"),
                                              jnp.dtype(self.config.dtype))
    self.audio_transform = _AudioTransform(self.config.joint_embed_dim)

  def __call__(self, waveform: jax.Array) -> jax.Array:
    """Mono wave [B, 1, S] at input_sample_rate (16 kHz) -> unit-norm embedding [B, 1, D]."""
    return self.embed(prepare_waveform(waveform, self.config))[:, None, :]

  def log_mel(self, clip: jax.Array) -> jax.Array:
    """[B, clip_samples] at 48 kHz -> log-mel [B, T, M] (dB)."""
    a = self.config.audio
    return log_mel_spectrogram(clip, sample_rate=a.sample_rate, n_fft=a.window_size,
                               hop=a.hop_size, n_mels=a.mel_bins, fmin=a.fmin, fmax=a.fmax)

  def branch(self, clip: jax.Array) -> HTSATOutput:
    """The HTSAT outputs of a prepared clip [B, clip_samples]."""
    return self.audio_branch(self.log_mel(clip))

  def embed(self, clip: jax.Array) -> jax.Array:
    """Prepared clip [B, clip_samples] -> `get_audio_embedding`: unit-norm [B, D]."""
    projected = self.audio_projection(self.branch(clip).embedding)  # [B, D]
    if self.is_initializing():
      self.audio_transform(projected)
    return l2_normalize(projected.astype(jnp.float32))


def init_variables(config: ClapConfig, rng: jax.Array) -> dict:
  """{"params": ..., "batch_stats": ...} of a freshly initialised encoder."""
  wave = jnp.zeros((1, 1, 1), jnp.float32)
  return dict(ClapAudioEncoder(config).init(rng, wave))


def variable_shapes(config: ClapConfig) -> dict:
  """`jax.eval_shape` of `init_variables`: every collection, no memory allocated."""
  return jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))


def param_shapes(config: ClapConfig):
  """The trainable parameters' shapes (bn0's running statistics excluded)."""
  return variable_shapes(config)["params"]


_RUNNING_STATS = re.compile(r"^audio_branch\.bn0\.running_(mean|var)$")


def variables_from_original(state: Mapping[str, np.ndarray], config: ClapConfig, *,
                            prefix: str = "model.") -> dict:
  """Our variables from an original CLAP state dict (keys `<prefix>audio_branch...`; in a full
  CoDi checkpoint the prefix is `clap.model.`). Raises on any missing/unexpected key."""
  shapes = variable_shapes(config)
  owned = lambda k: k.startswith(prefix)
  is_stat = lambda k: owned(k) and bool(_RUNNING_STATS.search(k[len(prefix):]))
  params, report = keymap.CLAP.to_flax(state, shapes["params"], prefix=prefix,
                                       owns=lambda k: owned(k) and not is_stat(k))
  report.check()
  stats, report = keymap.CLAP.to_flax(state, shapes["batch_stats"], prefix=prefix, owns=is_stat)
  report.check()
  return jax.tree_util.tree_map(jnp.asarray, {"params": params, "batch_stats": stats})


@functools.partial(jax.jit, static_argnames=("config",))
def _encode(variables: dict, waveform: jax.Array, config: ClapConfig) -> jax.Array:
  return ClapAudioEncoder(config).apply(variables, waveform)


def clap_encode_audio(variables: dict, waveform: jax.Array, config: ClapConfig, *,
                      sample_rate: int = 16000) -> jax.Array:
  """CoDi `clap_encode_audio`: mono wave [B, 1, S] -> unit-norm audio condition [B, 1, D].

  Jitted once per (config, input shape).
  """
  if sample_rate != config.input_sample_rate:
    raise ValueError(f"CLAP conditioning takes {config.input_sample_rate} Hz audio, got "
                     f"{sample_rate} Hz; resample first")
  return _encode(variables, jnp.asarray(waveform), config)  # shape errors raise while tracing
