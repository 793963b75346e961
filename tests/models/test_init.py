"""Initialisation: freshly built video layers are the identity on a trained image diffuser.

The `diffuse_video` stage adds CoDi's temporal layers to an image diffuser whose spatial weights
come trained from `diffuse_image`. Each temporal sub-block is a residual branch whose last layer
starts at zero (temporal attention `to_out`, the feed-forward's output conv, the frame-shift
conv), so at initialisation the video path must give, frame by frame, exactly the noise the image
path gives: the stage then starts from the image model instead of from a randomly perturbed one.
Spatial weights are randomised first, so the check cannot pass by every output being zero (the
diffuser's own zero-initialised `out` conv would make both paths return 0).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.modality import Modality
from codi_jax.models.codi import CoDiConfig, CoDiUNet, codi_config_from_dict, init_params
from configs.codi import get_config

FRAMES = 4
# Children of SpatioTemporalAttention, the `1` of each [ResBlock, SpatioTemporalAttention] pair.
TEMPORAL_CHILDREN = ("temporal_attn", "temporal_rel_pos_bias", "ff", "frameshiftblock")
# The zero-initialised last layer of each temporal residual branch.
ZERO_OUTPUTS = (("temporal_attn", "to_out"), ("ff", "proj_out", "1"),
                ("frameshiftblock", "out_layers", "2"))


def _names(path) -> tuple[str, ...]:
  return tuple(getattr(k, "key", str(k)) for k in path)


def _is_temporal(names: tuple[str, ...]) -> bool:
  return any(a == "1" and b in TEMPORAL_CHILDREN for a, b in zip(names, names[1:]))


@pytest.fixture(scope="module")
def image_trained_video_model():
  """(apply, params): the tiny image/video diffuser (jitted `CoDiUNet.apply` taking the params
  first) at init with every spatial leaf randomised, as if trained by `diffuse_image`; the
  temporal leaves keep their initial values."""
  tiny = codi_config_from_dict(get_config("tiny").model)
  config = CoDiConfig(image=tiny.image, text=None, audio=None)
  params = nn.meta.unbox(jax.jit(lambda: init_params(config, jax.random.key(0)))())
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))

  def trained(path, leaf, key):
    names = _names(path)
    if _is_temporal(names):
      return leaf
    noise = jax.random.normal(key, leaf.shape)
    if names[-1] == "kernel":
      return noise / np.sqrt(np.prod(leaf.shape[:-1]))
    return leaf + 0.1 * noise

  assert any(_is_temporal(_names(p)) for p, _ in leaves)
  params = jax.tree_util.tree_unflatten(
      treedef, [trained(p, v, k) for (p, v), k in zip(leaves, keys)])
  model = CoDiUNet(config)
  return jax.jit(lambda p, x, tt, c: model.apply({"params": p}, x, tt, c)), params


def _inputs(static: bool):
  rng = np.random.default_rng(0)
  frames = rng.normal(size=(2, 1 if static else FRAMES, 8, 8, 4)).astype(np.float32)
  clip = np.broadcast_to(frames, (2, FRAMES, 8, 8, 4)) if static else frames
  return (jnp.asarray(clip), jnp.array([10, 700]),
          jnp.asarray(rng.normal(size=(2, 3, 32)).astype(np.float32)))


@pytest.mark.parametrize("static", [True, False], ids=["static", "moving"])
def test_video_layers_start_as_identity(image_trained_video_model, static):
  """Per frame, video eps == image eps at init (to 1e-5; fails with a non-zero temporal output).

  Holds for any clip, static or moving: every temporal branch adds exactly zero."""
  apply, params = image_trained_video_model
  clip, t, ctx = _inputs(static)
  video = apply(params, {Modality.VIDEO: clip}, t, ctx)[Modality.VIDEO]  # [B, F, H, W, C]
  per_frame = lambda a: jnp.repeat(a, FRAMES, axis=0)  # every frame as its own image
  image = apply(params, {Modality.IMAGE: clip.reshape(-1, *clip.shape[2:])}, per_frame(t),
                per_frame(ctx))[Modality.IMAGE]  # [B*F, H, W, C]
  assert float(jnp.std(image)) > 0.1  # the randomised spatial weights give a real output
  np.testing.assert_allclose(np.asarray(video).reshape(image.shape), np.asarray(image),
                             atol=1e-5, rtol=1e-5)


def test_temporal_layers_still_learn_from_identity(image_trained_video_model):
  """The zero-initialised outputs get a gradient at once (the layers before them a step later)."""
  apply, params = image_trained_video_model
  clip, t, ctx = _inputs(static=False)

  def loss(p):
    eps = apply(p, {Modality.VIDEO: clip}, t, ctx)[Modality.VIDEO]
    return jnp.mean(jnp.square(eps - 1.0))

  grads = jax.jit(jax.grad(loss))(params)
  checked = 0
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    names = _names(path)
    if "connecters_out" in names:  # the environment encoder runs only in joint calls
      continue
    if names[-1] == "kernel" and _is_temporal(names) and any(
        names[-len(z) - 1:-1] == z for z in ZERO_OUTPUTS):
      checked += 1
      assert float(jnp.abs(g).max()) > 0, names
  assert checked == 3 * 8  # 3 outputs in each pair: 2 input blocks, 2 middle, 4 output blocks
