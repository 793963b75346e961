"""Building blocks shared by the CoDi diffusers: norms, projections, ResBlock, resampling.

Ported from the original `latent_diffusion/diffusion_unet.py` and `modules_conv.py`
(see CODI_REFERENCE §2.1). Module names mirror the original state-dict keys
(`in_layers/0`, `in_layers/2`, `emb_layers/1`, `out_layers/3`, `skip_connection`, `op`, `conv`),
so the key map to the PyTorch checkpoint is a short rule table (`codi_jax/convert/keymap.py`).

Layout: channels last. B batch, N batch x frames, H/W spatial, C channels, E time-embedding width.
A "fully connected" block (the text diffuser) works on a flat [N, C*S] vector in the original's
C-major order (`c * S + s`).

Logical axis names of parameters (mapped to mesh axes by the rules in the config):
  embed      output channels of a projection / conv (FSDP-sharded)
  embed_in   input channels of a projection / conv
  mlp        feed-forward hidden width
  heads      attention inner width (heads * head_dim)
  conv_height, conv_width, norm, frames, unmodeled: never sharded

Activations are pinned at block boundaries with batch, act_length (tokens) or act_height and
act_width (2-D), and act_embed.
"""

from __future__ import annotations

import math
import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype

# PyTorch's default Linear/Conv init is He-uniform-like; any sane init works for training from
# scratch, and parity runs always load weights, so use one variance-scaling init everywhere.
default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
embed_init = nn.initializers.normal(0.02)


def check_positive(owner: str, **values: float) -> None:
  """Config validation: raises ValueError naming the first non-positive field."""
  for name, value in values.items():
    if not value > 0:
      raise ValueError(f"{owner}.{name} must be positive, got {value}")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch `F.normalize(x, dim=-1)`: x / max(||x||, eps), in float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def embed(num: int, features: int, axes: tuple[str, str], name: str,
          dtype: Dtype = jnp.float32) -> nn.Embed:
  """An embedding table [num, features] with logical axes (e.g. ("vocab", "embed"))."""
  return nn.Embed(num, features, dtype=dtype, param_dtype=jnp.float32,
                  embedding_init=nn.with_logical_partitioning(embed_init, axes), name=name)


def dense(features: int, axes: tuple[str, str], *, name: str, dtype: Dtype = jnp.float32,
          use_bias: bool = True, zero_init: bool = False) -> nn.Dense:
  """A Linear layer with logically named kernel [in, out] and bias [out]."""
  init = nn.initializers.zeros if zero_init else default_init
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
      name=name,
  )


def conv(features: int, *, name: str, kernel: int = 3, stride: int = 1,
         dtype: Dtype = jnp.float32, zero_init: bool = False) -> nn.Conv:
  """A 2-D conv with symmetric zero padding k//2 (as torch `padding=k//2`), kernel HWIO."""
  init = nn.initializers.zeros if zero_init else default_init
  pad = kernel // 2
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(
          init, ("conv_height", "conv_width", "embed_in", "embed")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
      name=name,
  )


def layer_norm(*, name: str, dtype: Dtype = jnp.float32, epsilon: float = 1e-5) -> nn.LayerNorm:
  """torch.nn.LayerNorm over the last axis (default eps 1e-5, two-pass variance)."""
  return nn.LayerNorm(
      epsilon=epsilon,
      dtype=dtype,
      param_dtype=jnp.float32,
      use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
      name=name,
  )


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm(32, C) on channels-last input; statistics in float32.

  Groups are runs of consecutive channels; mean/variance are taken over every non-batch axis
  of a group. On a flat [N, C*S] vector this is exactly the original FC block's
  `GroupNorm(32, C*S)` on [N, C*S, 1, 1] (per-element affine of size C*S).
  """

  epsilon: float = 1e-5
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.num_groups} groups")
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (c,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                      (c,), jnp.float32)
    n = x.shape[0]
    xg = x.astype(jnp.float32).reshape(n, -1, self.num_groups, c // self.num_groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 3), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    return (y * scale + bias).astype(self.dtype)


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding ordered [cos, sin] (CODI_REFERENCE §0.5). [B] -> [B, dim], float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None]  # [B, half]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class TimeEmbed(nn.Module):
  """`time_embed`: Linear(mc, 4mc) -> SiLU -> Linear(4mc, 4mc) on the [cos, sin] embedding."""

  model_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, timesteps: jax.Array) -> jax.Array:
    e = timestep_embedding(timesteps, self.model_channels).astype(self.dtype)
    width = 4 * self.model_channels
    e = dense(width, ("embed_in", "embed"), name="0", dtype=self.dtype)(e)
    return dense(width, ("embed_in", "embed"), name="2", dtype=self.dtype)(nn.silu(e))


class NormActProj(nn.Module):
  """GroupNorm -> SiLU -> projection, the original's `Sequential(norm, SiLU, [Dropout,] conv)`.

  The projection is a 3x3 conv, or a Linear when `fully_connected` (text diffuser). Its index in
  the torch Sequential is `proj_index` ("2", or "3" when a Dropout sits before it).
  """

  features: int
  proj_index: str = "2"
  fully_connected: bool = False
  zero_init: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.silu(GroupNorm(dtype=self.dtype, name="0")(x))
    if self.fully_connected:
      proj = dense(self.features, ("embed_in", "embed"), name=self.proj_index, dtype=self.dtype,
                   zero_init=self.zero_init)
    else:
      proj = conv(self.features, name=self.proj_index, dtype=self.dtype, zero_init=self.zero_init)
    return proj(h)


class EmbLayers(nn.Module):
  """`emb_layers`: SiLU -> Linear(E, C)."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, emb: jax.Array) -> jax.Array:
    return dense(self.features, ("embed_in", "embed"), name="1", dtype=self.dtype)(nn.silu(emb))


class ResBlock(nn.Module):
  """The original ResBlock (dropout 0, no scale-shift norm) or, with `fully_connected`, FCBlock.

  x [N, H, W, C] (or flat [N, C*S]), emb [N, E] -> [N, H, W, out] (or [N, out]).
  """

  out_channels: int
  fully_connected: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    kw = dict(fully_connected=self.fully_connected, dtype=self.dtype)
    h = NormActProj(self.out_channels, "2", name="in_layers", **kw)(x)
    e = EmbLayers(self.out_channels, dtype=self.dtype, name="emb_layers")(emb)  # [N, out]
    h = h + e.reshape(e.shape[:1] + (1,) * (h.ndim - 2) + e.shape[1:])
    h = NormActProj(self.out_channels, "3", zero_init=True, name="out_layers", **kw)(h)
    if x.shape[-1] == self.out_channels:
      skip = x
    elif self.fully_connected:
      skip = dense(self.out_channels, ("embed_in", "embed"), name="skip_connection",
                   dtype=self.dtype)(x)
    else:
      skip = conv(self.out_channels, kernel=1, name="skip_connection", dtype=self.dtype)(x)
    return skip + h


class Downsample(nn.Module):
  """Stride-2 3x3 conv with symmetric padding 1 (key `op`). [N, H, W, C] -> [N, H/2, W/2, C]."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return conv(x.shape[-1], stride=2, name="op", dtype=self.dtype)(x)


class Upsample(nn.Module):
  """Nearest x2 then 3x3 conv (key `conv`). [N, H, W, C] -> [N, 2H, 2W, C]."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c)).reshape(n, 2 * h, 2 * w, c)
    return conv(c, name="conv", dtype=self.dtype)(x)
