"""The key map: exact round trip, and every mismatch reported."""

import numpy as np
import pytest

from codi_jax.convert import keymap
from codi_jax.models.codi import param_shapes


def test_round_trip_is_exact(unet_fixture, tiny_model):
  config, params = tiny_model
  back = keymap.flax_to_torch(params)
  assert set(back) == set(unet_fixture.weights)
  for key, value in unet_fixture.weights.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_examples_of_the_layout_table():
  path = ("unet_image", "input_blocks", "1", "0", "1", "ff", "proj_in", "0", "kernel")
  assert keymap.torch_key(path) == "unet_image.input_blocks.1.0.1.ff.proj_in.0.weight"
  assert keymap.torch_shape(path, (320, 1706)) == (1706, 320, 1, 1, 1)
  assert keymap.torch_shape(("a", "in_layers", "2", "kernel"), (3, 3, 4, 8)) == (8, 4, 3, 3)
  assert keymap.torch_shape(("a", "proj_in", "kernel"), (8, 16)) == (16, 8, 1, 1)
  assert keymap.torch_shape(("a", "ff", "proj_out", "0", "scale"), (9,)) == (9, 1, 1, 1)
  assert keymap.torch_key(("a", "temporal_attn", "norm", "scale")) == "a.temporal_attn.norm.g"


def test_missing_unexpected_and_mismatched_are_reported(unet_fixture, tiny_model):
  config, _ = tiny_model
  state = dict(unet_fixture.weights)
  state.pop("unet_text.out.2.weight")
  state["unet_audio.bogus.weight"] = np.zeros(3, np.float32)
  state["unet_image.time_embed.0.weight"] = np.zeros((5, 5), np.float32)
  _, report = keymap.torch_to_flax(state, param_shapes(config))
  assert report.missing == ["unet_text.out.2.weight"]
  assert report.unexpected == ["unet_audio.bogus.weight"]
  assert len(report.mismatched) == 1 and "time_embed.0.weight" in report.mismatched[0]
  with pytest.raises(KeyError, match="1 missing keys"):
    report.check()
