"""The text round-trip check (`codi_jax.quality.text`): a decoder that returns each caption scores
1.0 everywhere, one that returns filler scores 0, and a real (untrained) Optimus runs end to end."""

import jax
import jax.numpy as jnp
import pytest

from codi_jax.data import synthetic as syn
from codi_jax.models import optimus
from codi_jax.models.optimus_decode import Generated
from codi_jax.quality import text
from codi_jax.train import data as train_data
from configs.codi import get_config

N = 5  # not a multiple of the batch below: the last batch is padded


@pytest.fixture(scope="module")
def setup():
  config = get_config("tiny")
  examples = [syn.generate(syn.SyntheticConfig(), "test", i) for i in range(N)]
  params = optimus.init_params(text.components.optimus_config(config.model), jax.random.key(0))
  return config, params, train_data.load_tokenizers(""), examples


def _fake_generate(tokenizers, texts, length):
  """A stand-in `codi_generate` that returns the ids of `texts`, batch after batch."""
  queue = list(texts)

  def generate(model, params, z, rng, *, max_length, greedy):
    assert greedy and max_length == length
    batch = [queue.pop(0) if queue else "padding" for _ in range(z.shape[0])]
    ids = train_data.gpt2_ids(tokenizers.gpt2, batch, max_length)
    lengths = (ids != optimus.PAD_ID).sum(axis=1)
    return Generated(jnp.asarray(ids), jnp.asarray(lengths))
  return generate


def test_a_decoder_returning_the_caption_scores_one(setup, monkeypatch):
  config, params, tokenizers, examples = setup
  monkeypatch.setattr(text.optimus_decode, "codi_generate",
                      _fake_generate(tokenizers, [e.text for e in examples],
                                     config.data.gpt2_length))
  scores = text.text_round_trip(config, params, tokenizers, examples, batch_size=4)
  assert set(scores) == set(text.TEXT_ATTRIBUTES) | {"exact"} and len(text.TEXT_ATTRIBUTES) == 8
  assert all(v == 1.0 for v in scores.values()), scores


def test_a_decoder_returning_filler_scores_zero(setup, monkeypatch):
  config, params, tokenizers, examples = setup
  monkeypatch.setattr(text.optimus_decode, "codi_generate",
                      _fake_generate(tokenizers, ["the the the"] * N, config.data.gpt2_length))
  scores = text.text_round_trip(config, params, tokenizers, examples, batch_size=4)
  assert all(v == 0.0 for v in scores.values()), scores


def test_scores_count_wrong_and_empty_texts():
  examples = [syn.generate(syn.SyntheticConfig(), "test", i) for i in range(4)]
  attrs = examples[0].attributes
  swapped = examples[0].text.replace(attrs.size.value, "large" if attrs.size.value == "small"
                                     else "small")
  scores = text.score_captions([examples[0].text, "", "the the", examples[3].text.lower()],
                               [examples[0], examples[1], examples[2], examples[3]])
  assert scores["exact"] == 0.25  # case matters for the exact rate
  assert scores["colour"] == 0.5  # the lower-cased caption still reads right
  with pytest.raises(ValueError, match="decoded texts"):
    text.score_captions([swapped], examples)


def test_an_untrained_optimus_runs_end_to_end(setup):
  config, params, tokenizers, examples = setup
  scores = text.text_round_trip(config, params, tokenizers, examples[:2])
  assert scores["exact"] == 0.0
  assert all(0.0 <= v <= 1.0 for v in scores.values())
