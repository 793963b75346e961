"""Attention: one kernel entry point, CrossAttention, BasicTransformerBlock, SpatialTransformer.

Ported from the original `latent_diffusion/modules_attention.py` (CODI_REFERENCE §2.1):
SpatialTransformer = GroupNorm(eps 1e-6) -> 1x1 proj_in -> pre-LN self-attn, cross-attn and
GEGLU feed-forward (exact erf GELU) -> 1x1 proj_out (zero-init) + residual.

B batch, T query tokens, S key tokens, H heads, D head width, C channels.
"""

from __future__ import annotations

import enum

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from codi_jax.models.layers import Dtype, GroupNorm, dense, layer_norm


class AttentionImpl(str, enum.Enum):
  """Which kernel computes softmax(q k^T / sqrt(D) + bias) v.

  XLA is the reference path (plain einsums, float32 softmax) used for parity; CUDNN is the fused
  flash kernel of `jax.nn.dot_product_attention` (GPU, bf16/fp16 inputs).
  """

  XLA = "xla"
  CUDNN = "cudnn"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None,
                          impl: AttentionImpl | str = AttentionImpl.XLA) -> jax.Array:
  """q [B, T, H, D], k/v [B, S, H, D], bias broadcastable to [B, H, T, S] -> [B, T, H, D]."""
  impl = AttentionImpl(impl)
  scale = q.shape[-1] ** -0.5
  if impl is AttentionImpl.CUDNN:
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation="cudnn")
  logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [B, H, T, S]
  return jnp.einsum("bhts,bshd->bthd", weights, v)


class CrossAttention(nn.Module):
  """Multi-head attention with bias-free to_q/k/v (head-major inner dim) and `to_out.0`."""

  heads: int
  dim_head: int
  attention_impl: AttentionImpl = AttentionImpl.XLA
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    context = x if context is None else context
    inner = self.heads * self.dim_head
    proj = lambda name: dense(inner, ("embed_in", "heads"), name=name, dtype=self.dtype,
                              use_bias=False)
    split = lambda t: einops.rearrange(t, "b n (h d) -> b n h d", h=self.heads)
    q, k, v = split(proj("to_q")(x)), split(proj("to_k")(context)), split(proj("to_v")(context))
    out = dot_product_attention(q, k, v, impl=self.attention_impl)  # [B, T, H, D]
    out = einops.rearrange(out, "b n h d -> b n (h d)")
    return _ToOut(x.shape[-1], dtype=self.dtype, name="to_out")(out)


class _ToOut(nn.Module):
  """`to_out = Sequential(Linear, Dropout)`: the Linear is child `0`."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return dense(self.features, ("heads", "embed"), name="0", dtype=self.dtype)(x)


class GEGLUFeedForward(nn.Module):
  """`ff.net`: GEGLU `net.0.proj` Linear(C, 8C) -> x * gelu(gate) -> `net.2` Linear(4C, C)."""

  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _GEGLUNet(x.shape[-1], self.mult, dtype=self.dtype, name="net")(x)


class _GEGLUNet(nn.Module):
  features: int
  mult: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    inner = self.features * self.mult
    h = _GEGLU(inner, dtype=self.dtype, name="0")(x)
    return dense(self.features, ("mlp", "embed"), name="2", dtype=self.dtype)(h)


class _GEGLU(nn.Module):
  inner: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = dense(2 * self.inner, ("embed", "mlp"), name="proj", dtype=self.dtype)(x)
    h, gate = jnp.split(h, 2, axis=-1)
    return h * jax.nn.gelu(gate, approximate=False)


class BasicTransformerBlock(nn.Module):
  """Pre-LN self-attention (`attn1`), cross-attention (`attn2`), GEGLU feed-forward (`ff`)."""

  heads: int
  dim_head: int
  attention_impl: AttentionImpl = AttentionImpl.XLA
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    attn = lambda name: CrossAttention(self.heads, self.dim_head, self.attention_impl,
                                       dtype=self.dtype, name=name)
    x = attn("attn1")(layer_norm(name="norm1", dtype=self.dtype)(x)) + x
    x = attn("attn2")(layer_norm(name="norm2", dtype=self.dtype)(x), context) + x
    return GEGLUFeedForward(dtype=self.dtype, name="ff")(
        layer_norm(name="norm3", dtype=self.dtype)(x)) + x


class _Blocks(nn.Module):
  """`transformer_blocks` ModuleList (depth 1 in CoDi)."""

  heads: int
  dim_head: int
  depth: int = 1
  attention_impl: AttentionImpl = AttentionImpl.XLA
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    for i in range(self.depth):
      x = BasicTransformerBlock(self.heads, self.dim_head, self.attention_impl, dtype=self.dtype,
                                name=str(i))(x, context)
    return x


class SpatialTransformer(nn.Module):
  """x [N, *spatial, C], context [N, S, Dc] -> [N, *spatial, C]; tokens = spatial positions."""

  heads: int
  dim_head: int
  depth: int = 1
  attention_impl: AttentionImpl = AttentionImpl.XLA
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    n, *spatial, c = x.shape
    inner = self.heads * self.dim_head
    h = GroupNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    h = dense(inner, ("embed_in", "embed"), name="proj_in", dtype=self.dtype)(h)
    h = h.reshape(n, -1, inner)  # [N, T, inner]
    h = nn.with_logical_constraint(h, ("batch", "act_length", "act_embed"))
    h = _Blocks(self.heads, self.dim_head, self.depth, self.attention_impl, dtype=self.dtype,
                name="transformer_blocks")(h, context.astype(self.dtype))
    h = dense(c, ("embed_in", "embed"), name="proj_out", dtype=self.dtype, zero_init=True)(h)
    return x + h.reshape(n, *spatial, c)
