"""Composable conditioning: normalised weighted sum, clear errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.conditioning import mix_conditions
from codi_jax.modality import Modality


def test_mix_is_normalised_weighted_sum():
  a, b = jnp.full((2, 1, 4), 1.0), jnp.full((2, 1, 4), 5.0)
  out = mix_conditions({"text": a, Modality.AUDIO: b}, {"text": 1, "audio": 3})
  np.testing.assert_allclose(out, np.full((2, 1, 4), (1 + 15) / 4))
  np.testing.assert_allclose(mix_conditions({"image": b}), b)  # one condition: unchanged


@pytest.mark.parametrize("conditions,weights,match", [
    ({"smell": jnp.ones((1, 1, 4))}, None, "unknown modality 'smell'"),
    ({"text": jnp.ones((1, 1, 4))}, {"text": 0}, "sum to 0"),
    ({"text": jnp.ones((1, 1, 4))}, {"text": -1}, "negative"),
    ({"text": jnp.ones((1, 1, 4)), "TEXT": jnp.ones((1, 1, 4))}, None, "repeated"),
    ({"text": jnp.ones((1, 1, 4)), "audio": jnp.ones((1, 2, 4))}, None, "one shape"),
    ({}, None, "at least one"),
])
def test_bad_conditions_raise(conditions, weights, match):
  with pytest.raises(ValueError, match=match):
    mix_conditions(conditions, weights)
