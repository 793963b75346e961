"""Text round trip of the Optimus text VAE: caption -> latent -> deterministic decode -> analysed.

Each caption goes the way the text diffuser sees it: lower-cased BERT ids (`train.data.bert_ids`)
-> the encoder's posterior mean, normalised exactly as the diffusion target
(`Optimus.codi_encode`) -> back through `optimus_decode.codi_generate` with greedy (argmax)
decoding, up to `config.data.gpt2_length` tokens (<BOS> and <EOS> included, as in training). The
decoded text (special tokens dropped, outer spaces stripped, no further clean-up) is read by
`analyzers.analyze_text`; an empty or unreadable decode counts as wrong on every attribute.

  text_round_trip(config, params, tokenizers, examples) -> {"colour": acc, ..., "exact": rate}
  checks(ctx) -> {"text/<attr>": Check, "text/exact": Check}   (for `codi_jax.quality.checks`)

`exact` is the share of decodes equal to the caption character for character.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from codi_jax import components
from codi_jax.data import analyzers
from codi_jax.data import synthetic as syn
from codi_jax.modality import Modality
from codi_jax.models import optimus, optimus_decode
from codi_jax.train import data as train_data

PyTree = Any
TEXT_ATTRIBUTES: tuple[str, ...] = tuple(analyzers.ATTRIBUTES_BY_MODALITY[Modality.TEXT])
ROUND_TRIP_BAR = 0.95
BATCH = 16  # captions per compiled call (the last batch is padded)


def score_captions(decoded: Sequence[str], examples: Sequence[syn.SyntheticExample]
                   ) -> dict[str, float]:
  """Per text attribute, the share of `decoded` texts the analyzer reads as the example's true
  value; `exact`, the share equal to the example's caption."""
  if len(decoded) != len(examples) or not examples:
    raise ValueError(f"score_captions: {len(decoded)} decoded texts for {len(examples)} examples "
                     "(need as many, at least one)")
  hits = {name: 0 for name in TEXT_ATTRIBUTES}
  exact = 0
  for text, example in zip(decoded, examples):
    exact += text == example.text
    try:
      analysis = analyzers.analyze_text(text)
    except ValueError:  # empty text: nothing read
      continue
    for name, ok in analyzers.attribute_accuracy(analysis, example.attributes,
                                                 TEXT_ATTRIBUTES).items():
      hits[name] += ok
  out = {name: hits[name] / len(examples) for name in TEXT_ATTRIBUTES}
  out["exact"] = exact / len(examples)
  return out


def round_trip_captions(model: optimus.Optimus, params: PyTree, tokenizers: train_data.Tokenizers,
                        captions: Sequence[str], *, bert_length: int, max_length: int,
                        batch_size: int = BATCH) -> list[str]:
  """Each caption -> BERT -> diffusion latent (`codi_encode`) -> greedy `codi_generate` -> text."""
  params = nn.meta.unbox(params)
  encode = jax.jit(lambda p, ids: model.apply({"params": p}, ids,
                                              method=optimus.Optimus.codi_encode))
  out = []
  for start in range(0, len(captions), batch_size):
    chunk = list(captions[start:start + batch_size])
    padded = chunk + chunk[:1] * (batch_size - len(chunk))
    z = encode(params, jnp.asarray(train_data.bert_ids(tokenizers.bert, padded, bert_length)))
    gen = optimus_decode.codi_generate(model, params, z, jax.random.key(0),
                                       max_length=max_length, greedy=True)
    ids, lengths = np.asarray(gen.ids), np.asarray(gen.lengths)
    out += [tokenizers.gpt2.decode(ids[i, 1:lengths[i]].tolist(), skip_special_tokens=True).strip()
            for i in range(len(chunk))]
  return out


def text_round_trip(config: ml_collections.ConfigDict, params: PyTree,
                    tokenizers: train_data.Tokenizers,
                    examples: Sequence[syn.SyntheticExample], *, batch_size: int = BATCH
                    ) -> dict[str, float]:
  """The round trip of `examples`' captions through the Optimus of `config.model` with
  parameters `params` (the `optimus` part's tree): {attribute: accuracy, "exact": rate}."""
  model = optimus.Optimus(components.optimus_config(config.model))
  decoded = round_trip_captions(model, params, tokenizers, [e.text for e in examples],
                                bert_length=config.data.bert_length,
                                max_length=config.data.gpt2_length, batch_size=batch_size)
  return score_captions(decoded, examples)


def checks(ctx) -> dict[str, Any]:
  """`text/<attribute>` (bar ROUND_TRIP_BAR) and `text/exact` (reported; bar 0) on ctx.test."""
  from codi_jax.quality.checks import Check  # pylint: disable=import-outside-toplevel
  scores = text_round_trip(ctx.config, ctx.params["optimus"], ctx.tokenizers, ctx.test)
  return {f"text/{name}": Check(value, 0.0 if name == "exact" else ROUND_TRIP_BAR)
          for name, value in scores.items()}
