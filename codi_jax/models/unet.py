"""CoDi's UNet diffusers: `UNet2D` (image/video, audio) and its block machinery.

Ported from the original `UNetModel2D` (`latent_diffusion/diffusion_unet.py`, CODI_REFERENCE §2.3).
The topology is SD-1.x's: conv_in, levels of ResBlocks (+ SpatialTransformer where `attention`),
stride-2 downsamples, a middle block, mirrored output blocks with skip concatenation and nearest
upsamples, and GN-SiLU-conv out. Joint generation adds, per diffuser, an environment encoder
(`connecters_out`: noisy latent -> pooled, L2-normalised code) and connector cross-attention
(`input_block_connecters_in`, `output_block_connecters_in`) after every block of connector levels.
As in the released joint forward, the first output block's skip is the middle block's output.
With `video`, a SpatioTemporalAttention follows every ResBlock on 5-D input.

The module tree mirrors the original's state-dict keys (`input_blocks/1/0/0/in_layers/2/kernel`
= `input_blocks.1.0.0.in_layers.2.weight`). The layout is data (`UNetLayout`, a tuple of layer
specs per block) built by `unet_layout` exactly like the original constructor, and executed by
`BlockList`; the text diffuser (`unet_text.UNet0D`) reuses both with fully connected layers.

B batch, F frames, N = B*F, H/W latent spatial, C channels, D connector width.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from codi_jax.models.attention import AttentionImpl, SpatialTransformer
from codi_jax.models.layers import (Downsample, Dtype, GroupNorm, ResBlock, TimeEmbed, Upsample,
                                    conv, dense)
from codi_jax.models.temporal import SpatioTemporalAttention


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """One diffuser. Field names follow the original yaml where it has one (`openai_unet.yaml`).

  `second_dim` makes it the text diffuser's fully connected "0-D" UNet: level k features are
  [C_k, second_dim[k]] (flattened C-major), `connector_second_dim` likewise for the connector.
  """

  in_channels: int
  out_channels: int
  model_channels: int
  channel_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)
  attention: tuple[bool, ...] = (True, True, True, False)
  connector: tuple[bool, ...] = (True, True, True, False)
  connector_channel_mult: tuple[int, ...] = (1, 2, 4)
  connector_num_res_blocks: tuple[int, ...] = (1, 1, 1)
  connector_channels: int = 1280
  num_heads: int = 8
  context_dim: int = 768
  video: bool = False
  second_dim: tuple[int, ...] | None = None
  connector_second_dim: tuple[int, ...] | None = None

  def __post_init__(self):
    for name in ("channel_mult", "num_res_blocks", "attention", "connector",
                 "connector_channel_mult", "connector_num_res_blocks", "second_dim",
                 "connector_second_dim"):
      value = getattr(self, name)
      if value is not None:
        object.__setattr__(self, name, tuple(value))
    levels = len(self.channel_mult)
    for name in ("num_res_blocks", "attention", "connector") + (
        ("second_dim",) if self.fully_connected else ()):
      if len(getattr(self, name)) != levels:
        raise ValueError(f"UNetConfig.{name} has {len(getattr(self, name))} entries, "
                         f"channel_mult has {levels}")
    if len(self.connector_num_res_blocks) != len(self.connector_channel_mult):
      raise ValueError("UNetConfig.connector_num_res_blocks and connector_channel_mult differ "
                       "in length")
    if self.fully_connected:
      if self.video:
        raise ValueError("UNetConfig: a fully connected (second_dim) UNet has no video layers")
      if (self.connector_second_dim is None
          or len(self.connector_second_dim) != len(self.connector_channel_mult)):
        raise ValueError("UNetConfig.connector_second_dim must match connector_channel_mult")
    for mult in self.channel_mult:
      if (mult * self.model_channels) % self.num_heads:
        raise ValueError(f"UNetConfig: width {mult * self.model_channels} is not divisible by "
                         f"num_heads={self.num_heads}")

  @property
  def fully_connected(self) -> bool:
    return self.second_dim is not None


# --- Layer specs: what sits at each index of an original `TimestepEmbedSequential`. ---------------

@dataclasses.dataclass(frozen=True)
class Proj:
  """conv_in-like projection: 3x3 conv, or (fully connected) Linear_MultiDim to [features, sdim]."""
  features: int
  sdim: int = 1
  zero_init: bool = False


@dataclasses.dataclass(frozen=True)
class Res:
  """ResBlock (or FCBlock) to `features` [x `sdim`]; with `temporal`, [ResBlock, STA] pair."""
  features: int
  sdim: int = 1
  temporal: bool = False


@dataclasses.dataclass(frozen=True)
class Attn:
  """SpatialTransformer(C, heads, C // heads, context_dim)."""
  heads: int
  dim_head: int


@dataclasses.dataclass(frozen=True)
class Down:
  pass


@dataclasses.dataclass(frozen=True)
class Up:
  pass


@dataclasses.dataclass(frozen=True)
class Norm:
  """GroupNorm(32, C), eps 1e-5."""


@dataclasses.dataclass(frozen=True)
class SiLU:
  pass


Spec = Proj | Res | Attn | Down | Up | Norm | SiLU
Block = tuple[Spec, ...]


@dataclasses.dataclass(frozen=True)
class UNetLayout:
  connecters_out: tuple[Block, ...]
  input_blocks: tuple[Block, ...]
  input_connectors: tuple[Block | None, ...]
  middle_block: Block
  output_blocks: tuple[Block, ...]
  output_connectors: tuple[Block | None, ...]
  out: Block


def unet_layout(cfg: UNetConfig) -> UNetLayout:
  """The block structure of the original constructor (`UNetModel2D` / `UNetModel0D_MultiDim`)."""
  mc = cfg.model_channels
  fc = cfg.fully_connected
  sdims = cfg.second_dim or (1,) * len(cfg.channel_mult)
  conn_sdims = cfg.connector_second_dim or (1,) * len(cfg.connector_channel_mult)

  def res(features: int, sdim: int) -> Res:
    return Res(features, sdim, temporal=cfg.video)

  def down(channels: int, sdim: int) -> Spec:
    return Proj(channels, sdim) if fc else Down()  # Linear_MultiDim or stride-2 conv

  # Environment encoder.
  connecters_out = [(Proj(mc // 2, sdims[0]),)]
  for level, (mult, sdim) in enumerate(zip(cfg.connector_channel_mult, conn_sdims)):
    for _ in range(cfg.connector_num_res_blocks[level]):
      connecters_out.append((res(mult * mc, sdim),))
    if level != len(cfg.connector_channel_mult) - 1:
      connecters_out.append((down(mult * mc, sdim),))
  connecters_out.append((Norm(), SiLU(), Proj(cfg.connector_channels, 1)))

  def attn(channels: int) -> Attn:
    return Attn(cfg.num_heads, channels // cfg.num_heads)

  input_blocks: list[Block] = [(Proj(mc, sdims[0]),)]
  input_connectors: list[Block | None] = [None]
  skip_channels = [mc]
  channels = mc
  for level, (mult, sdim) in enumerate(zip(cfg.channel_mult, sdims)):
    for _ in range(cfg.num_res_blocks[level]):
      channels = mult * mc
      block: Block = (res(channels, sdim),)
      if cfg.attention[level]:
        block += (attn(channels),)
      input_blocks.append(block)
      input_connectors.append((attn(channels),) if cfg.connector[level] else None)
      skip_channels.append(channels)
    if level != len(cfg.channel_mult) - 1:
      input_blocks.append((down(channels, sdim),))
      input_connectors.append(None)
      skip_channels.append(channels)

  middle_block = (Res(channels, sdims[-1], temporal=cfg.video), attn(channels),
                  Res(channels, sdims[-1], temporal=cfg.video))

  output_blocks: list[Block] = []
  output_connectors: list[Block | None] = []
  for level in reversed(range(len(cfg.channel_mult))):
    mult, sdim = cfg.channel_mult[level], sdims[level]
    for i in range(cfg.num_res_blocks[level] + 1):
      skip_channels.pop()
      channels = mult * mc
      block = (res(channels, sdim),)
      if cfg.attention[level]:
        block += (attn(channels),)
      output_connectors.append((attn(channels),) if cfg.connector[level] else None)
      if level != 0 and i == cfg.num_res_blocks[level]:
        block += (Proj(channels, sdim) if fc else Up(),)
      output_blocks.append(block)

  out = (Norm(), SiLU(), Proj(cfg.out_channels, 1, zero_init=True))
  return UNetLayout(tuple(connecters_out), tuple(input_blocks), tuple(input_connectors),
                    middle_block, tuple(output_blocks), tuple(output_connectors), out)


# --- Execution ----------------------------------------------------------------------------------

def flatten_cs(h: jax.Array) -> jax.Array:
  """[B, S, C] -> [B, C*S] in the original's C-major order (c * S + s)."""
  return einops.rearrange(h, "b s c -> b (c s)")


def unflatten_cs(v: jax.Array, sdim: int) -> jax.Array:
  """[B, C*S] (C-major) -> [B, S, C]."""
  return einops.rearrange(v, "b (c s) -> b s c", s=sdim)


class _VideoRes(nn.Module):
  """The `nn.ModuleList([ResBlock, SpatioTemporalAttention])` pair of the video architecture."""

  features: int
  num_frames: int | None
  attention_impl: AttentionImpl
  dtype: Dtype

  @nn.compact
  def __call__(self, h: jax.Array, emb: jax.Array) -> jax.Array:
    h = ResBlock(self.features, dtype=self.dtype, name="0")(h, emb)
    if self.num_frames is None:  # image input skips the temporal layers entirely
      return h
    return SpatioTemporalAttention(self.num_frames, self.attention_impl, dtype=self.dtype,
                                   name="1")(h)


_ACTIVATION_AXES = {3: ("batch", "act_length", "act_embed"),
                    4: ("batch", "act_height", "act_width", "act_embed")}


class TimestepSequential(nn.Module):
  """One original `TimestepEmbedSequential`: runs its layer specs, child i named "i".

  h is [N, H, W, C] (2-D; video frames folded into N) or [B, S, C] (fully connected).
  """

  layers: Block
  fully_connected: bool
  num_frames: int | None
  attention_impl: AttentionImpl
  dtype: Dtype

  @nn.compact
  def __call__(self, h: jax.Array, emb: jax.Array, context: jax.Array | None) -> jax.Array:
    fc, dt = self.fully_connected, self.dtype
    for i, spec in enumerate(self.layers):
      name = str(i)
      if isinstance(spec, Proj):
        if fc:
          v = dense(spec.features * spec.sdim, ("embed_in", "embed"), name=name, dtype=dt,
                    zero_init=spec.zero_init)(flatten_cs(h))
          h = unflatten_cs(v, spec.sdim)
        else:
          h = conv(spec.features, name=name, dtype=dt, zero_init=spec.zero_init)(h)
      elif isinstance(spec, Res):
        if fc:
          v = ResBlock(spec.features * spec.sdim, fully_connected=True, dtype=dt,
                       name=name)(flatten_cs(h), emb)
          h = unflatten_cs(v, spec.sdim)
        elif spec.temporal:
          h = _VideoRes(spec.features, self.num_frames, self.attention_impl, dt, name=name)(h, emb)
        else:
          h = ResBlock(spec.features, dtype=dt, name=name)(h, emb)
      elif isinstance(spec, Attn):
        if context is None:
          raise ValueError("a SpatialTransformer block needs a context")
        h = SpatialTransformer(spec.heads, spec.dim_head, attention_impl=self.attention_impl,
                               dtype=dt, name=name)(h, context)
      elif isinstance(spec, Down):
        h = Downsample(dtype=dt, name=name)(h)
      elif isinstance(spec, Up):
        h = Upsample(dtype=dt, name=name)(h)
      elif isinstance(spec, Norm):
        h = GroupNorm(dtype=dt, name=name)(h)
      elif isinstance(spec, SiLU):
        h = nn.silu(h)
      else:
        raise TypeError(f"unknown layer spec {spec!r}")
      h = nn.with_logical_constraint(h, _ACTIVATION_AXES[h.ndim])
    return h


# Rematerialisation per block (`config.model.remat`): what a block's backward pass may keep from
# its forward pass instead of recomputing it.
REMAT_POLICIES = {
    "none": None,  # keep everything (no remat)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


def sequential(remat: str) -> type[TimestepSequential]:
  """TimestepSequential, wrapped in `nn.remat` with the named policy unless it is "none"."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {remat!r}; choose one of {sorted(REMAT_POLICIES)}")
  if remat == "none":
    return TimestepSequential
  return nn.remat(TimestepSequential, policy=REMAT_POLICIES[remat])


class BlockList(nn.Module):
  """An original `nn.ModuleList` of TimestepEmbedSequentials; `None` entries hold no module."""

  blocks: Sequence[Block | None]
  fully_connected: bool
  num_frames: int | None
  attention_impl: AttentionImpl
  dtype: Dtype
  remat: str = "none"

  @nn.compact
  def __call__(self, index: int, h: jax.Array, emb: jax.Array,
               context: jax.Array | None) -> jax.Array:
    layers = self.blocks[index]
    if layers is None:
      return h
    return sequential(self.remat)(layers, self.fully_connected, self.num_frames,
                                  self.attention_impl, self.dtype, name=str(index))(h, emb, context)


def _repeat_frames(a: jax.Array | None, num_frames: int | None) -> jax.Array | None:
  """[B, ...] -> [B*F, ...], frame index fastest (the original's `(b t)` fold)."""
  if a is None or num_frames is None:
    return a
  return jnp.repeat(a, num_frames, axis=0)


class UNet2D(nn.Module):
  """Image/video (and, with its own config, audio) diffuser.

  x: image [B, H, W, C] or video [B, F, H, W, C]; timesteps [B]; context [B, T, context_dim];
  connector_context [B, K, connector_channels] or None (no connector cross-attention).
  Returns predicted noise with x's shape.
  """

  config: UNetConfig
  attention_impl: AttentionImpl = AttentionImpl.XLA
  dtype: Dtype = jnp.float32
  remat: str = "none"  # a key of REMAT_POLICIES, applied to every block

  def _fold(self, x: jax.Array) -> tuple[jax.Array, int | None]:
    """Input to block features: fold video frames into the batch."""
    if x.ndim == 5:
      if not self.config.video:
        raise ValueError(f"{self.name}: 5-D (video) input needs a UNet with video layers")
      return einops.rearrange(x, "b f h w c -> (b f) h w c"), x.shape[1]
    if x.ndim != 4:
      raise ValueError(f"{self.name}: expected [B, H, W, C] or [B, F, H, W, C], got {x.shape}")
    return x, None

  def _unfold(self, h: jax.Array, num_frames: int | None) -> jax.Array:
    if num_frames is None:
      return h
    return einops.rearrange(h, "(b f) h w c -> b f h w c", f=num_frames)

  def _check_input(self, x: jax.Array) -> None:
    if x.shape[-1] != self.config.in_channels:
      raise ValueError(f"{self.name}: latent has {x.shape[-1]} channels, the UNet expects "
                       f"{self.config.in_channels} (shape {x.shape})")

  def environment_code(self, x: jax.Array, timesteps: jax.Array) -> jax.Array:
    """The environment encoder: noisy latent -> mean-pooled, L2-normalised code [B, D]."""
    return self(x, timesteps, environment_only=True)

  @nn.compact
  def __call__(self, x: jax.Array, timesteps: jax.Array, context: jax.Array | None = None,
               connector_context: jax.Array | None = None, *,
               environment_only: bool = False) -> jax.Array:
    cfg = self.config
    self._check_input(x)
    layout = unet_layout(cfg)
    h, frames = self._fold(x.astype(self.dtype))
    emb = _repeat_frames(TimeEmbed(cfg.model_channels, dtype=self.dtype, name="time_embed")(
        timesteps), frames)
    blocks = lambda specs, name: BlockList(specs, cfg.fully_connected, frames, self.attention_impl,
                                           self.dtype, self.remat, name=name)

    if environment_only:
      conn = blocks(layout.connecters_out, "connecters_out")
      for k in range(len(layout.connecters_out)):
        h = conn(k, h, emb, None)
      h = self._unfold(h, frames).astype(jnp.float32)
      code = h.reshape(h.shape[0], -1, h.shape[-1]).mean(axis=1)  # [B, D]
      return code / jnp.linalg.norm(code, axis=-1, keepdims=True)

    if context is None:
      raise ValueError(f"{self.name}: a context [B, T, {cfg.context_dim}] is required")
    context = _repeat_frames(context, frames)
    connector_context = _repeat_frames(connector_context, frames)
    inputs = blocks(layout.input_blocks, "input_blocks")
    in_conn = blocks(layout.input_connectors, "input_block_connecters_in")
    skips = []
    for k in range(len(layout.input_blocks)):
      h = inputs(k, h, emb, context)
      if connector_context is not None:
        h = in_conn(k, h, emb, connector_context)
      skips.append(h)
    middle = sequential(self.remat)(layout.middle_block, cfg.fully_connected, frames,
                                    self.attention_impl, self.dtype, name="middle_block")
    h = middle(h, emb, context)
    # Quirk of the released joint forward (`UNetModelCoDi.forward`): the list holding the last
    # input block's output is updated in place by the middle block, so the first output block
    # concatenates the middle block's output with itself. The released weights run this way.
    skips[-1] = h
    outputs = blocks(layout.output_blocks, "output_blocks")
    out_conn = blocks(layout.output_connectors, "output_block_connecters_in")
    for k in range(len(layout.output_blocks)):
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = outputs(k, h, emb, context)
      if connector_context is not None:
        h = out_conn(k, h, emb, connector_context)
    h = TimestepSequential(layout.out, cfg.fully_connected, frames, self.attention_impl,
                           self.dtype, name="out")(h, emb, None)
    return self._unfold(h, frames).astype(jnp.float32)
