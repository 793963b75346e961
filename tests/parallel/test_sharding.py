"""Meshes, logical->mesh rules, full-size parameter shardings (no memory), sharded tiny forward."""

import math

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from codi_jax.conditioning import mix_conditions
from codi_jax.convert.layout import to_channels_last
from codi_jax.modality import Modality
from codi_jax.models.codi import CoDiUNet, codi_config_from_dict, param_shapes
from codi_jax.parallel.mesh import create_mesh, resolve_sizes
from codi_jax.parallel.sharding import logical_shardings, logical_to_spec, place_batch
from configs.codi import SHARDING_RULES, get_config


def test_resolve_sizes_fills_one_axis():
  assert resolve_sizes({"data": -1, "fsdp": 4}, 8) == (2, 4, 1, 1)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    resolve_sizes({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="do not divide"):
    resolve_sizes({"data": -1, "fsdp": 3}, 8)
  with pytest.raises(ValueError, match="unknown axes"):
    resolve_sizes({"model": 2}, 8)


def test_mesh_axes_are_auto():
  mesh = create_mesh({"data": 2, "fsdp": -1})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
  assert all(t == AxisType.Auto for t in mesh.axis_types)


def test_rules_fall_back_when_not_divisible():
  mesh = create_mesh({"fsdp": 8, "data": 1})
  # 1706 does not divide by 8: the output dim stays replicated, the input dim takes fsdp.
  assert logical_to_spec(("embed_in", "embed"), (320, 1706), SHARDING_RULES, mesh) == \
      PartitionSpec("fsdp", None)
  assert logical_to_spec(("embed_in", "embed"), (320, 640), SHARDING_RULES, mesh) == \
      PartitionSpec(None, "fsdp")
  assert logical_to_spec(("norm",), (320,), SHARDING_RULES, mesh) == PartitionSpec(None)


def test_full_size_kernels_over_1mib_are_sharded_on_fsdp_mesh():
  mesh = create_mesh({"fsdp": 8, "data": 1})
  abstract = param_shapes(codi_config_from_dict(get_config("full").model))
  shardings = logical_shardings(abstract, mesh, SHARDING_RULES)
  boxes = jax.tree_util.tree_leaves(
      abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  leaves = jax.tree_util.tree_leaves(shardings)
  assert len(boxes) == len(leaves) > 3000
  big = 0
  for box, sharding in zip(boxes, leaves):
    assert isinstance(box, nn.LogicallyPartitioned)  # every parameter has logical axis names
    assert len(box.names) == box.value.ndim
    nbytes = math.prod(box.value.shape) * 4
    if nbytes > 2 ** 20:
      big += 1
      assert any(s is not None for s in sharding.spec), (box.names, box.value.shape)
      shard = sharding.shard_shape(box.value.shape)
      assert math.prod(shard) * 8 == math.prod(box.value.shape)
  assert big > 500


def test_sharded_joint_forward_equals_single_device(tiny_model, unet_fixture):
  config, params = tiny_model
  fx = unet_fixture
  case = fx.config["cases"]["joint_video_text_audio"]
  x = {Modality.parse(m): to_channels_last(m, fx.inputs[n]) for m, n in
       zip(case["xtype"], case["x_inputs"])}
  t = fx.inputs["timesteps"]
  ctx = np.asarray(mix_conditions({c: fx.inputs[n] for c, n in
                                   zip(case["condition_types"], case["condition"])},
                                  case["mix_weight"]))
  # Batch 8 so that it splits over data x fsdp = 2 x 4.
  tile = lambda a: np.concatenate([a] * 4)
  x, t, ctx = {m: tile(v) for m, v in x.items()}, tile(t), tile(ctx)
  model = CoDiUNet(config)
  reference = jax.jit(model.apply)({"params": params}, x, t, ctx)

  mesh = create_mesh({"data": 2, "fsdp": 4})
  rules = SHARDING_RULES
  shardings = logical_shardings(param_shapes(config), mesh, rules)
  sharded_params = jax.device_put(params, shardings)
  assert any(len(p.sharding.device_set) == 8 and not p.sharding.is_fully_replicated
             for p in jax.tree_util.tree_leaves(sharded_params))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    batch = place_batch((x, t, ctx), mesh, rules)
    assert batch[1].sharding.spec == PartitionSpec(("data", "fsdp"))
    out = jax.jit(model.apply)({"params": sharded_params}, *batch)
  for m in reference:
    np.testing.assert_allclose(np.asarray(out[m]), np.asarray(reference[m]), atol=2e-5, rtol=0)
