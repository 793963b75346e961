"""CoDi's CLIP prompt encoders: ViT-L/14 text and vision towers, the vision tower with video layers.

Ported from the original `FrozenCLIP` (`encoders/clip.py`) around its
`clip_modules.CLIPModel(config, add_temporal_attention=True)` (`modeling_clip.py`,
`modules_video.py`; CODI_REFERENCE §1.2, fixture README quirks 8, 9, 11). Both encoders map a
prompt to one L2-normalised token [B, 1, P]:
  text   token ids -> causal pre-LN transformer (quick-GELU) -> final LN -> the hidden state at
         argmax(id) (the first end-of-text token) -> `text_projection` -> L2 norm;
  vision pixel values -> patch conv + class token + positions -> `pre_layrnorm` -> encoder ->
         CLS -> `post_layernorm` -> `visual_projection` -> L2 norm.
A video runs its frames through the vision encoder together: after every layer's self-attention a
temporal block (`temporal_self_attn`) attends over frames for each token, and the last hidden state
is averaged over frames before the CLS read-out. The temporal block is the UNet's Make-A-Video
attention without position/frame-rate embeddings, frame shift or token shift (quirk 11).
Every LayerNorm of the original uses torch's default eps 1e-5, whatever the config's
`layer_norm_eps` says.

Module names mirror the original state dict under `model.` (`text_model/encoder/layers/0/
self_attn/q_proj/kernel` = `model.text_model.encoder.layers.0.self_attn.q_proj.weight`); the key
map is `codi_jax.convert.keymap.CLIP`. Pixel values come from `clip_preprocess.preprocess`.

B batch, F frames, N = B*F, T tokens (77 text, 1 + patches vision), D width, P projection width,
S image side, M = B*T temporal sequences, I temporal feed-forward width.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping, NamedTuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.models.attention import AttentionImpl, dot_product_attention
from codi_jax.models.clip_preprocess import PreprocessConfig, preprocess
from codi_jax.models.layers import Dtype, dense, embed, embed_init, l2_normalize, layer_norm
from codi_jax.models.temporal import (ContinuousPositionBias, FeedForwardIn, FeedForwardOut,
                                      TimeAxisLayerNorm)


class Activation(str, enum.Enum):
  """`hidden_act` of the transformer MLPs."""

  QUICK_GELU = "quick_gelu"  # x * sigmoid(1.702 x), what OpenAI CLIP uses
  GELU = "gelu"  # exact erf GELU


def _activate(kind: Activation, x: jax.Array) -> jax.Array:
  if kind is Activation.QUICK_GELU:
    return x * jax.nn.sigmoid(1.702 * x)
  return jax.nn.gelu(x, approximate=False)


def _check_transformer(name: str, width: int, layers: int, heads: int, mlp_width: int) -> None:
  for field, value in (("width", width), ("layers", layers), ("heads", heads),
                       ("mlp_width", mlp_width)):
    if value < 1:
      raise ValueError(f"{name}.{field} must be positive, got {value}")
  if width % heads:
    raise ValueError(f"{name}.width {width} is not divisible by heads {heads}")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The text transformer (ViT-L/14's: 12 layers of width 768, 77 positions)."""

  vocab_size: int = 49408
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_width: int = 3072
  max_positions: int = 77
  activation: Activation = Activation.QUICK_GELU

  def __post_init__(self):
    object.__setattr__(self, "activation", Activation(self.activation))
    _check_transformer("CLIPTextConfig", self.width, self.layers, self.heads, self.mlp_width)
    if self.vocab_size < 1 or self.max_positions < 1:
      raise ValueError(f"CLIPTextConfig: vocab_size {self.vocab_size} and max_positions "
                       f"{self.max_positions} must be positive")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The vision transformer (ViT-L/14 at 224: 24 layers of width 1024, 16x16 patches + CLS).

  `temporal` adds the video layers (`add_temporal_attention=True`, as CoDi builds it): per layer,
  temporal attention with `heads` heads of width `width // heads`, a continuous position bias MLP
  of width `width // 2`, and a GEGLU feed-forward of width int(width * temporal_ff_mult * 2 / 3).
  The attention also holds `max_frames`-long position and frame-rate tables that CLIP never adds.
  """

  image_size: int = 224
  patch_size: int = 14
  width: int = 1024
  layers: int = 24
  heads: int = 16
  mlp_width: int = 4096
  activation: Activation = Activation.QUICK_GELU
  temporal: bool = True
  temporal_ff_mult: int = 4
  max_frames: int = 30

  def __post_init__(self):
    object.__setattr__(self, "activation", Activation(self.activation))
    _check_transformer("CLIPVisionConfig", self.width, self.layers, self.heads, self.mlp_width)
    if self.patch_size < 1 or self.image_size < self.patch_size:
      raise ValueError(f"CLIPVisionConfig: patch_size {self.patch_size} must be in "
                       f"[1, image_size {self.image_size}]")
    if self.temporal and (self.temporal_ff_mult < 1 or self.max_frames < 1):
      raise ValueError(f"CLIPVisionConfig: temporal_ff_mult {self.temporal_ff_mult} and "
                       f"max_frames {self.max_frames} must be positive")

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Both towers and the shared projection width (768 for ViT-L/14)."""

  text: CLIPTextConfig = CLIPTextConfig()
  vision: CLIPVisionConfig = CLIPVisionConfig()
  projection_dim: int = 768
  logit_scale_init: float = 2.6592
  attention_impl: AttentionImpl = AttentionImpl.XLA
  dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "attention_impl", AttentionImpl(self.attention_impl))
    jnp.dtype(self.dtype)  # raises on an unknown dtype name
    if self.projection_dim < 1:
      raise ValueError(f"CLIPConfig.projection_dim must be positive, got {self.projection_dim}")


def clip_config_from_original(d: Mapping[str, Any], **overrides) -> CLIPConfig:
  """The original `CLIPConfig.to_dict()` (fixture `clip_config`) -> CLIPConfig.

  `overrides` sets CLIPConfig fields the original has no notion of (attention_impl, dtype).
  """
  def tower(key: str) -> Mapping[str, Any]:
    sub = d.get(key)
    if not isinstance(sub, Mapping):
      raise ValueError(f"clip_config has no {key!r} dict")
    return sub

  def field(sub: Mapping[str, Any], key: str, tower_name: str) -> Any:
    if key not in sub:
      raise ValueError(f"clip_config.{tower_name} is missing {key!r}")
    return sub[key]

  t, v = tower("text_config"), tower("vision_config")
  common = lambda sub, n: dict(
      width=field(sub, "hidden_size", n), layers=field(sub, "num_hidden_layers", n),
      heads=field(sub, "num_attention_heads", n), mlp_width=field(sub, "intermediate_size", n),
      activation=field(sub, "hidden_act", n))
  text = CLIPTextConfig(vocab_size=field(t, "vocab_size", "text_config"),
                        max_positions=field(t, "max_position_embeddings", "text_config"),
                        **common(t, "text_config"))
  vision = CLIPVisionConfig(image_size=field(v, "image_size", "vision_config"),
                            patch_size=field(v, "patch_size", "vision_config"),
                            **common(v, "vision_config"))
  if "projection_dim" not in d:
    raise ValueError("clip_config is missing 'projection_dim'")
  return CLIPConfig(text=text, vision=vision, projection_dim=d["projection_dim"],
                    logit_scale_init=d.get("logit_scale_init_value", 2.6592), **overrides)


class TowerOutput(NamedTuple):
  last_hidden_state: jax.Array  # [B, T, D] (video: averaged over frames)
  pooler_output: jax.Array  # [B, D]


# ------------------------------------------------------------------------------------------------
# Transformer layers


class CLIPAttention(nn.Module):
  """`self_attn`: multi-head attention with biased q/k/v/out projections. [N, T, D] -> same."""

  heads: int
  attention_impl: AttentionImpl = AttentionImpl.XLA
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    d = x.shape[-1]
    proj = lambda name: dense(d, ("embed_in", "heads"), name=name, dtype=self.dtype)
    split = lambda t: einops.rearrange(t, "n t (h k) -> n t h k", h=self.heads)
    q, k, v = split(proj("q_proj")(x)), split(proj("k_proj")(x)), split(proj("v_proj")(x))
    out = dot_product_attention(q, k, v, bias, impl=self.attention_impl)  # [N, T, H, D/H]
    out = einops.rearrange(out, "n t h k -> n t (h k)")
    return dense(d, ("heads", "embed"), name="out_proj", dtype=self.dtype)(out)


class CLIPMLP(nn.Module):
  """`mlp`: fc1 -> activation -> fc2."""

  mlp_width: int
  activation: Activation
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = dense(self.mlp_width, ("embed", "mlp"), name="fc1", dtype=self.dtype)(x)
    h = _activate(self.activation, h)
    return dense(x.shape[-1], ("mlp", "embed"), name="fc2", dtype=self.dtype)(h)


class CLIPTemporalAttention(nn.Module):
  """`temporal_attn`: self-attention over frames. x [M, F, D], bias [H, F, F] -> [M, F, D].

  Its "LayerNorm" normalises over frames (the UNet's `TimeAxisLayerNorm`); no residual here.
  """

  heads: int
  max_frames: int
  attention_impl: AttentionImpl = AttentionImpl.XLA
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    d = x.shape[-1]
    # Checkpoint tables that CLIP's temporal attention never reads (it runs with framerate=None).
    table = nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                         ("unmodeled", "frames", "embed"))
    self.param("pos_embeds", table, (1, self.max_frames, d), jnp.float32)
    self.param("frame_rate_embeds", table, (1, self.max_frames, d), jnp.float32)
    x = TimeAxisLayerNorm(name="norm")(x)
    q = dense(d, ("embed_in", "heads"), name="to_q", dtype=self.dtype, use_bias=False)(x)
    kv = dense(2 * d, ("embed_in", "heads"), name="to_kv", dtype=self.dtype, use_bias=False)(x)
    k, v = jnp.split(kv, 2, axis=-1)
    split = lambda t: einops.rearrange(t, "m f (h k) -> m f h k", h=self.heads)
    out = dot_product_attention(split(q), split(k), split(v), bias[None],
                                impl=self.attention_impl)  # [M, F, H, D/H]
    out = einops.rearrange(out, "m f h k -> m f (h k)")
    out = dense(d, ("heads", "embed"), name="to_out", dtype=self.dtype, use_bias=False,
                zero_init=True)(out)
    return jnp.nan_to_num(out)  # as the original


class CLIPTemporalFeedForward(nn.Module):
  """`ff`: 1x1 Conv1d D -> 2I, GEGLU (float32), channel LN, 1x1 Conv1d I -> D. [M, F, D]."""

  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    inner = int(d * self.mult * 2 / 3)
    h = FeedForwardIn(2 * inner, dtype=self.dtype, name="proj_in")(x).astype(jnp.float32)
    h, gate = jnp.split(h, 2, axis=-1)
    h = h * jax.nn.gelu(gate, approximate=False)  # [M, F, I]
    return FeedForwardOut(d, dtype=self.dtype, name="proj_out")(h)


class CLIPTemporalBlock(nn.Module):
  """`temporal_self_attn`: x + attn(x, rel-pos bias), then x + ff(x), over frames. [M, F, D]."""

  heads: int
  ff_mult: int
  max_frames: int
  attention_impl: AttentionImpl = AttentionImpl.XLA
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    bias = ContinuousPositionBias(d // 2, self.heads, name="temporal_rel_pos_bias")(x.shape[1])
    x = CLIPTemporalAttention(self.heads, self.max_frames, self.attention_impl, dtype=self.dtype,
                              name="temporal_attn")(x, bias) + x  # bias [H, F, F]
    x = CLIPTemporalFeedForward(self.ff_mult, dtype=self.dtype, name="ff")(x) + x
    return x.astype(self.dtype)


class CLIPEncoderLayer(nn.Module):
  """Pre-LN self-attention (+ the temporal block for video) and MLP. x [N, T, D] -> same.

  With `frames`, x holds N = B*F frames (frame-major within a sample) and the temporal block runs
  on every token's sequence of frames between the attention and the MLP.
  """

  heads: int
  mlp_width: int
  activation: Activation
  temporal: CLIPVisionConfig | None = None
  attention_impl: AttentionImpl = AttentionImpl.XLA
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None,
               frames: int | None = None) -> jax.Array:
    h = layer_norm(name="layer_norm1", dtype=self.dtype)(x)
    x = x + CLIPAttention(self.heads, self.attention_impl, dtype=self.dtype, name="self_attn")(
        h, bias)
    if frames is not None:
      if self.temporal is None:
        raise ValueError("this encoder has no temporal layers; it cannot run video frames")
      tokens = x.shape[1]
      t = einops.rearrange(x, "(b f) t d -> (b t) f d", f=frames)  # [M, F, D]
      t = CLIPTemporalBlock(self.heads, self.temporal.temporal_ff_mult, self.temporal.max_frames,
                            self.attention_impl, dtype=self.dtype, name="temporal_self_attn")(t)
      x = einops.rearrange(t, "(b t) f d -> (b f) t d", t=tokens)  # [N, T, D]
    h = layer_norm(name="layer_norm2", dtype=self.dtype)(x)
    return x + CLIPMLP(self.mlp_width, self.activation, dtype=self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
  """`encoder.layers`: the stack of CLIPEncoderLayers."""

  config: CLIPTextConfig | CLIPVisionConfig
  attention_impl: AttentionImpl = AttentionImpl.XLA
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None,
               frames: int | None = None) -> jax.Array:
    return _Layers(self.config, self.attention_impl, dtype=self.dtype, name="layers")(
        x, bias, frames)


class _Layers(nn.Module):
  config: CLIPTextConfig | CLIPVisionConfig
  attention_impl: AttentionImpl = AttentionImpl.XLA
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None, frames: int | None) -> jax.Array:
    cfg = self.config
    temporal = cfg if isinstance(cfg, CLIPVisionConfig) and cfg.temporal else None
    for i in range(cfg.layers):
      x = CLIPEncoderLayer(cfg.heads, cfg.mlp_width, cfg.activation, temporal,
                           self.attention_impl, dtype=self.dtype, name=str(i))(x, bias, frames)
      x = nn.with_logical_constraint(x, ("batch", "act_length", "act_embed"))
    return x


# ------------------------------------------------------------------------------------------------
# Towers


class CLIPTextEmbeddings(nn.Module):
  """`embeddings`: token + position embeddings. ids [B, T] -> [B, T, D]."""

  config: CLIPTextConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    cfg = self.config
    tokens = embed(cfg.vocab_size, cfg.width, ("vocab", "embed"), "token_embedding",
                   self.dtype)(ids)
    positions = embed(cfg.max_positions, cfg.width, ("position", "embed"), "position_embedding",
                      self.dtype)(jnp.arange(ids.shape[1]))
    return tokens + positions[None]


class CLIPTextTransformer(nn.Module):
  """`text_model`: ids [B, T] -> TowerOutput ([B, T, D] after final LN, [B, D] at argmax id)."""

  config: CLIPTextConfig
  attention_impl: AttentionImpl = AttentionImpl.XLA
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array) -> TowerOutput:
    b, t = ids.shape
    x = CLIPTextEmbeddings(self.config, dtype=self.dtype, name="embeddings")(ids)  # [B, T, D]
    causal = jnp.tril(jnp.ones((t, t), bool))
    bias = jnp.where(causal, 0.0, jnp.finfo(jnp.float32).min)  # [T, T]
    x = CLIPEncoder(self.config, self.attention_impl, dtype=self.dtype, name="encoder")(x, bias)
    x = layer_norm(name="final_layer_norm", dtype=self.dtype)(x)
    # The end-of-text token has the largest id, so argmax finds the first one.
    pooled = x[jnp.arange(b), jnp.argmax(ids, axis=-1)]  # [B, D]
    return TowerOutput(x, pooled)


class CLIPVisionEmbeddings(nn.Module):
  """`embeddings`: patch conv (no bias), class token, positions. [N, S, S, 3] -> [N, T, D]."""

  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.config
    p = cfg.patch_size
    patches = nn.Conv(
        cfg.width, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("conv_height", "conv_width", "embed_in", "embed")),
        name="patch_embedding")(pixels)  # [N, S/p, S/p, D]
    patches = einops.rearrange(patches, "n h w d -> n (h w) d")  # [N, T-1, D]
    cls = self.param("class_embedding", nn.with_logical_partitioning(embed_init, ("embed",)),
                     (cfg.width,), jnp.float32)
    cls = jnp.broadcast_to(cls.astype(patches.dtype), (patches.shape[0], 1, cfg.width))
    x = jnp.concatenate([cls, patches], axis=1)  # [N, T, D]
    positions = embed(cfg.num_positions, cfg.width, ("position", "embed"), "position_embedding",
                      self.dtype)(jnp.arange(cfg.num_positions))
    return x + positions[None]


class CLIPVisionTransformer(nn.Module):
  """`vision_model`: pixels [N, S, S, 3] or video [B, F, S, S, 3] -> TowerOutput."""

  config: CLIPVisionConfig
  attention_impl: AttentionImpl = AttentionImpl.XLA
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> TowerOutput:
    frames = pixels.shape[1] if pixels.ndim == 5 else None
    x = pixels.reshape((-1,) + pixels.shape[-3:]).astype(self.dtype)  # [N, S, S, 3]
    x = CLIPVisionEmbeddings(self.config, dtype=self.dtype, name="embeddings")(x)  # [N, T, D]
    x = layer_norm(name="pre_layrnorm", dtype=self.dtype)(x)
    x = CLIPEncoder(self.config, self.attention_impl, dtype=self.dtype, name="encoder")(
        x, frames=frames)
    if frames is not None:
      x = einops.reduce(x, "(b f) t d -> b t d", "mean", f=frames)  # [B, T, D]
    pooled = layer_norm(name="post_layernorm", dtype=self.dtype)(x[:, 0])  # [B, D]
    return TowerOutput(x, pooled)


class CLIPModel(nn.Module):
  """`clip.model`: both towers and their projections into the shared prompt space."""

  config: CLIPConfig

  def setup(self):
    cfg = self.config
    kw = dict(attention_impl=cfg.attention_impl, dtype=jnp.dtype(cfg.dtype))
    self.text_model = CLIPTextTransformer(cfg.text, **kw)
    self.vision_model = CLIPVisionTransformer(cfg.vision, **kw)
    proj = lambda: nn.Dense(  # `dense` without a name: setup names children by attribute
        cfg.projection_dim, use_bias=False, dtype=kw["dtype"], param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 ("embed_in", "embed")))
    self.text_projection = proj()
    self.visual_projection = proj()
    # Contrastive temperature of the checkpoint; CoDi's encoders never use it.
    self.logit_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(cfg.logit_scale_init), ()), (), jnp.float32)

  def text(self, token_ids: jax.Array) -> TowerOutput:
    """token_ids [B, T] (T <= max_positions) -> text TowerOutput."""
    cfg = self.config.text
    if token_ids.ndim != 2 or not 1 <= token_ids.shape[1] <= cfg.max_positions:
      raise ValueError(f"token ids must be [B, T] with 1 <= T <= {cfg.max_positions}, got shape "
                       f"{token_ids.shape}")
    if not jnp.issubdtype(token_ids.dtype, jnp.integer):
      raise ValueError(f"token ids must be integers, got {token_ids.dtype}")
    return self.text_model(token_ids)

  def vision(self, pixel_values: jax.Array) -> TowerOutput:
    """Pixel values [B, S, S, 3] (image) or [B, F, S, S, 3] (video) -> vision TowerOutput."""
    cfg = self.config.vision
    if pixel_values.ndim not in (4, 5):
      raise ValueError(f"pixel values must be [B, S, S, 3] or [B, F, S, S, 3], got shape "
                       f"{pixel_values.shape}")
    if pixel_values.shape[-3:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"pixel values must end in ({cfg.image_size}, {cfg.image_size}, 3) "
                       f"(RGB, channels last), got shape {pixel_values.shape}")
    if pixel_values.ndim == 5:
      if pixel_values.shape[1] < 1:
        raise ValueError(f"a video needs at least one frame, got shape {pixel_values.shape}")
      if not cfg.temporal:
        raise ValueError("this CLIP vision tower has no temporal layers; it cannot encode video")
    return self.vision_model(pixel_values)

  def encode_text(self, token_ids: jax.Array) -> jax.Array:
    """`FrozenCLIP.encode_text`: token_ids [B, T] -> unit-norm prompt token [B, 1, P]."""
    z = self.text_projection(self.text(token_ids).pooler_output)
    return l2_normalize(z)[:, None]

  def encode_vision(self, pixel_values: jax.Array) -> jax.Array:
    """`FrozenCLIP.encode_vision` after preprocessing: [B, S, S, 3] / [B, F, S, S, 3] -> [B, 1, P].

    A one-frame video is encoded as an image, as the original does.
    """
    if pixel_values.ndim == 5 and pixel_values.shape[1] == 1:
      pixel_values = pixel_values[:, 0]
    z = self.visual_projection(self.vision(pixel_values).pooler_output)
    return l2_normalize(z)[:, None]

  def __call__(self, token_ids: jax.Array, pixel_values: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """Both prompt tokens ([B, 1, P] each)."""
    return self.encode_text(token_ids), self.encode_vision(pixel_values)


def init_params(config: CLIPConfig, rng: jax.Array):
  """Initial (logically partitioned) parameters; a 2-frame video creates the temporal layers."""
  side = config.vision.image_size
  pixels = jnp.zeros((1, 2, side, side, 3) if config.vision.temporal else (1, side, side, 3))
  ids = jnp.zeros((1, config.text.max_positions), jnp.int32)
  return CLIPModel(config).init(rng, ids, pixels)["params"]


def param_shapes(config: CLIPConfig):
  """`jax.eval_shape` of `init_params`: the full tree with no memory allocated."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


class FrozenCLIP:
  """Host-side CLIP prompt encoder with jitted towers (compiled once per input shape).

  `encode_text(token_ids)` and `encode_vision(x)` return what the original `FrozenCLIP` methods
  return, [B, 1, P]; `x` is images [B, H, W, 3] or videos [B, F, H, W, 3] in [-1, 1].
  """

  def __init__(self, config: CLIPConfig, params, preprocess_config: PreprocessConfig | None = None):
    self.config = config
    self.params = params
    self.preprocess_config = preprocess_config or PreprocessConfig(
        size=config.vision.image_size, crop_size=config.vision.image_size)
    if self.preprocess_config.crop_size != config.vision.image_size:
      raise ValueError(f"preprocessing crops to {self.preprocess_config.crop_size} but the vision "
                       f"tower takes {config.vision.image_size}x{config.vision.image_size}")
    model = CLIPModel(config)
    self._encode_text = jax.jit(
        lambda p, ids: model.apply({"params": p}, ids, method=CLIPModel.encode_text))
    self._encode_vision = jax.jit(
        lambda p, px: model.apply({"params": p}, px, method=CLIPModel.encode_vision))

  def encode_text(self, token_ids: np.ndarray | jax.Array) -> jax.Array:
    ids = np.asarray(token_ids)
    if ids.ndim == 2 and ids.size and (ids.min() < 0 or ids.max() >= self.config.text.vocab_size):
      raise ValueError(f"token ids must lie in [0, {self.config.text.vocab_size}), got range "
                       f"[{ids.min()}, {ids.max()}]")
    return self._encode_text(self.params, jnp.asarray(ids))

  def encode_vision(self, x: np.ndarray | jax.Array) -> jax.Array:
    return self._encode_vision(self.params, jnp.asarray(preprocess(x, self.preprocess_config)))
