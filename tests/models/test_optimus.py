"""Optimus text VAE: parity with the original, full-size shapes, KV-cache decoding, bad input."""

import json
import math
from typing import ClassVar

import flax.core.meta
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import parity
from codi_jax.convert import keymap
from codi_jax.models.optimus import (BertConfig, GPT2Config, Optimus, OptimusConfig,
                                     init_params, optimus_config_from_original, param_shapes)
from codi_jax.models.optimus_decode import codi_generate, filter_logits, generate

TINY = OptimusConfig(
    encoder=BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                       intermediate_size=32, max_positions=12),
    decoder=GPT2Config(vocab_size=97, n_embd=16, n_layer=2, n_head=2, n_positions=16),
    latent_size=8)
BOS, EOS, PAD = 94, 95, 96
N = 8  # max_length of most decoding tests


@pytest.fixture(scope="module")
def tiny():
  """Random tiny Optimus, its params and a batch of 2 latents."""
  params = jax.jit(init_params, static_argnums=0)(TINY, jax.random.key(0))
  z = jax.random.normal(jax.random.key(1), (2, TINY.latent_size))
  return Optimus(TINY), params, z


@jax.jit
def _logits(params, ids, z):
  return Optimus(TINY).apply({"params": params}, ids, z, method=Optimus.decode_logits)


def test_parity_with_original(fixtures_dir):
  rows = parity.check_file(fixtures_dir / "optimus.npz")
  assert set(rows) == {"bert_sequence_output", "bert_pooled", "latent_mu", "latent_logvar",
                       "codi_optimus_encode", "gpt2_next_token_logits", "gpt2_logits_seq0",
                       "input/bert_token_ids"}
  failed = {k: r for k, r in rows.items() if not r.passed}
  assert not failed, failed


def test_config_from_fixture(fixtures_dir):
  cfg = json.loads((fixtures_dir / "optimus.config.json").read_text())
  config = optimus_config_from_original(cfg["config"]["args"])
  assert config.latent_size == 24 and config.scale_factor == 4.3108
  assert config.encoder == BertConfig(vocab_size=28996, hidden_size=16, num_layers=2, num_heads=2,
                                      intermediate_size=32, max_positions=512)
  assert config.decoder == GPT2Config(vocab_size=50260, n_embd=16, n_layer=2, n_head=2,
                                      n_positions=1024)
  args = json.loads(json.dumps(cfg["config"]["args"]))
  args["decoder"]["args"]["config"]["latent_size"] = 32
  with pytest.raises(ValueError, match="latent_size 32 != latent_size 24|32 != latent_size"):
    optimus_config_from_original(args)
  del args["encoder"]["args"]["config"]
  with pytest.raises(ValueError, match="encoder.args has no 'config'"):
    optimus_config_from_original(args)


def test_full_size_params_match_manifest(fixtures_dir):
  """Default config = CoDi's Optimus: 241,599,744 parameters and exactly the original keys."""
  manifest = json.loads((fixtures_dir / "manifest_full.json").read_text())
  flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(param_shapes(OptimusConfig())))
  assert sum(math.prod(leaf.shape) for leaf in flat.values()) == 241_599_744
  assert manifest["parameter_counts_per_component"]["optimus"] == 241_599_744
  ours = {keymap.OPTIMUS.torch_key(p, "optimus."): keymap.OPTIMUS.torch_shape(p, leaf.shape)
          for p, leaf in flat.items()}
  expected = {k: tuple(v["shape"]) for k, v in manifest["components"]["optimus"].items()
              if v["kind"] == "parameter" and "tied_to" not in v}
  assert ours == expected


def test_parameters_have_logical_axes():
  boxed = flax.traverse_util.flatten_dict(param_shapes(TINY))
  assert all(isinstance(v, flax.core.meta.Partitioned) for v in boxed.values())
  names = lambda *path: boxed[path].names
  assert names("decoder", "transformer", "wte", "embedding") == ("vocab", "embed")
  assert names("decoder", "transformer", "wpe", "embedding") == ("position", "embed")
  assert names("encoder", "encoder", "layer", "1", "intermediate", "dense", "kernel") == (
      "embed_in", "mlp")
  assert names("decoder", "transformer", "h", "0", "attn", "c_attn", "kernel") == (
      "embed_in", "heads")


def test_cached_steps_equal_full_recompute(tiny):
  """Teacher forcing: one full forward == prefill of 3 tokens + one-token cached steps."""
  model, params, z = tiny
  ids = jax.random.randint(jax.random.key(2), (2, 7), 0, 97)
  full = _logits(params, ids, z)  # [B, T, V]
  cache = model.apply({"params": params}, z, 10, method=Optimus.init_cache)
  extend = jax.jit(lambda *a: model.apply({"params": params}, *a, method=Optimus.extend))
  pre, cache = extend(ids[:, :3], z, cache, 0)
  steps = [pre]
  for t in range(3, 7):
    logits, cache = extend(ids[:, t:t + 1], z, cache, t)
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)
  # The latent matters through both paths (memory slot and added embedding).
  assert np.abs(np.asarray(_logits(params, ids, z[::-1]) - full)).max() > 1e-3


def _unused_token(*rows) -> int:
  used = set(np.concatenate([np.ravel(r) for r in rows]).tolist())
  return next(t for t in range(90) if t not in used)


def test_greedy_equals_stepwise_argmax(tiny):
  model, params, z = tiny
  seq = np.full((2, 1), BOS)
  for _ in range(N - 2):  # the original's loop: re-run the whole prefix, take the argmax
    nxt = np.asarray(_logits(params, seq, z))[:, -1].argmax(-1)
    seq = np.concatenate([seq, nxt[:, None]], axis=1)
  eos = _unused_token(seq)
  out = generate(model, params, z, jax.random.key(0), max_length=N, greedy=True, bos_id=BOS,
                 eos_id=eos, pad_id=PAD)
  np.testing.assert_array_equal(out.ids[:, :-1], seq)
  np.testing.assert_array_equal(out.ids[:, -1], [eos, eos])  # forced at max_length
  np.testing.assert_array_equal(out.lengths, [N, N])


def test_eos_stops_each_sample(tiny):
  model, params, z = tiny
  free = generate(model, params, z, jax.random.key(0), max_length=N, greedy=True, bos_id=BOS,
                  eos_id=EOS, pad_id=PAD).ids
  free = np.asarray(free)
  eos = int(free[0, 3])  # sample 0 stops at its first occurrence of this token
  out = generate(model, params, z, jax.random.key(0), max_length=N, greedy=True, bos_id=BOS,
                 eos_id=eos, pad_id=PAD)
  for row, got, length in zip(free, np.asarray(out.ids), np.asarray(out.lengths)):
    hits = np.flatnonzero(row[1:N - 1] == eos)
    want = hits[0] + 2 if hits.size else N
    assert length == want
    np.testing.assert_array_equal(got[:want - 1], row[:want - 1])
    assert got[want - 1] == eos and np.all(got[want:] == PAD)
  assert out.lengths[0] <= 4


@pytest.mark.parametrize("mode", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.5)])
def test_filters_that_keep_one_token_are_greedy(tiny, mode):
  model, params, z = tiny
  kw = dict(max_length=N, bos_id=BOS, eos_id=EOS, pad_id=PAD)
  greedy = generate(model, params, z, jax.random.key(0), greedy=True, **kw)
  sampled = generate(model, params, z, jax.random.key(3), **mode, **kw)
  np.testing.assert_array_equal(sampled.ids, greedy.ids)


def test_sampling_is_keyed(tiny):
  model, params, z = tiny
  kw = dict(max_length=N, bos_id=BOS, eos_id=EOS, pad_id=PAD, temperature=1.0)
  a = generate(model, params, z, jax.random.key(5), **kw)
  b = generate(model, params, z, jax.random.key(5), **kw)
  c = generate(model, params, z, jax.random.key(6), **kw)
  np.testing.assert_array_equal(a.ids, b.ids)
  assert np.any(np.asarray(a.ids) != np.asarray(c.ids))
  assert np.asarray(a.ids).min() >= 0 and np.asarray(a.ids).max() < 97


def test_row_keys_make_each_row_independent_of_its_batch(tiny):
  """With one key per row, a row's text is the same alone or batched with any other rows."""
  model, params, z = tiny
  kw = dict(max_length=N, bos_id=BOS, eos_id=EOS, pad_id=PAD)
  keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(4), jnp.arange(2))  # [2]
  both = generate(model, params, z, keys, **kw)
  for i in range(2):
    alone = generate(model, params, z[i:i + 1], keys[i:i + 1], **kw)
    np.testing.assert_array_equal(alone.ids[0], both.ids[i])
    assert int(alone.lengths[0]) == int(both.lengths[i])
  swapped = generate(model, params, z[::-1], keys[::-1], **kw)
  np.testing.assert_array_equal(swapped.ids[::-1], both.ids)
  raw = generate(model, params, z, jax.random.key_data(keys), **kw)  # raw key data works too
  np.testing.assert_array_equal(raw.ids, both.ids)
  with pytest.raises(ValueError, match="one key per row"):
    generate(model, params, z, jax.random.split(jax.random.key(0), 3), **kw)


def test_codi_generate_divides_by_scale(tiny):
  model, params, z = tiny
  kw = dict(max_length=N, greedy=True, bos_id=BOS, eos_id=EOS, pad_id=PAD)
  plain = generate(model, params, z, jax.random.key(0), **kw)
  codi = codi_generate(model, params, z * TINY.scale_factor, jax.random.key(0), **kw)
  np.testing.assert_array_equal(codi.ids, plain.ids)


def _reference_filter(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
  """The original `top_k_top_p_filtering` rule on one row, written with explicit sorting."""
  out = logits.astype(np.float64).copy()
  if top_k > 0:
    out[out < np.sort(out)[::-1][min(top_k, out.size) - 1]] = -np.inf
  if top_p > 0:
    order = np.argsort(-out, kind="stable")
    p = np.exp(out[order] - out[order][0])
    remove = np.cumsum(p / p.sum()) > top_p
    remove[1:], remove[0] = remove[:-1].copy(), False
    out[order[remove]] = -np.inf
  return out


@pytest.mark.parametrize("top_k,top_p", [(0, 0.0), (5, 0.0), (0, 0.3), (0, 0.9), (7, 0.6),
                                         (0, 1.0), (200, 0.0)])
def test_filter_logits_matches_original_rule(top_k, top_p):
  logits = np.asarray(jax.random.normal(jax.random.key(7), (3, 97))) * 2.0
  ours = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
  for row, got in zip(logits, ours):
    want = _reference_filter(row, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[~np.isinf(got)], row[~np.isinf(want)], rtol=0, atol=0)


class _CountingOptimus(Optimus):
  traces: ClassVar[list] = []

  def extend(self, *args):
    _CountingOptimus.traces.append(args[0].shape)  # runs once per trace, not per step
    return super().extend(*args)


def test_compiles_once_per_batch_and_length(tiny):
  _, params, z = tiny
  model = _CountingOptimus(TINY)
  kw = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD)
  settings = [dict(greedy=True), dict(temperature=0.7, top_k=5), dict(top_p=0.5, eos_id=3)]
  for i, s in enumerate(settings):
    out = generate(model, params, z, jax.random.key(i), max_length=6, **{**kw, **s})
    assert out.ids.shape == (2, 6)
  assert len(_CountingOptimus.traces) == 1
  generate(model, params, z, jax.random.key(0), max_length=5, **kw)
  generate(model, params, z[:1], jax.random.key(0), max_length=5, **kw)
  assert len(_CountingOptimus.traces) == 3


def test_bad_input_raises(tiny):
  model, params, z = tiny
  apply = lambda *a, method: model.apply({"params": params}, *a, method=method)
  ok_ids = jnp.ones((2, 3), jnp.int32)
  with pytest.raises(ValueError, match=r"latent z must be \[2, 8\]"):
    apply(ok_ids, z[:, :5], method=Optimus.decode_logits)
  with pytest.raises(ValueError, match="empty token ids"):
    apply(jnp.zeros((2, 0), jnp.int32), method=Optimus.encode)
  with pytest.raises(ValueError, match="empty token ids"):
    apply(jnp.zeros((2, 0), jnp.int32), z, method=Optimus.decode_logits)
  with pytest.raises(ValueError, match="13 tokens exceed the model's 12 positions"):
    apply(jnp.ones((2, 13), jnp.int32), method=Optimus.encode)
  with pytest.raises(ValueError, match="16 tokens exceed the model's 15 positions"):
    apply(jnp.ones((2, 16), jnp.int32), z, method=Optimus.decode_logits)
  with pytest.raises(ValueError, match=r"must be \[batch, tokens\]"):
    apply(jnp.ones((3,), jnp.int32), method=Optimus.encode)
  with pytest.raises(ValueError, match="must be integers"):
    apply(jnp.ones((2, 3)), method=Optimus.encode)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r"latent z must be \[batch, 8\]"):
    generate(model, params, z[:, :5], key)
  with pytest.raises(ValueError, match="max_length must be in"):
    generate(model, params, z, key, max_length=17)
  with pytest.raises(ValueError, match="temperature must be positive"):
    generate(model, params, z, key, max_length=N, temperature=0.0)
  with pytest.raises(ValueError, match="top_p must be in"):
    generate(model, params, z, key, max_length=N, top_p=1.5)
  with pytest.raises(ValueError, match="bos_id 50258 is outside"):
    generate(model, params, z, key, max_length=N)
  with pytest.raises(ValueError, match="n_positions must be positive"):
    GPT2Config(n_positions=0)
  with pytest.raises(ValueError, match="not divisible by 5 heads"):
    BertConfig(num_heads=5)

