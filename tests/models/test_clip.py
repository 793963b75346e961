"""CLIP text/vision encoders: parity with the original, full-size structure, jit, bad inputs."""

import json
import math

import flax.core.meta
import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import parity
from codi_jax.convert import keymap
from codi_jax.models import clip
from codi_jax.models.clip import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig,
                                  FrozenCLIP, clip_config_from_original, param_shapes)
from codi_jax.models.clip_preprocess import (PreprocessConfig, crop_box, preprocess,
                                             preprocess_config_from_original, resized_shape)
from codi_jax.parallel.mesh import create_mesh
from codi_jax.parallel.sharding import logical_shardings
from codi_jax.parity.fixtures import load_fixture
from configs.codi import SHARDING_RULES

FULL_CLIP_PARAMS = 737_647_217  # manifest_full.json: parameter_counts_per_component.clip


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
  return load_fixture(fixtures_dir / "clip.npz")


@pytest.fixture(scope="module")
def tiny(fixture):
  """(config, preprocess config, params) of the fixture's tiny CLIP."""
  config = clip_config_from_original(fixture.config["clip_config"])
  params, report = keymap.CLIP.to_flax(fixture.weights, param_shapes(config), prefix="model.")
  report.check()
  return (config, preprocess_config_from_original(fixture.config["processor_config"]),
          jax.tree_util.tree_map(jnp.asarray, params))


@pytest.fixture(scope="module")
def manifest(fixtures_dir):
  return json.loads((fixtures_dir / "manifest_full.json").read_text())


@pytest.fixture(scope="module")
def full_shapes():
  return param_shapes(CLIPConfig())


def _images(fixture):
  image = np.moveaxis(fixture.inputs["image"], 1, -1)  # [B, H, W, 3]
  video = np.moveaxis(fixture.inputs["video"], 1, -1)  # [B, F, H, W, 3]
  return image, video


def test_clip_fixture_matches_original(fixtures_dir):
  rows = parity.check_file(fixtures_dir / "clip.npz")
  failed = {k: r for k, r in rows.items() if not r.passed}
  assert not failed, failed
  assert len(rows) == 13 and "input/tokenizer_ids_full_vocab" in rows


def test_config_from_original(fixture):
  config = clip_config_from_original(fixture.config["clip_config"])
  assert config.text == CLIPTextConfig(vocab_size=512, width=32, layers=2, heads=2, mlp_width=64)
  assert (config.vision.image_size, config.vision.patch_size, config.vision.num_positions) == \
      (32, 8, 17)
  assert config.projection_dim == 24 and config.vision.temporal
  bad = dict(fixture.config["clip_config"], text_config={"hidden_size": 32})
  with pytest.raises(ValueError, match="text_config is missing 'vocab_size'"):
    clip_config_from_original(bad)
  with pytest.raises(ValueError, match="not divisible by heads"):
    CLIPVisionConfig(width=30, heads=4)
  with pytest.raises(ValueError, match="unknown"):
    preprocess_config_from_original({"resample": 99})
  with pytest.raises(ValueError, match="crop_size 40 exceeds"):
    PreprocessConfig(size=32, crop_size=40)


def test_full_size_params_and_keys_equal_manifest(manifest, full_shapes):
  flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(full_shapes))
  assert sum(math.prod(v.shape) for v in flat.values()) == FULL_CLIP_PARAMS
  ours = {keymap.CLIP.torch_key(p, "clip.model."): keymap.CLIP.torch_shape(p, v.shape)
          for p, v in flat.items()}
  entries = manifest["components"]["clip"]
  params = {k: tuple(v["shape"]) for k, v in entries.items() if v["kind"] == "parameter"}
  assert ours == params
  buffers = [k for k, v in entries.items() if v["kind"] != "parameter"]
  assert sum(math.prod(entries[k]["shape"]) for k in buffers) == 334
  assert all(keymap.CLIP.is_buffer(k.removeprefix("clip.")) for k in buffers)


def test_full_size_parameters_are_logically_sharded(full_shapes):
  mesh = create_mesh({"fsdp": 8, "data": 1})
  shardings = jax.tree_util.tree_leaves(logical_shardings(full_shapes, mesh, SHARDING_RULES))
  boxes = jax.tree_util.tree_leaves(full_shapes,
                                    is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert len(boxes) == len(shardings) == 950
  for box, sharding in zip(boxes, shardings):
    assert isinstance(box, nn.LogicallyPartitioned) and len(box.names) == box.value.ndim
    if math.prod(box.value.shape) * 4 > 2 ** 20:
      assert "fsdp" in jax.tree_util.tree_leaves(tuple(sharding.spec)), box.names


def test_encoders_compile_once_per_shape_and_match(fixture, tiny, monkeypatch):
  traces = []
  normalize = clip.l2_normalize
  monkeypatch.setattr(clip, "l2_normalize", lambda z: traces.append(z.shape) or normalize(z))
  config, pre, params = tiny
  encoders = FrozenCLIP(config, params, pre)
  image, video = _images(fixture)
  ids = fixture.inputs["token_ids"]

  text = encoders.encode_text(ids)
  encoders.encode_text(ids[::-1])
  np.testing.assert_allclose(text, fixture.outputs["encode_text"], atol=1e-5)
  assert len(traces) == 1
  encoders.encode_text(ids[:1])  # a new batch size compiles once more
  assert len(traces) == 2

  np.testing.assert_allclose(encoders.encode_vision(image), fixture.outputs["encode_vision_image"],
                             atol=1e-5)
  encoders.encode_vision(-image)
  np.testing.assert_allclose(encoders.encode_vision(video), fixture.outputs["encode_vision_video"],
                             atol=1e-5)
  encoders.encode_vision(video[::-1])
  assert len(traces) == 4  # one image and one video program

  for z in (text, encoders.encode_vision(image), encoders.encode_vision(video)):
    assert z.shape == (2, 1, 24)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(z), axis=-1), 1.0, atol=1e-6)


def test_video_without_temporal_layers_is_the_frame_mean(fixture, tiny):
  """Zeroing the temporal blocks' output projections leaves per-frame encoding, then the mean."""
  config, pre, params = tiny
  model = CLIPModel(config)
  vision = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIPModel.vision))
  _, video = _images(fixture)
  pixels = jnp.asarray(preprocess(video, pre))  # [B, F, S, S, 3]

  def zero_temporal(path, v):
    names = "/".join(str(getattr(k, "key", k)) for k in path)
    return jnp.zeros_like(v) if names.endswith(("to_out/kernel", "proj_out/1/kernel")) else v

  plain = jax.tree_util.tree_map_with_path(zero_temporal, params)
  frames = vision(plain, pixels.reshape((-1,) + pixels.shape[2:]))  # frames as images
  mean = frames.last_hidden_state.reshape(pixels.shape[:2] + frames.last_hidden_state.shape[1:])
  np.testing.assert_allclose(vision(plain, pixels).last_hidden_state, mean.mean(axis=1),
                             atol=1e-5)
  # With the real weights the temporal layers matter far beyond the parity tolerance.
  diff = np.abs(vision(params, pixels).last_hidden_state - vision(plain, pixels).last_hidden_state)
  assert diff.max() > 1e-2


def test_one_frame_video_is_an_image(fixture, tiny):
  config, pre, params = tiny
  encoders = FrozenCLIP(config, params, pre)
  image, _ = _images(fixture)
  np.testing.assert_array_equal(encoders.encode_vision(image[:, None]),
                                encoders.encode_vision(image))


def test_preprocess_geometry_and_truncation():
  assert resized_shape(40, 48, 32) == (32, 38)  # int(32 * 48 / 40) = int(38.4)
  assert resized_shape(48, 40, 32) == (38, 32)
  assert resized_shape(32, 50, 32) == (32, 50)  # shortest edge already right: untouched
  assert crop_box(32, 38, 32) == (0, 3) and crop_box(39, 32, 32) == (3, 0)
  cfg = PreprocessConfig(size=4, crop_size=4)
  # 0 -> 0.5 * 255 = 127.5 truncates to 127 (not 128); -1 -> 0; 1 -> 255.
  for value, level in ((0.0, 127), (-1.0, 0), (1.0, 255)):
    out = preprocess(np.full((1, 6, 5, 3), value, np.float32), cfg)
    expected = (level / 255 - np.asarray(cfg.mean)) / np.asarray(cfg.std)
    assert out.shape == (1, 4, 4, 3)
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=1e-6)


@pytest.mark.parametrize("shape, value, match", [
    ((2, 40, 48, 4), 0.0, r"3 \(RGB\) channels"),
    ((40, 48, 3), 0.0, r"images \[B, H, W, 3\] or videos"),
    ((2, 0, 40, 48, 3), 0.0, "empty"),
    ((2, 40, 48, 3), 1.5, r"values in \[-1, 1\]"),
])
def test_bad_images_are_rejected(tiny, shape, value, match):
  config, pre, params = tiny
  with pytest.raises(ValueError, match=match):
    FrozenCLIP(config, params, pre).encode_vision(np.full(shape, value, np.float32))


def test_bad_model_inputs_are_rejected(tiny):
  config, pre, params = tiny
  encoders = FrozenCLIP(config, params, pre)
  model, variables = CLIPModel(config), {"params": params}
  with pytest.raises(ValueError, match=r"token ids must be \[B, T\]"):
    encoders.encode_text(np.zeros((77,), np.int32))
  with pytest.raises(ValueError, match=r"1 <= T <= 77"):
    encoders.encode_text(np.zeros((1, 78), np.int32))
  with pytest.raises(ValueError, match=r"lie in \[0, 512\)"):
    encoders.encode_text(np.full((1, 77), 512, np.int32))
  with pytest.raises(ValueError, match=r"must end in \(32, 32, 3\)"):
    model.apply(variables, jnp.zeros((1, 40, 40, 3)), method=CLIPModel.encode_vision)
  image_only = CLIPConfig(text=config.text, vision=CLIPVisionConfig(
      image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_width=64, temporal=False))
  with pytest.raises(ValueError, match="no temporal layers"):
    CLIPModel(image_only).init(jax.random.key(0), jnp.zeros((1, 77), jnp.int32),
                               jnp.zeros((1, 2, 32, 32, 3)))
  with pytest.raises(ValueError, match="crops to 24"):
    FrozenCLIP(config, params, PreprocessConfig(size=24, crop_size=24))
