"""Video layers of the image diffuser: `SpatioTemporalAttention` after every ResBlock on 5-D input.

Ported from the original `latent_diffusion/modules_video.py` (Make-A-Video style; CODI_REFERENCE
§2.2). For x [B, F, H, W, C]:
  1. temporal self-attention over frames at every pixel, with position and frame-rate embeddings,
     a continuous relative position bias, and a "LayerNorm" that normalises over the TIME axis;
  2. a GEGLU feed-forward over channels with token shift (half the channels one frame later) and a
     channel LayerNorm;
  3. the frame-shift block: GN -> SiLU -> 3x3 conv, channel group k delayed by k frames, residual.

B batch, F frames, H/W spatial, C channels, M = B*H*W temporal sequences, I feed-forward width.
"""

from __future__ import annotations

import itertools
import math

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from codi_jax.models.attention import AttentionImpl, dot_product_attention
from codi_jax.models.layers import Dtype, NormActProj, dense

# The original's embedding tables hold 30 frames; its forward uses frame rate index 4 - 1.
MAX_FRAMES = 30
FRAMERATE = 4
HEADS = 8
HEAD_DIM_DIVISOR = 4  # dim_head = C // 4, so the inner width is 2C
FRAME_SHIFT_GROUPS = 8


def _dtype_eps(dtype: Dtype) -> float:
  """The original clamps the variance at 1e-5 for float32 inputs and 1e-3 for any other dtype."""
  return 1e-5 if jnp.dtype(dtype) == jnp.float32 else 1e-3


def _normalize(x: jax.Array, axis: int) -> jax.Array:
  mean = x.mean(axis=axis, keepdims=True)
  var = jnp.square(x - mean).mean(axis=axis, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(jnp.maximum(var, _dtype_eps(x.dtype)))


class TimeAxisLayerNorm(nn.Module):
  """The temporal attention's `LayerNorm`: statistics over axis 1 (frames), gain over channels."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [M, F, C]
    g = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                   (x.shape[-1],), jnp.float32)
    return _normalize(x, axis=1) * g.astype(x.dtype)


class ContinuousPositionBias(nn.Module):
  """MLP on signed log relative distances -> [heads, F, F] attention bias (`net.{0.0,1.0,2}`)."""

  width: int
  heads: int = HEADS

  @nn.compact
  def __call__(self, num_frames: int) -> jax.Array:
    pos = jnp.arange(num_frames, dtype=jnp.float32)
    rel = pos[:, None] - pos[None, :]  # [F, F]
    h = (jnp.sign(rel) * jnp.log(jnp.abs(rel) + 1.0))[..., None]  # [F, F, 1]
    return _BiasNet(self.width, self.heads, name="net")(h).transpose(2, 0, 1)  # [heads, F, F]


class _BiasNet(nn.Module):
  width: int
  heads: int

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    h = nn.silu(_Index(self.width, name="0")(h))
    h = nn.silu(_Index(self.width, name="1")(h))
    return dense(self.heads, ("embed_in", "heads"), name="2")(h)


class _Index(nn.Module):
  """`Sequential(Linear, SiLU)` whose Linear is child `0`."""

  width: int

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    return dense(self.width, ("embed_in", "embed"), name="0")(h)


class TemporalAttention(nn.Module):
  """Self-attention over frames. x [M, F, C], bias [heads, F, F] -> [M, F, C] (no residual)."""

  attention_impl: AttentionImpl = AttentionImpl.XLA
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array, framerate: int = FRAMERATE) -> jax.Array:
    m, f, c = x.shape
    if f > MAX_FRAMES:
      raise ValueError(f"video has {f} frames; the temporal layers support at most {MAX_FRAMES}")
    dim_head = c // HEAD_DIM_DIVISOR
    inner = HEADS * dim_head
    emb_init = nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                            ("unmodeled", "frames", "embed"))
    pos = self.param("pos_embeds", emb_init, (1, MAX_FRAMES, c), jnp.float32)
    rate = self.param("frame_rate_embeds", emb_init, (1, MAX_FRAMES, c), jnp.float32)
    x = x + pos[:, :f].astype(x.dtype) + rate[:, framerate - 1:framerate].astype(x.dtype)
    x = TimeAxisLayerNorm(name="norm")(x)
    q = dense(inner, ("embed_in", "heads"), name="to_q", dtype=self.dtype, use_bias=False)(x)
    kv = dense(2 * inner, ("embed_in", "heads"), name="to_kv", dtype=self.dtype, use_bias=False)(x)
    k, v = jnp.split(kv, 2, axis=-1)
    split = lambda t: einops.rearrange(t, "m f (h d) -> m f h d", h=HEADS)
    out = dot_product_attention(split(q), split(k), split(v), bias[None], impl=self.attention_impl)
    out = einops.rearrange(out, "m f h d -> m f (h d)")
    return dense(c, ("heads", "embed"), name="to_out", dtype=self.dtype, use_bias=False,
                 zero_init=True)(out)


def _shift_frames(x: jax.Array, shift: int) -> jax.Array:
  """Delays x [B, F, ...] by `shift` frames along axis 1, zero-filled in front."""
  if shift == 0:
    return x
  f = x.shape[1]
  shift = min(shift, f)
  pad = [(0, 0)] * x.ndim
  pad[1] = (shift, 0)
  return jnp.pad(x[:, :f - shift], pad)


def _chunk_sizes(n: int, chunks: int) -> list[int]:
  """Split sizes of torch.chunk(n, chunks): pieces of ceil(n / chunks), the last one shorter."""
  size = math.ceil(n / chunks)
  return [min(size, n - start) for start in range(0, n, size)]


def _split_channels(x: jax.Array, chunks: int) -> list[jax.Array]:
  bounds = list(itertools.accumulate(_chunk_sizes(x.shape[-1], chunks)))[:-1]
  return jnp.split(x, bounds, axis=-1)


class VideoFeedForward(nn.Module):
  """`ff`: 1x1x1 conv C -> 2I, GEGLU (float32), token shift, channel LN, 1x1x1 conv I -> C."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, F, H, W, C]
    c = x.shape[-1]
    inner = int(c * 4 * 2 / 3)
    h = FeedForwardIn(2 * inner, dtype=self.dtype, name="proj_in")(x).astype(jnp.float32)
    h, gate = jnp.split(h, 2, axis=-1)
    h = h * jax.nn.gelu(gate, approximate=False)  # [B, F, H, W, I]
    keep, shifted = _split_channels(h, 2)
    h = jnp.concatenate([keep, _shift_frames(shifted, 1)], axis=-1)
    return FeedForwardOut(c, dtype=self.dtype, name="proj_out")(h)


class FeedForwardIn(nn.Module):
  """`proj_in`: `Sequential(1x1 conv)` as a bias-free Dense (child `0`); shared with CLIP video."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return dense(self.features, ("embed", "mlp"), name="0", dtype=self.dtype, use_bias=False)(x)


class FeedForwardOut(nn.Module):
  """`Sequential(ChanLayerNorm, 1x1 conv)`: children `0` (gain `g`) and `1`; shared with CLIP.

  The conv starts at zero, as in the original's CLIP copy (`clip_modules/modules_video.py` L101),
  so the residual feed-forward starts as the identity. The UNet copy
  (`latent_diffusion/modules_video.py` L96-105) keeps torch's default init there; with it, fresh
  video layers perturb every ResBlock output of a trained image diffuser, so both copies use zero.
  """

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:  # h float32 [..., I]
    h = _ChanLayerNorm(name="0")(h)
    return dense(self.features, ("mlp", "embed"), name="1", dtype=self.dtype, use_bias=False,
                 zero_init=True)(h)


class _ChanLayerNorm(nn.Module):
  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    g = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                   (h.shape[-1],), jnp.float32)
    return _normalize(h, axis=-1) * g


class FrameShiftBlock(nn.Module):
  """`frameshiftblock`: x + frame_shift(zero_conv(SiLU(GN(x)))). x [B*F, H, W, C] folded."""

  num_frames: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = NormActProj(x.shape[-1], "2", zero_init=True, dtype=self.dtype, name="out_layers")(x)
    h = h.reshape(-1, self.num_frames, *h.shape[1:])  # [B, F, H, W, C]
    groups = _split_channels(h, FRAME_SHIFT_GROUPS)
    h = jnp.concatenate([_shift_frames(g, i) for i, g in enumerate(groups)], axis=-1)
    return x + h.reshape(x.shape)


class SpatioTemporalAttention(nn.Module):
  """The video layers after a ResBlock. x [B*F, H, W, C] (frames folded) -> same shape."""

  num_frames: int
  attention_impl: AttentionImpl = AttentionImpl.XLA
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, hh, ww, c = x.shape
    f = self.num_frames
    t = einops.rearrange(x, "(b f) h w c -> (b h w) f c", f=f)  # [M, F, C]
    bias = ContinuousPositionBias(c // 2, name="temporal_rel_pos_bias")(f)  # [heads, F, F]
    t = TemporalAttention(self.attention_impl, dtype=self.dtype, name="temporal_attn")(
        t, bias.astype(t.dtype)) + t
    v = einops.rearrange(t, "(b h w) f c -> b f h w c", h=hh, w=ww)  # [B, F, H, W, C]
    v = (VideoFeedForward(dtype=self.dtype, name="ff")(v) + v).astype(self.dtype)
    return FrameShiftBlock(f, dtype=self.dtype, name="frameshiftblock")(v.reshape(x.shape))
