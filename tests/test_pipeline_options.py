"""The options where the pipeline may differ from the original's inference
(`codi_jax.pipeline_options`)."""

import numpy as np
import pytest
from PIL import Image

from codi_jax.pipeline_options import (ORIGINAL, OURS, PipelineOptions, PixelQuantization,
                                       quantize_pixels, regularize_image)
from configs.codi import get_config


def test_presets_choose_the_originals_behaviour_for_full_only():
  assert PipelineOptions.from_config(get_config("full").sample) == ORIGINAL
  for preset in ("tiny", "small"):
    assert PipelineOptions.from_config(get_config(preset).sample) == OURS
  assert PipelineOptions.from_config({}) == OURS  # a config from before the fields existed
  assert ORIGINAL == PipelineOptions("truncate", False, 512, True)


def test_truncation_and_rounding_differ_at_half_levels():
  # (x + 1) / 2 * 255 = 100.7 and 100.99: the original truncates both to 100.
  x = np.asarray([100.7, 100.99, 0.0, 255.0, -7.0, 300.0], np.float32) / 255 * 2 - 1
  np.testing.assert_array_equal(quantize_pixels(x, PixelQuantization.TRUNCATE),
                                [100, 100, 0, 255, 0, 255])
  np.testing.assert_array_equal(quantize_pixels(x, PixelQuantization.ROUND),
                                [101, 101, 0, 255, 0, 255])


@pytest.mark.parametrize("fields, match", [
    (dict(pixel_quantization="nearest"), "'nearest' is not a valid PixelQuantization"),
    (dict(trim_audio="yes"), "trim_audio must be true or false"),
    (dict(image_prompt_size=-1), "image_prompt_size must be a non-negative integer"),
    (dict(image_prompt_flip=True), "image_prompt_flip needs image_prompt_size > 0"),
])
def test_bad_options_raise(fields, match):
  with pytest.raises(ValueError, match=match):
    PipelineOptions.from_config(fields)


def test_regularize_image_is_the_originals_transform():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (30, 42, 3), dtype=np.uint8)
  x = regularize_image(image, 64, flip=False, offset=5)
  # PIL bicubic of the 30 x 30 window at column 5, then ToTensor and * 2 - 1 in float32.
  want = np.asarray(Image.fromarray(image[:, 5:35]).resize((64, 64), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(x, want.astype(np.float32) / np.float32(255) * 2 - 1)
  np.testing.assert_array_equal(regularize_image(image, 64, flip=True, offset=5), x[:, ::-1])
  with pytest.raises(ValueError, match=r"crop offset 13 is outside \[0, 12\]"):
    regularize_image(image, 64, flip=False, offset=13)
