"""The audio quality measurements (`codi_jax.quality.audio`) with stand-in transforms: the true
wave scores 1.0, silence reads nothing, and a wrong pitch is caught."""

import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.data import synthetic as syn
from codi_jax.quality import audio as qa


@pytest.fixture(scope="module")
def examples():
  config = syn.SyntheticConfig(audio_seconds=0.625)
  return [syn.generate(config, "test", i) for i in range(6)]


def test_identity_scores_one(examples):
  scores = qa.measure(lambda wave: wave, examples, batch=4)  # 6 clips: one padded batch
  assert scores == {"pitch": 1.0, "timbre": 1.0, "rhythm": 1.0, "readable": 1.0}


def test_silence_is_unreadable(examples):
  scores = qa.measure(lambda wave: jnp.zeros_like(wave), examples, batch=4)
  assert scores == {"pitch": 0.0, "timbre": 0.0, "rhythm": 0.0, "readable": 0.0}


def test_a_fixed_tone_scores_the_examples_that_share_it(examples):
  assert qa.measure(lambda wave: 0.5 * wave, examples)["pitch"] == 1.0  # level does not matter
  t = jnp.arange(10000) / 16000
  a3_sine = lambda wave: jnp.broadcast_to(0.3 * jnp.sin(2 * jnp.pi * 220.0 * t), wave.shape)
  scores = qa.measure(a3_sine, examples)
  truth = [e.attributes.as_dict() for e in examples]
  assert scores["readable"] == 1.0
  assert scores["pitch"] == np.mean([a["pitch"] == syn.Pitch.A3.value for a in truth])
  assert scores["timbre"] == np.mean([a["timbre"] == syn.Timbre.SINE.value for a in truth])
  assert scores["rhythm"] == np.mean([a["rhythm"] == syn.Rhythm.STEADY.value for a in truth])
  assert scores["pitch"] < 1.0


def test_score_checks_lengths(examples):
  with pytest.raises(ValueError, match="score"):
    qa.score([np.zeros(8000, np.float32)], [])
  with pytest.raises(ValueError, match="run_transform"):
    qa.run_transform(lambda w: w, np.zeros((0, 100)))

