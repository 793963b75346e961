"""Full-size parameter counts and the key map against the original's full state-dict manifest."""

import json

import flax.core.meta
import flax.traverse_util
import pytest

from codi_jax import param_report
from codi_jax.convert import keymap
from codi_jax.models.codi import codi_config_from_dict, param_shapes
from configs.codi import get_config


@pytest.fixture(scope="module")
def manifest(fixtures_dir):
  return json.loads((fixtures_dir / "manifest_full.json").read_text())


@pytest.fixture(scope="module")
def full_config():
  return codi_config_from_dict(get_config("full").model)


def test_full_counts_equal_manifest(manifest, full_config):
  report = param_report.diffuser_report(full_config)
  for section in ("parameter_counts_per_component", "unet_parameter_counts_main_vs_cross_modal"):
    for name, ours in report[section].items():
      assert ours == manifest[section][name], name
  assert set(report["parameter_counts_per_component"]) == {"unet_image_video", "unet_text",
                                                           "unet_audio"}


def test_full_keys_and_shapes_equal_manifest(manifest, full_config):
  """Every original UNet key maps to exactly one of our parameters, with the right shape."""
  ours = flax.traverse_util.flatten_dict(flax.core.meta.unbox(param_shapes(full_config)))
  prefix = "model.diffusion_model."
  mapped = {keymap.torch_key(path, prefix): keymap.torch_shape(path, leaf.shape)
            for path, leaf in ours.items()}
  expected = {}
  for component in ("unet_image_video", "unet_text", "unet_audio"):
    for key, info in manifest["components"][component].items():
      if info.get("kind", "parameter") == "parameter":
        expected[key] = tuple(info["shape"])
  assert set(mapped) == set(expected)
  assert mapped == expected



@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_other_presets_build(preset):
  report = param_report.diffuser_report(codi_config_from_dict(get_config(preset).model))
  counts = report["parameter_counts_per_component"]
  assert set(counts) == {"unet_image_video", "unet_text", "unet_audio"}
  assert all(v > 0 for v in report["unet_parameter_counts_main_vs_cross_modal"].values())
