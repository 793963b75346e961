"""Batched text generation from Optimus latents: one jitted `lax.while_loop` over a KV cache.

The original (`vae/optimus.py` `sample_single_sequence_conditional`, CODI_REFERENCE §1.4)
decodes one sample at a time and re-runs GPT-2 on the whole prefix at every step. Here all B
samples advance together and each step feeds only the newest token through the cached keys and
values (`optimus.KVCache`); the per-step logits equal the full recompute. Choice of the next
token, as in the original: logits / temperature -> top-k (keep logits >= the k-th largest) ->
top-p (keep the smallest sorted prefix whose probability mass exceeds top_p, always the first
token) -> categorical draw; or greedy argmax.

Output layout is the original's `generated`: ids[:, 0] = <BOS>, then the chosen tokens; a sample
ends at its first <EOS> (kept), and when it reaches max_length its last token is forced to <EOS>
(as the original does). Positions after the end hold pad_id; lengths count BOS and EOS. Only
(batch, max_length) and the model are static: sampling settings and ids are traced, so one
compilation serves every setting.

Randomness: one key for the batch (split every step), or one key per row ([B] keys; step s of
row b draws from fold_in(key_b, s)), so that a row's text depends only on its own key and latent,
not on the other rows of its batch.

B batch, N max_length, V vocabulary, Z latent size.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from codi_jax.models.optimus import (BOS_ID, EOS_ID, PAD_ID, KVCache, Optimus, OptimusConfig,
                                     check_latent)


class Generated(NamedTuple):
  ids: jax.Array      # [B, N] int32
  lengths: jax.Array  # [B] int32, tokens up to and including <EOS>


class _LoopState(NamedTuple):
  step: jax.Array     # [] index of the token fed in this step
  ids: jax.Array      # [B, N]
  lengths: jax.Array  # [B]
  done: jax.Array     # [B] bool
  cache: KVCache
  rng: jax.Array     # [] or [B] keys


def filter_logits(logits: jax.Array, top_k: jax.Array | int, top_p: jax.Array | float
                  ) -> jax.Array:
  """The original's `top_k_top_p_filtering` on [B, V] logits (removed entries -> -inf).

  top_k > 0 keeps logits >= the k-th largest; top_p > 0 then keeps sorted tokens whose preceding
  cumulative probability is <= top_p (so the most likely token always stays).
  """
  v = logits.shape[-1]
  ranked = -jnp.sort(-logits, axis=-1)  # [B, V] descending
  k = jnp.clip(top_k, 1, v)
  kth = jax.lax.dynamic_slice_in_dim(ranked, k - 1, 1, axis=-1)  # [B, 1]
  use_k = top_k > 0
  logits = jnp.where(use_k & (logits < kth), -jnp.inf, logits)
  ranked = jnp.where(use_k & (ranked < kth), -jnp.inf, ranked)
  mass = jnp.cumsum(jax.nn.softmax(ranked, axis=-1), axis=-1)  # [B, V]
  # Removal is a suffix of the sorted order: keep the first `kept` tokens.
  kept = 1 + jnp.sum(mass[:, :-1] <= top_p, axis=-1, keepdims=True)  # [B, 1]
  threshold = jnp.take_along_axis(ranked, kept - 1, axis=-1)  # [B, 1]
  return jnp.where((top_p > 0) & (logits < threshold), -jnp.inf, logits)


def choose_tokens(logits: jax.Array, rng: jax.Array, *, greedy: jax.Array | bool,
                  temperature: jax.Array | float, top_k: jax.Array | int,
                  top_p: jax.Array | float) -> jax.Array:
  """Next token per row of [B, V] logits: argmax, or a draw from the filtered distribution
  (with one key for the batch, or row b drawn with its own key rng[b])."""
  filtered = filter_logits(logits / temperature, top_k, top_p)
  if rng.ndim == 0:
    drawn = jax.random.categorical(rng, filtered, axis=-1)  # [B]
  else:
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(rng, filtered)  # [B]
  return jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)


def _generate(model: Optimus, max_length: int, params, z: jax.Array, rng: jax.Array,
              greedy: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
              bos_id: jax.Array, eos_id: jax.Array, pad_id: jax.Array) -> Generated:
  batch = z.shape[0]
  variables = {"params": params}
  ids = jnp.full((batch, max_length), pad_id, jnp.int32).at[:, 0].set(bos_id)  # [B, N]
  # Slots: the latent + tokens 0..N-2 (the last token is never fed back).
  cache = model.apply(variables, z, max_length, method="init_cache")
  state = _LoopState(step=jnp.zeros((), jnp.int32), ids=ids,
                     lengths=jnp.full((batch,), max_length, jnp.int32),
                     done=jnp.zeros((batch,), bool), cache=cache, rng=rng)

  def running(s: _LoopState) -> jax.Array:
    return (s.step < max_length - 1) & ~jnp.all(s.done)

  def step(s: _LoopState) -> _LoopState:
    token = jax.lax.dynamic_slice_in_dim(s.ids, s.step, 1, axis=1)  # [B, 1]
    logits, cache = model.apply(variables, token, z, s.cache, s.step, method="extend")
    if s.rng.ndim == 0:
      rng, draw = jax.random.split(s.rng)
    else:  # per-row keys stay fixed; each step folds in its index
      rng, draw = s.rng, jax.vmap(jax.random.fold_in, (0, None))(s.rng, s.step)
    nxt = choose_tokens(logits[:, 0], draw, greedy=greedy, temperature=temperature, top_k=top_k,
                        top_p=top_p)  # [B]
    nxt = jnp.where(s.step + 2 == max_length, eos_id, nxt)  # the original's forced last <EOS>
    nxt = jnp.where(s.done, pad_id, nxt)
    ends = ~s.done & (nxt == eos_id)
    ids = jax.lax.dynamic_update_slice_in_dim(s.ids, nxt[:, None], s.step + 1, axis=1)
    return _LoopState(step=s.step + 1, ids=ids,
                      lengths=jnp.where(ends, s.step + 2, s.lengths),
                      done=s.done | ends, cache=cache, rng=rng)

  final = jax.lax.while_loop(running, step, state)
  return Generated(final.ids, final.lengths)


_generate_jit = jax.jit(_generate, static_argnums=(0, 1))


def generate(model: Optimus, params, z: jax.Array, rng: jax.Array, *, max_length: int = 30,
             greedy: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             bos_id: int = BOS_ID, eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> Generated:
  """Token ids [B, max_length] decoded from VAE latents z [B, Z], starting from <BOS>.

  Args:
    model, params: the Optimus VAE and its params (only the decoder's are used).
    rng: a `jax.random` key, or one per row [B]; the draws of a batch are independent per
      sample, and with row keys each row's draws depend on its own key alone.
    greedy: argmax instead of sampling (temperature, top_k and top_p then play no part).
    temperature, top_k, top_p: as the original's `sample_single_sequence_conditional`; its
      CoDi defaults (1.0, 0, 1.0) are plain multinomial sampling. top_k = 0 or top_p = 0
      switches that filter off.
  """
  cfg = model.config
  z = jnp.asarray(z)
  check_latent(z, cfg.latent_size)
  if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)  # a raw uint32 key (or [B] of them)
  if rng.shape not in ((), (z.shape[0],)):
    raise ValueError(f"rng must be one key or one key per row [{z.shape[0]}], got shape "
                     f"{rng.shape}")
  if not 2 <= max_length <= cfg.decoder.n_positions:
    raise ValueError(f"max_length must be in [2, {cfg.decoder.n_positions}] (<BOS> plus at "
                     f"least one token), got {max_length}")
  if not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0: off), got {top_k}")
  if not 0.0 <= top_p <= 1.0:
    raise ValueError(f"top_p must be in [0, 1] (0: off), got {top_p}")
  for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
    if not 0 <= value < cfg.decoder.vocab_size:
      raise ValueError(f"{name} {value} is outside the decoder vocabulary "
                       f"[0, {cfg.decoder.vocab_size})")
  scalars = dict(greedy=jnp.asarray(greedy), temperature=jnp.asarray(temperature, jnp.float32),
                 top_k=jnp.asarray(top_k, jnp.int32), top_p=jnp.asarray(top_p, jnp.float32),
                 bos_id=jnp.asarray(bos_id, jnp.int32), eos_id=jnp.asarray(eos_id, jnp.int32),
                 pad_id=jnp.asarray(pad_id, jnp.int32))
  return _generate_jit(model, max_length, params, z.astype(jnp.float32), rng, **scalars)


def decoder_latent(config: OptimusConfig, z: jax.Array) -> jax.Array:
  """Diffusion latent -> the latent GPT-2 reads: z / scale_factor (+ shift_factor, 0 for the
  released model), as CoDi's `optimus_decode` divides by its text scale factor."""
  return jnp.asarray(z) / config.scale_factor + config.shift_factor


def codi_generate(model: Optimus, params, z: jax.Array, rng: jax.Array, **kwargs
                  ) -> Generated:
  """CoDi's `optimus_decode` on diffusion latents: `decoder_latent`, then `generate`."""
  return generate(model, params, decoder_latent(model.config, z), rng, **kwargs)
