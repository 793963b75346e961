"""Parity handler for the Optimus text VAE fixture (`optimus.npz`).

Builds `Optimus` from the fixture's own config, loads its weights through `keymap.OPTIMUS` (the
causal-mask buffers and the tied `lm_head` are recognised, anything else unmatched is an error)
and recomputes, as the fixture's `calls` describe (plus the BERT token ids of `meta/texts`):
  encoder(ids, mask = ids > 0) -> bert_sequence_output, bert_pooled; encoder.linear -> chunk ->
  latent_mu, latent_logvar; mu * text_scale_factor -> codi_optimus_encode;
  decoder([<BOS>] + ctx, past = z) -> gpt2_next_token_logits (last position of each sample) and
  gpt2_logits_seq0 (every position of sample 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.convert import keymap
from codi_jax.models.optimus import Optimus, optimus_config_from_original, param_shapes
from codi_jax.parity.diffusion import Produced
from codi_jax.parity.fixtures import Fixture
from codi_jax.text import BertTokenizer

# Fixture README: encoders ~1e-4; logits over 50k classes get a looser absolute bound.
TOL = (1e-4, 1e-4)
LOGITS_TOL = (1e-3, 1e-4)
IDS_TOL = (0.0, 0.0)
BERT_VOCAB = "bert-base-cased-vocab.txt"


def optimus_outputs(fx: Fixture) -> Produced:
  cfg = fx.config
  config = optimus_config_from_original(cfg["config"]["args"],
                                        scale_factor=float(cfg["text_scale_factor"]))
  params, report = keymap.OPTIMUS.to_flax(fx.weights, param_shapes(config))
  report.check()
  params = jax.tree_util.tree_map(jnp.asarray, params)
  model = Optimus(config)

  # The stored ids are CoDi's tokenisation of `meta/texts`; recompute them with ours.
  tokenizer = BertTokenizer.from_file(fx.vocab_file(BERT_VOCAB))
  token_ids = tokenizer.codi_token_ids(fx.meta["texts"])
  bert_ids = jnp.asarray(fx.inputs["bert_token_ids"])
  encoded = jax.jit(lambda p, ids: model.apply({"params": p}, ids, method=Optimus.encode))(
      params, bert_ids)
  codi = jax.jit(lambda p, ids: model.apply({"params": p}, ids, method=Optimus.codi_encode))(
      params, bert_ids)

  gpt2_ids = jnp.asarray(fx.inputs["gpt2_input_ids"])
  z = jnp.asarray(fx.inputs["gpt2_latent_z"])
  logits = jax.jit(lambda p, ids, z: model.apply({"params": p}, ids, z,
                                                 method=Optimus.decode_logits))(params, gpt2_ids, z)
  logits = np.asarray(logits)  # [B, T, V]
  return {
      "input/bert_token_ids": (token_ids, IDS_TOL),
      "bert_sequence_output": (np.asarray(encoded.sequence), TOL),
      "bert_pooled": (np.asarray(encoded.pooled), TOL),
      "latent_mu": (np.asarray(encoded.mu), TOL),
      "latent_logvar": (np.asarray(encoded.logvar), TOL),
      "codi_optimus_encode": (np.asarray(codi), TOL),
      "gpt2_next_token_logits": (logits[:, -1], LOGITS_TOL),
      "gpt2_logits_seq0": (logits[0], LOGITS_TOL),
  }
