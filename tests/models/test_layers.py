"""Building blocks against their definitions in the original code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.models.layers import GroupNorm, timestep_embedding
from codi_jax.models.temporal import (ContinuousPositionBias, FrameShiftBlock, _chunk_sizes,
                                      _shift_frames)


def test_timestep_embedding_is_cos_then_sin():
  t = jnp.array([0, 10, 999])
  emb = np.asarray(timestep_embedding(t, 8))
  freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
  args = np.array([0, 10, 999])[:, None] * freqs
  np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], -1), rtol=1e-5,
                             atol=1e-5)
  assert timestep_embedding(t, 7).shape == (3, 7)  # odd width: zero-padded


def test_group_norm_matches_definition():
  x = np.random.default_rng(0).normal(size=(2, 3, 5, 64)).astype(np.float32)
  gn = GroupNorm(epsilon=1e-5)
  params = gn.init(jax.random.key(0), x)
  out = np.asarray(gn.apply(params, x))
  g = x.reshape(2, 15, 32, 2)
  ref = (g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(g.var(axis=(1, 3), keepdims=True) + 1e-5)
  np.testing.assert_allclose(out, ref.reshape(x.shape), atol=1e-5)
  with pytest.raises(ValueError, match="not divisible into 32 groups"):
    gn.init(jax.random.key(0), np.zeros((1, 4, 4, 48), np.float32))


def test_torch_chunk_sizes():
  assert _chunk_sizes(853, 2) == [427, 426]
  assert _chunk_sizes(64, 8) == [8] * 8
  assert _chunk_sizes(12, 8) == [2] * 6  # fewer chunks than asked, like torch.chunk


def test_frame_shift_delays_channel_group_k_by_k_frames():
  x = jnp.arange(1, 5, dtype=jnp.float32)[None, :, None]  # [B=1, F=4, C=1]
  np.testing.assert_array_equal(_shift_frames(x, 0)[0, :, 0], [1, 2, 3, 4])
  np.testing.assert_array_equal(_shift_frames(x, 1)[0, :, 0], [0, 1, 2, 3])
  np.testing.assert_array_equal(_shift_frames(x, 9)[0, :, 0], [0, 0, 0, 0])
  block = FrameShiftBlock(num_frames=4)
  h = jnp.ones((4, 2, 2, 32))  # [B*F, H, W, C] with B=1
  params = block.init(jax.random.key(0), h)
  # Zero-initialised conv: the block starts as the identity, like the original's zero_module.
  np.testing.assert_array_equal(block.apply(params, h), h)


def test_relative_position_bias_shape_and_antisymmetric_input():
  cpb = ContinuousPositionBias(width=8)
  params = cpb.init(jax.random.key(0), 5)
  bias = cpb.apply(params, 5)
  assert bias.shape == (8, 5, 5)
