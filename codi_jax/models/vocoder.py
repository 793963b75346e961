"""HiFi-GAN vocoder (`audioldm.vocoder`): log-mel frames -> 16 kHz waveform.

Ported from the original `audioldm_modules/hifigan/models.py` `Generator` as `get_vocoder` builds
it (weight norm removed, CODI_REFERENCE §1.3): conv_pre, then per upsample stage a leaky ReLU
(slope 0.1), a transposed conv and the average of `len(resblock_kernel_sizes)` ResBlock1s
(dilated conv pairs with residuals), then a leaky ReLU with torch's default slope 0.01, conv_post
and tanh. The original always builds ResBlock1 (its `resblock` field is never read).

Child names mirror the torch state-dict keys (`ups/0/kernel` = `ups.0.weight`,
`resblocks/4/convs1/2/kernel` = `resblocks.4.convs1.2.weight`); the key map is `keymap.VOCODER`.

Length: a transposed conv of rate u, kernel k and torch padding (k - u) // 2 maps L frames to
(L - 1) * u - 2 * ((k - u) // 2) + k samples, which is u * L + 1 when k - u is odd. For the
released config ([5, 4, 2, 2, 2] with kernels [16, 16, 8, 4, 4]) T mel frames give 160 * T + 32
samples, not 160 * T.

Layout: channels last. B batch, T mel frames, M mel bins, L samples (after an upsample stage),
C channels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from codi_jax.models.layers import Dtype, default_init

# Slope of the leaky ReLUs inside the generator (the original's LRELU_SLOPE); the one before
# conv_post is torch's default.
LRELU_SLOPE = 0.1
FINAL_LRELU_SLOPE = 0.01


@dataclasses.dataclass(frozen=True)
class VocoderConfig:
  """The original's HiFi-GAN hyper-parameters (`HIFIGAN_16K_64` field names)."""

  num_mels: int = 64
  upsample_rates: tuple[int, ...] = (5, 4, 2, 2, 2)
  upsample_kernel_sizes: tuple[int, ...] = (16, 16, 8, 4, 4)
  upsample_initial_channel: int = 1024
  resblock: str = "1"
  resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
  resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
  sampling_rate: int = 16000

  def __post_init__(self):
    if self.num_mels < 1:
      raise ValueError(f"VocoderConfig: num_mels must be positive, got {self.num_mels}")
    if self.resblock != "1":
      raise ValueError(f"VocoderConfig: resblock {self.resblock!r} is not supported; the original "
                       "Generator only builds ResBlock1 (resblock '1')")
    if self.sampling_rate < 1:
      raise ValueError(f"VocoderConfig: sampling_rate must be positive, got {self.sampling_rate}")
    if not self.upsample_rates:
      raise ValueError("VocoderConfig: upsample_rates is empty")
    if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
      raise ValueError(f"VocoderConfig: {len(self.upsample_rates)} upsample_rates but "
                       f"{len(self.upsample_kernel_sizes)} upsample_kernel_sizes")
    for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes):
      if u < 1 or k < u:
        raise ValueError(f"VocoderConfig: upsample rate {u} with kernel {k} (need 1 <= rate <= "
                         "kernel)")
    if self.upsample_initial_channel % 2 ** len(self.upsample_rates):
      raise ValueError(f"VocoderConfig: upsample_initial_channel {self.upsample_initial_channel} "
                       f"is not divisible by 2**{len(self.upsample_rates)} (one halving per "
                       "upsample stage)")
    if not self.resblock_kernel_sizes:
      raise ValueError("VocoderConfig: resblock_kernel_sizes is empty")
    if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
      raise ValueError(f"VocoderConfig: {len(self.resblock_kernel_sizes)} resblock_kernel_sizes "
                       f"but {len(self.resblock_dilation_sizes)} resblock_dilation_sizes")
    for k, d in zip(self.resblock_kernel_sizes, self.resblock_dilation_sizes):
      if k < 1 or k % 2 == 0:
        raise ValueError(f"VocoderConfig: resblock kernel size {k} must be odd and positive "
                         "(a length-preserving 'same' conv)")
      if len(d) != 3 or min(d) < 1:
        raise ValueError(f"VocoderConfig: resblock dilations {d} must be three positive ints "
                         "(ResBlock1 has three conv pairs)")

  @property
  def hop_length(self) -> int:
    """Samples per mel frame, prod(upsample_rates) (160 for the released vocoder)."""
    return math.prod(self.upsample_rates)

  def num_samples(self, num_frames: int) -> int:
    """Exact output length for `num_frames` mel frames (torch ConvTranspose1d arithmetic)."""
    length = num_frames
    for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes):
      length = (length - 1) * u - 2 * ((k - u) // 2) + k
    return length


def vocoder_config_from_original(h: Mapping[str, Any]) -> VocoderConfig:
  """The original's HiFi-GAN dict (`HIFIGAN_16K_64`, the fixture's `hifigan_config`)."""
  try:
    return VocoderConfig(
        num_mels=int(h["num_mels"]),
        upsample_rates=tuple(int(u) for u in h["upsample_rates"]),
        upsample_kernel_sizes=tuple(int(k) for k in h["upsample_kernel_sizes"]),
        upsample_initial_channel=int(h["upsample_initial_channel"]),
        resblock=str(h["resblock"]),
        resblock_kernel_sizes=tuple(int(k) for k in h["resblock_kernel_sizes"]),
        resblock_dilation_sizes=tuple(tuple(int(d) for d in ds)
                                      for ds in h["resblock_dilation_sizes"]),
        sampling_rate=int(h["sampling_rate"]),
    )
  except KeyError as e:
    raise ValueError(f"HiFi-GAN config is missing the field {e.args[0]!r}") from None


def _conv1d(features: int, kernel: int, *, name: str, dilation: int = 1,
            dtype: Dtype = jnp.float32) -> nn.Conv:
  """torch Conv1d(stride 1, padding = get_padding(kernel, dilation)); kernel [k, in, out]."""
  pad = (kernel * dilation - dilation) // 2
  return nn.Conv(
      features,
      (kernel,),
      kernel_dilation=(dilation,),
      padding=((pad, pad),),
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(default_init, ("conv_width", "embed_in", "embed")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
      name=name,
  )


def _conv_transpose1d(features: int, kernel: int, rate: int, *, name: str,
                      dtype: Dtype = jnp.float32) -> nn.ConvTranspose:
  """torch ConvTranspose1d(kernel, rate, padding=(kernel - rate) // 2); kernel [k, out, in].

  With `transpose_kernel` this is the gradient of a stride-`rate` conv, whose torch padding p
  becomes k - 1 - p on each side of the dilated input: L -> (L - 1) * rate - 2p + k.
  """
  pad = kernel - 1 - (kernel - rate) // 2
  return nn.ConvTranspose(
      features,
      (kernel,),
      strides=(rate,),
      padding=((pad, pad),),
      transpose_kernel=True,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(default_init, ("conv_width", "embed", "embed_in")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
      name=name,
  )


class _Convs(nn.Module):
  """One `nn.ModuleList` of a ResBlock1 (`convs1` or `convs2`): same-length dilated Conv1ds."""

  kernel_size: int
  dilations: Sequence[int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, index: int, x: jax.Array) -> jax.Array:
    return _conv1d(x.shape[-1], self.kernel_size, dilation=self.dilations[index], name=str(index),
                   dtype=self.dtype)(x)


class ResBlock1(nn.Module):
  """Three residual pairs lrelu -> dilated conv (`convs1/i`) -> lrelu -> conv (`convs2/i`).

  [B, L, C] -> [B, L, C].
  """

  kernel_size: int
  dilations: Sequence[int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    convs1 = _Convs(self.kernel_size, tuple(self.dilations), self.dtype, name="convs1")
    convs2 = _Convs(self.kernel_size, (1,) * len(self.dilations), self.dtype, name="convs2")
    for i in range(len(self.dilations)):
      h = convs1(i, nn.leaky_relu(x, LRELU_SLOPE))
      x = x + convs2(i, nn.leaky_relu(h, LRELU_SLOPE))
    return x


class _Upsamples(nn.Module):
  """`ups`: stage i's transposed conv, halving the channels. [B, L, C] -> [B, L', C/2]."""

  rates: Sequence[int]
  kernel_sizes: Sequence[int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, stage: int, x: jax.Array) -> jax.Array:
    return _conv_transpose1d(x.shape[-1] // 2, self.kernel_sizes[stage], self.rates[stage],
                             name=str(stage), dtype=self.dtype)(x)


class _ResBlocks(nn.Module):
  """`resblocks`: stage i averages blocks i*n .. i*n+n-1 (n kernel sizes). [B, L, C] -> same."""

  kernel_sizes: Sequence[int]
  dilation_sizes: Sequence[Sequence[int]]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, stage: int, x: jax.Array) -> jax.Array:
    n = len(self.kernel_sizes)
    total = None
    for j, (k, d) in enumerate(zip(self.kernel_sizes, self.dilation_sizes)):
      y = ResBlock1(k, tuple(d), self.dtype, name=str(stage * n + j))(x)
      total = y if total is None else total + y
    return total / n


class HiFiGAN(nn.Module):
  """The HiFi-GAN Generator. mel [B, T, M] -> waveform [B, config.num_samples(T)]."""

  config: VocoderConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, mel: jax.Array) -> jax.Array:
    cfg = self.config
    if mel.ndim != 3 or mel.shape[-1] != cfg.num_mels:
      raise ValueError(f"HiFiGAN: expected a mel [B, T, {cfg.num_mels}], got shape {mel.shape}")
    if mel.shape[1] < 1:
      raise ValueError(f"HiFiGAN: the mel has no frames (shape {mel.shape})")
    x = _conv1d(cfg.upsample_initial_channel, 7, name="conv_pre",
                dtype=self.dtype)(mel.astype(self.dtype))  # [B, T, C0]
    ups = _Upsamples(cfg.upsample_rates, cfg.upsample_kernel_sizes, self.dtype, name="ups")
    blocks = _ResBlocks(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, self.dtype,
                        name="resblocks")
    for stage in range(len(cfg.upsample_rates)):
      x = ups(stage, nn.leaky_relu(x, LRELU_SLOPE))  # [B, L, C0 / 2**(stage+1)]
      x = blocks(stage, x)
      x = nn.with_logical_constraint(x, ("batch", "act_length", "act_embed"))
    x = _conv1d(1, 7, name="conv_post", dtype=self.dtype)(nn.leaky_relu(x, FINAL_LRELU_SLOPE))
    return jnp.tanh(x[..., 0].astype(jnp.float32))  # [B, L]


def init_params(config: VocoderConfig, rng: jax.Array):
  """Initial (logically partitioned) parameters, from a one-frame mel."""
  return HiFiGAN(config).init(rng, jnp.zeros((1, 1, config.num_mels), jnp.float32))["params"]


def param_shapes(config: VocoderConfig):
  """`jax.eval_shape` of `init_params`: the full tree with no memory allocated."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def mel_to_waveform(model: HiFiGAN, params: Any, mel: jax.Array) -> jax.Array:
  """`CoDi.mel_spectrogram_to_waveform` without the numpy conversion.

  mel [B, 1, T, M] (or [B, T, M], as the original also accepts) -> waveform [B, 1, L] with
  L = model.config.num_samples(T) (160 * T + 32 for the released vocoder).
  """
  m = model.config.num_mels
  if mel.ndim == 4:
    if mel.shape[1] != 1:
      raise ValueError(f"mel_to_waveform: expected a mel [B, 1, T, {m}], got shape {mel.shape}")
    mel = mel[:, 0]  # [B, T, M]
  elif mel.ndim != 3:
    raise ValueError(f"mel_to_waveform: expected a mel [B, 1, T, {m}] (rank 4) or [B, T, {m}], "
                     f"got rank {mel.ndim} shape {mel.shape}")
  if mel.shape[-1] != m:
    raise ValueError(f"mel_to_waveform: the mel has {mel.shape[-1]} bins, the vocoder expects {m}")
  return model.apply({"params": params}, mel)[:, None, :]  # [B, 1, L]
