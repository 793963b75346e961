"""Full-size parameter counts and the key map against the original's full state-dict manifest."""

import json

import flax.core.meta
import flax.traverse_util
import pytest

from codi_jax import components, param_report
from codi_jax.convert import keymap
from codi_jax.models.codi import codi_config_from_dict, param_shapes
from configs.codi import get_config


@pytest.fixture(scope="module")
def manifest(fixtures_dir):
  return json.loads((fixtures_dir / "manifest_full.json").read_text())


@pytest.fixture(scope="module")
def full_config():
  return codi_config_from_dict(get_config("full").model)


def test_full_counts_equal_manifest(manifest):
  report = param_report.model_report(get_config("full").model)
  for section in ("parameter_counts_per_component", "unet_parameter_counts_main_vs_cross_modal"):
    for name, ours in report[section].items():
      assert ours == manifest[section][name], name
  assert set(report["parameter_counts_per_component"]) == set(
      manifest["parameter_counts_per_component"])
  assert report["total_parameters"] == manifest["total_parameters"]


@pytest.mark.parametrize("name", [c.name for c in components.COMPONENTS])
def test_full_component_keys_and_shapes_equal_manifest(manifest, name):
  """Every original key of the part maps to exactly one of our variables, with its shape, or is
  a buffer we recompute (causal masks, STFT bases, index tables, tied weights)."""
  c = components.component(name)
  typed = c.config(get_config("full").model)
  expected = {k: tuple(v["shape"]) for k, v in manifest["components"][name].items()
              if not c.keymap.is_buffer(k[len(c.prefix):])}
  for tree in (c.param_shapes(typed), c.state_shapes(typed)):
    flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(tree))
    for path, leaf in flat.items():
      key = c.keymap.torch_key(path, c.prefix)
      assert expected.pop(key) == c.keymap.torch_shape(path, leaf.shape), key
  assert not expected


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
  report = param_report.model_report(get_config(preset).model)
  counts = report["parameter_counts_per_component"]
  assert set(counts) == {"unet_image_video", "unet_text", "unet_audio"} | {
      c.name for c in components.COMPONENTS}
  assert all(v > 0 for v in counts.values())
  assert all(v > 0 for v in report["unet_parameter_counts_main_vs_cross_modal"].values())
