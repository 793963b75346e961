"""Optimus text VAE: a BERT encoder to a Gaussian latent and a GPT-2 decoder that reads the latent.

Port of the original `latent_diffusion/vae/optimus.py` (`optimus_vae`) with its
`BertForLatentConnector_XX` (`optimus_modules/optimus_bert.py`) and `GPT2ForLatentConnector_XX` /
`GPT2Model_XX` (`optimus_modules/optimus_gpt2.py`); see CODI_REFERENCE §1.4-1.5. Full size is
BERT-base-cased (GELU erf, LayerNorm eps 1e-12) + GPT-2 small (GELU tanh, eps 1e-5), latent 768.

The decoder uses the latent twice: `linear(z)` is split per layer into ONE extra key/value slot
(the same vector as key and value, not passed through `c_attn`) in front of the tokens, and
`linear_emb(z)` is added to every token embedding. Token t therefore has position id t + 1 and
sees the latent slot and tokens <= t. Logits use the tied `wte` matrix (no separate `lm_head`).
Module names mirror the torch state-dict keys (`encoder/encoder/layer/0/attention/self/query`,
`decoder/transformer/h/0/attn/c_attn`), so conversion is `keymap.OPTIMUS`.

Decoding state is an explicit `KVCache` with slot 0 = latent and slot 1 + t = token t, so the
teacher-forced forward and the incremental steps of `optimus_decode` share one code path.

B batch, T tokens, S key slots (1 latent + tokens), L layers, H heads, D head width, E width,
I feed-forward width, Z latent size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from codi_jax.models.attention import dot_product_attention
from codi_jax.models.layers import Dtype, check_positive, dense, embed, layer_norm

# CoDi's text latent scale (`codi.yaml` text_scale_factor): diffusion latent = mu * 4.3108.
TEXT_SCALE_FACTOR = 4.3108
# GPT-2 ids of the tokens Optimus adds after the 50257 BPE tokens, in `add_special_tokens` order.
PAD_ID, BOS_ID, EOS_ID = 50257, 50258, 50259
# Additive attention mask value of both originals (BERT padding and GPT-2 causal mask).
_MASKED = -10000.0


def _divisible(owner: str, width: int, heads: int) -> None:
  if width % heads:
    raise ValueError(f"{owner}: width {width} is not divisible by {heads} heads")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The encoder (`BertForLatentConnector_XX`); defaults are BERT-base-cased."""

  vocab_size: int = 28996
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  def __post_init__(self):
    check_positive("BertConfig", **dataclasses.asdict(self))
    _divisible("BertConfig", self.hidden_size, self.num_heads)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """The decoder (`GPT2ForLatentConnector_XX`); defaults are GPT-2 small + 3 added tokens."""

  vocab_size: int = 50260
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_positions: int = 1024
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    check_positive("GPT2Config", **dataclasses.asdict(self))
    _divisible("GPT2Config", self.n_embd, self.n_head)
    if self.n_positions < 2:
      raise ValueError("GPT2Config.n_positions must be >= 2 (position 0 is the latent slot's)")

  @property
  def max_tokens(self) -> int:
    """Longest token sequence one forward can take: positions 1..T must exist in `wpe`."""
    return self.n_positions - 1


@dataclasses.dataclass(frozen=True)
class OptimusConfig:
  encoder: BertConfig = dataclasses.field(default_factory=BertConfig)
  decoder: GPT2Config = dataclasses.field(default_factory=GPT2Config)
  latent_size: int = 768
  scale_factor: float = TEXT_SCALE_FACTOR
  # Diffusion latent = scale_factor * (mu - shift_factor); 0 for the released Optimus, measured
  # for one trained from scratch (`codi_jax.train.latent_stats`).
  shift_factor: float = 0.0
  dtype: str = "float32"

  def __post_init__(self):
    if not isinstance(self.encoder, BertConfig) or not isinstance(self.decoder, GPT2Config):
      raise TypeError("OptimusConfig.encoder/decoder must be a BertConfig and a GPT2Config")
    check_positive("OptimusConfig", latent_size=self.latent_size, scale_factor=self.scale_factor)
    jnp.dtype(self.dtype)  # raises on an unknown dtype name


def _get(cfg: Mapping[str, Any], key: str, where: str) -> Any:
  if key not in cfg:
    raise ValueError(f"original Optimus config: {where} has no {key!r}")
  return cfg[key]


def optimus_config_from_original(args: Mapping[str, Any], *,
                                 scale_factor: float = TEXT_SCALE_FACTOR) -> OptimusConfig:
  """`args` of the original `optimus_vae` model config (`configs/model/optimus.yaml`).

  That is the dict with `encoder`, `decoder` (each `{..., "args": {"config": {...}}}`) and
  `args.latent_size`, as stored in a fixture's `config.args`.
  """
  enc_args = _get(_get(args, "encoder", "optimus_vae"), "args", "encoder")
  dec_args = _get(_get(args, "decoder", "optimus_vae"), "args", "decoder")
  bert = _get(enc_args, "config", "encoder.args")
  gpt = _get(dec_args, "config", "decoder.args")
  latent = int(_get(_get(args, "args", "optimus_vae"), "latent_size", "optimus_vae.args"))
  for where, value in (("encoder.args.latent_size", enc_args.get("latent_size", latent)),
                       ("decoder.args.config.latent_size", gpt.get("latent_size", latent))):
    if int(value) != latent:
      raise ValueError(f"original Optimus config: {where} = {value} != latent_size {latent}")
  if bert.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"original Optimus config: BERT hidden_act {bert['hidden_act']!r} is not "
                     "supported (only the erf 'gelu')")
  n_embd = int(_get(gpt, "n_embd", "decoder config"))
  if int(gpt.get("hidden_size", n_embd)) != n_embd:
    raise ValueError(f"original Optimus config: GPT-2 hidden_size {gpt['hidden_size']} != n_embd "
                     f"{n_embd} (the latent memory is split by hidden_size)")
  encoder = BertConfig(
      vocab_size=int(_get(bert, "vocab_size", "encoder config")),
      hidden_size=int(_get(bert, "hidden_size", "encoder config")),
      num_layers=int(_get(bert, "num_hidden_layers", "encoder config")),
      num_heads=int(_get(bert, "num_attention_heads", "encoder config")),
      intermediate_size=int(_get(bert, "intermediate_size", "encoder config")),
      max_positions=int(_get(bert, "max_position_embeddings", "encoder config")),
      type_vocab_size=int(_get(bert, "type_vocab_size", "encoder config")),
      layer_norm_eps=float(bert.get("layer_norm_eps", 1e-12)))
  decoder = GPT2Config(
      vocab_size=int(_get(gpt, "vocab_size", "decoder config")),
      n_embd=n_embd,
      n_layer=int(_get(gpt, "n_layer", "decoder config")),
      n_head=int(_get(gpt, "n_head", "decoder config")),
      n_positions=int(_get(gpt, "n_positions", "decoder config")),
      layer_norm_eps=float(gpt.get("layer_norm_epsilon", 1e-5)))
  return OptimusConfig(encoder=encoder, decoder=decoder, latent_size=latent,
                       scale_factor=scale_factor)


def check_token_ids(ids: jax.Array, max_tokens: int, what: str) -> None:
  """Raises ValueError unless `ids` is a non-empty [B, T] integer array with T <= max_tokens."""
  if ids.ndim != 2:
    raise ValueError(f"{what}: token ids must be [batch, tokens], got shape {ids.shape}")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"{what}: token ids must be integers, got {ids.dtype}")
  if ids.shape[0] == 0 or ids.shape[1] == 0:
    raise ValueError(f"{what}: empty token ids (shape {ids.shape})")
  if ids.shape[1] > max_tokens:
    raise ValueError(f"{what}: {ids.shape[1]} tokens exceed the model's {max_tokens} positions")


def check_latent(z: jax.Array, latent_size: int, batch: int | None = None) -> None:
  """Raises ValueError unless `z` is [batch, latent_size] with a non-empty batch."""
  if (z.ndim != 2 or z.shape[0] == 0 or z.shape[1] != latent_size
      or (batch is not None and z.shape[0] != batch)):
    raise ValueError(f"latent z must be [{'batch' if batch is None else batch}, {latent_size}] "
                     f"(batch, latent_size), got shape {z.shape}")


# --------------------------------------------------------------------------------------------
# Encoder: BERT + pooler + `linear` to (mu, logvar).


class EncoderOutput(NamedTuple):
  sequence: jax.Array  # [B, T, E] last hidden state
  pooled: jax.Array    # [B, E] tanh(dense(token 0))
  mu: jax.Array        # [B, Z]
  logvar: jax.Array    # [B, Z]


class BertEmbeddings(nn.Module):
  config: BertConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    cfg = self.config
    e = cfg.hidden_size
    words = embed(cfg.vocab_size, e, ("vocab", "embed"), "word_embeddings", self.dtype)(ids)
    pos = embed(cfg.max_positions, e, ("position", "embed"), "position_embeddings",
                self.dtype)(jnp.arange(ids.shape[1]))  # [T, E]
    types = embed(cfg.type_vocab_size, e, ("unmodeled", "embed"), "token_type_embeddings",
                  self.dtype)(jnp.zeros_like(ids))
    h = words + pos[None] + types  # [B, T, E]
    return layer_norm(name="LayerNorm", dtype=self.dtype, epsilon=cfg.layer_norm_eps)(h)


class BertSelfAttention(nn.Module):
  """`attention.self`: query/key/value Linears, softmax(q k^T / sqrt(D) + mask bias) v."""

  config: BertConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    e, heads = self.config.hidden_size, self.config.num_heads
    split = lambda t: einops.rearrange(t, "b t (h d) -> b t h d", h=heads)
    q, k, v = (split(dense(e, ("embed_in", "heads"), name=n, dtype=self.dtype)(x))
               for n in ("query", "key", "value"))
    out = dot_product_attention(q, k, v, bias)  # [B, T, H, D]
    return einops.rearrange(out, "b t h d -> b t (h d)")


class BertResidualOutput(nn.Module):
  """`attention.output` / `output`: LayerNorm(dense(x) + residual)."""

  config: BertConfig
  in_axis: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
    h = dense(self.config.hidden_size, (self.in_axis, "embed"), name="dense", dtype=self.dtype)(x)
    return layer_norm(name="LayerNorm", dtype=self.dtype,
                      epsilon=self.config.layer_norm_eps)(h + residual)


class BertAttention(nn.Module):
  config: BertConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    a = BertSelfAttention(self.config, self.dtype, name="self")(x, bias)
    return BertResidualOutput(self.config, "heads", self.dtype, name="output")(a, x)


class BertIntermediate(nn.Module):
  config: BertConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = dense(self.config.intermediate_size, ("embed_in", "mlp"), name="dense", dtype=self.dtype)(x)
    return nn.gelu(h, approximate=False)  # BERT's "gelu" is the exact erf form


class BertLayer(nn.Module):
  config: BertConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    a = BertAttention(self.config, self.dtype, name="attention")(x, bias)
    h = BertIntermediate(self.config, self.dtype, name="intermediate")(a)  # [B, T, I]
    h = BertResidualOutput(self.config, "mlp", self.dtype, name="output")(h, a)
    return nn.with_logical_constraint(h, ("batch", "act_length", "act_embed"))


class BertLayers(nn.Module):
  """The original `nn.ModuleList` `encoder.layer` (children `0`, `1`, ...)."""

  config: BertConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    for i in range(self.config.num_layers):
      x = BertLayer(self.config, self.dtype, name=str(i))(x, bias)
    return x


class BertEncoderStack(nn.Module):
  """`encoder.encoder` (`BertEncoder`): holds `layer`."""

  config: BertConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    return BertLayers(self.config, self.dtype, name="layer")(x, bias)


class _Pooler(nn.Module):
  """`pooler` (`BertPooler`): its Linear is child `dense`; tanh is applied by the caller."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return dense(self.features, ("embed_in", "embed"), name="dense", dtype=self.dtype)(x)


class BertLatentEncoder(nn.Module):
  """`BertForLatentConnector_XX` plus the VAE's `encoder.linear(pooled).chunk(2)`.

  Attention mask = ids > 0 (CoDi's `optimus_encode`): padded keys get -10000 added to their
  scores, as BERT's extended mask does.
  """

  config: BertConfig
  latent_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array) -> EncoderOutput:
    check_token_ids(ids, self.config.max_positions, "Optimus encoder")
    keep = (ids > 0).astype(jnp.float32)
    bias = ((1.0 - keep) * _MASKED)[:, None, None, :]  # [B, 1, 1, T]
    h = BertEmbeddings(self.config, self.dtype, name="embeddings")(ids)  # [B, T, E]
    h = BertEncoderStack(self.config, self.dtype, name="encoder")(h, bias)
    pooled = jnp.tanh(_Pooler(self.config.hidden_size, self.dtype, name="pooler")(h[:, 0]))
    stats = dense(2 * self.latent_size, ("embed_in", "embed"), name="linear", dtype=self.dtype,
                  use_bias=False)(pooled)  # [B, 2Z]
    mu, logvar = jnp.split(stats, 2, axis=-1)
    return EncoderOutput(h, pooled, mu, logvar)


# --------------------------------------------------------------------------------------------
# Decoder: GPT-2 with the latent as memory and as an added embedding.


class KVCache(NamedTuple):
  """Keys/values of every layer; slot 0 is the latent, slot 1 + t is token t."""

  key: jax.Array    # [L, B, S, H, D]
  value: jax.Array  # [L, B, S, H, D]

  @property
  def num_slots(self) -> int:
    return self.key.shape[2]


def causal_bias(offset: jax.Array | int, num_tokens: int, num_slots: int) -> jax.Array:
  """[1, 1, T, S]: token `offset + t` sees slots 0..offset+t+1 (latent + tokens so far)."""
  query = offset + jnp.arange(num_tokens)[:, None]  # [T, 1]
  visible = jnp.arange(num_slots)[None, :] <= query + 1  # [T, S]
  return jnp.where(visible, 0.0, _MASKED)[None, None]


class GPT2Attention(nn.Module):
  """`attn`: `c_attn` -> q, k, v; k/v written into the layer's cache at `offset`; `c_proj`."""

  config: GPT2Config
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key: jax.Array, value: jax.Array, offset: jax.Array | int,
               bias: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    e, heads = self.config.n_embd, self.config.n_head
    qkv = dense(3 * e, ("embed_in", "heads"), name="c_attn", dtype=self.dtype)(x)  # [B, T, 3E]
    q, k, v = (einops.rearrange(t, "b t (h d) -> b t h d", h=heads)
               for t in jnp.split(qkv, 3, axis=-1))
    start = (0, offset + 1, 0, 0)
    key = jax.lax.dynamic_update_slice(key, k.astype(key.dtype), start)  # [B, S, H, D]
    value = jax.lax.dynamic_update_slice(value, v.astype(value.dtype), start)
    out = dot_product_attention(q, key, value, bias)  # [B, T, H, D]
    out = einops.rearrange(out, "b t h d -> b t (h d)")
    return dense(e, ("heads", "embed"), name="c_proj", dtype=self.dtype)(out), key, value


class GPT2MLP(nn.Module):
  config: GPT2Config
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    e = self.config.n_embd
    h = nn.gelu(dense(4 * e, ("embed_in", "mlp"), name="c_fc", dtype=self.dtype)(x),
                approximate=True)  # GPT-2's tanh GELU
    return dense(e, ("mlp", "embed"), name="c_proj", dtype=self.dtype)(h)


class GPT2Block(nn.Module):
  config: GPT2Config
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key: jax.Array, value: jax.Array, offset: jax.Array | int,
               bias: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    ln = lambda name: layer_norm(name=name, dtype=self.dtype, epsilon=self.config.layer_norm_eps)
    a, key, value = GPT2Attention(self.config, self.dtype, name="attn")(
        ln("ln_1")(x), key, value, offset, bias)
    x = x + a
    x = x + GPT2MLP(self.config, self.dtype, name="mlp")(ln("ln_2")(x))
    return nn.with_logical_constraint(x, ("batch", "act_length", "act_embed")), key, value


class GPT2Blocks(nn.Module):
  """The original `nn.ModuleList` `transformer.h` (children `0`, `1`, ...)."""

  config: GPT2Config
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cache: KVCache, offset: jax.Array | int
               ) -> tuple[jax.Array, KVCache]:
    bias = causal_bias(offset, x.shape[1], cache.num_slots)
    keys, values = [], []
    for i in range(self.config.n_layer):
      x, k, v = GPT2Block(self.config, self.dtype, name=str(i))(
          x, cache.key[i], cache.value[i], offset, bias)
      keys.append(k)
      values.append(v)
    return x, KVCache(jnp.stack(keys), jnp.stack(values))


class GPT2Transformer(nn.Module):
  """`transformer` (`GPT2Model_XX`): wte, wpe, h, ln_f, and the latent maps linear/linear_emb."""

  config: GPT2Config
  latent_size: int
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    e = cfg.n_embd
    self.wte = embed(cfg.vocab_size, e, ("vocab", "embed"), "wte", self.dtype)
    self.wpe = embed(cfg.n_positions, e, ("position", "embed"), "wpe", self.dtype)
    self.h = GPT2Blocks(cfg, self.dtype)
    self.ln_f = layer_norm(dtype=self.dtype, epsilon=cfg.layer_norm_eps, name="ln_f")
    # One latent key/value vector per layer; one latent vector added to every token embedding.
    self.linear = dense(e * cfg.n_layer, ("embed_in", "embed"), dtype=self.dtype, use_bias=False,
                        name="linear")
    self.linear_emb = dense(e, ("embed_in", "embed"), dtype=self.dtype, use_bias=False,
                            name="linear_emb")

  def init_cache(self, z: jax.Array, num_slots: int) -> KVCache:
    """Empty token slots and the latent memory in slot 0: linear(z) split per layer, each
    layer's E-vector split into heads exactly as a key/value row."""
    cfg = self.config
    check_latent(z, self.latent_size)
    if not 2 <= num_slots <= cfg.n_positions:
      raise ValueError(f"a decoder cache needs 2..{cfg.n_positions} slots (latent + tokens), "
                       f"got {num_slots}")
    memory = einops.rearrange(self.linear(z), "b (l h d) -> l b 1 h d", l=cfg.n_layer,
                              h=cfg.n_head)  # [L, B, 1, H, D]
    empty = jnp.zeros(memory.shape[:2] + (num_slots - 1,) + memory.shape[3:], memory.dtype)
    slots = jnp.concatenate([memory, empty], axis=2)  # [L, B, S, H, D]
    return KVCache(slots, slots)

  def __call__(self, ids: jax.Array, z: jax.Array, cache: KVCache, offset: jax.Array | int
               ) -> tuple[jax.Array, KVCache]:
    check_latent(z, self.latent_size, ids.shape[0])
    positions = offset + 1 + jnp.arange(ids.shape[1])  # [T]: the latent slot holds position 0
    h = self.wte(ids) + self.wpe(positions)[None]  # [B, T, E]
    h = h + self.linear_emb(z)[:, None]
    h, cache = self.h(h, cache, offset)
    return self.ln_f(h), cache


class GPT2LatentDecoder(nn.Module):
  """`GPT2ForLatentConnector_XX`: child `transformer` (`GPT2Model_XX`) and the tied LM head."""

  config: GPT2Config
  latent_size: int
  dtype: Dtype = jnp.float32

  def setup(self):
    self.transformer = GPT2Transformer(self.config, self.latent_size, self.dtype)

  def __call__(self, ids: jax.Array, z: jax.Array) -> jax.Array:
    """Teacher-forced logits: ids [B, T] (`[<BOS>] + ctx`), z [B, Z] -> [B, T, V] float32."""
    check_token_ids(ids, self.config.max_tokens, "Optimus decoder")
    check_latent(z, self.latent_size, ids.shape[0])
    cache = self.init_cache(z, ids.shape[1] + 1)
    logits, _ = self.extend(ids, z, cache, 0)
    return logits

  def init_cache(self, z: jax.Array, num_slots: int) -> KVCache:
    return self.transformer.init_cache(z, num_slots)

  def extend(self, ids: jax.Array, z: jax.Array, cache: KVCache, offset: jax.Array | int
             ) -> tuple[jax.Array, KVCache]:
    """Feeds tokens offset..offset+T-1 (ids [B, T]): logits [B, T, V] float32, updated cache."""
    h, cache = self.transformer(ids, z, cache, offset)
    return self.transformer.wte.attend(h).astype(jnp.float32), cache


# --------------------------------------------------------------------------------------------
# The VAE.


class Optimus(nn.Module):
  """`optimus_vae`: children `encoder` (BERT) and `decoder` (GPT-2); token ids in, no tokenizer."""

  config: OptimusConfig

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    self.encoder = BertLatentEncoder(cfg.encoder, cfg.latent_size, dtype)
    self.decoder = GPT2LatentDecoder(cfg.decoder, cfg.latent_size, dtype)

  def __call__(self, bert_ids: jax.Array, gpt2_ids: jax.Array) -> tuple[EncoderOutput, jax.Array]:
    """Posterior of `bert_ids` and the decoder's logits for `gpt2_ids` at z = mu."""
    posterior = self.encode(bert_ids)
    return posterior, self.decode_logits(gpt2_ids, posterior.mu)

  def encode(self, ids: jax.Array) -> EncoderOutput:
    """BERT ids [B, T] (`[CLS] ... [SEP]`, 0-padded) -> sequence, pooled, mu, logvar."""
    return self.encoder(ids)

  def codi_encode(self, ids: jax.Array) -> jax.Array:
    """CoDi's `optimus_encode` on token ids: mu * scale_factor, [B, Z] (minus shift_factor
    first, 0 for the released model)."""
    return (self.encoder(ids).mu - self.config.shift_factor) * self.config.scale_factor

  def decode_logits(self, ids: jax.Array, z: jax.Array) -> jax.Array:
    """Teacher-forced decoder logits [B, T, V] for ids [B, T] given the VAE latent z [B, Z]."""
    return self.decoder(ids, z)

  def init_cache(self, z: jax.Array, num_slots: int) -> KVCache:
    """A decoding cache of `num_slots` slots (latent + tokens) holding z's latent memory."""
    return self.decoder.init_cache(z, num_slots)

  def extend(self, ids: jax.Array, z: jax.Array, cache: KVCache, offset: jax.Array | int
             ) -> tuple[jax.Array, KVCache]:
    """Incremental decoding: ids [B, T] are tokens offset..offset+T-1 -> logits, new cache."""
    return self.decoder.extend(ids, z, cache, offset)


def init_params(config: OptimusConfig, rng: jax.Array) -> dict:
  """Initial (logically partitioned) parameters of the encoder and the decoder."""
  bert = jnp.ones((1, 2), jnp.int32)
  return Optimus(config).init(rng, bert, bert)["params"]


def param_shapes(config: OptimusConfig):
  """`jax.eval_shape` of `init_params`: the full tree with no memory allocated."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
