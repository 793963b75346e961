"""Parity handler for `clip.npz`: CoDi's FrozenCLIP text and vision (image and video) encoders.

Builds `CLIPModel` and the preprocessing from the fixture's own `clip_config` and
`processor_config`, loads its weights (keys under `model.`) through `keymap.CLIP`, and recomputes
every stored output plus the token ids of `meta/tokenizer_texts` with the real CLIP vocabulary.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.convert import keymap
from codi_jax.models.clip import CLIPModel, clip_config_from_original, param_shapes
from codi_jax.models.clip_preprocess import preprocess, preprocess_config_from_original
from codi_jax.parity.diffusion import Produced
from codi_jax.parity.fixtures import Fixture
from codi_jax.text import CLIPTokenizer

# fp32 encoders: ~1e-4 (fixture README); pixel values are exact up to float rounding (one uint8
# level is 1.5e-2 after normalisation); token ids are exact.
CLIP_TOL = (1e-4, 1e-4)
PIXEL_TOL = (1e-5, 1e-5)
IDS_TOL = (0.0, 0.0)
CLIP_VOCAB = "clip_bpe_simple_vocab_16e6.txt.gz"


def _tokenizer_ids(fx: Fixture) -> np.ndarray:
  """`meta/tokenizer_texts` through our CLIP tokenizer (the real vocabulary, padded to 77)."""
  tokenizer = CLIPTokenizer.from_file(fx.vocab_file(CLIP_VOCAB))
  return np.asarray(tokenizer.encode_batch(fx.meta["tokenizer_texts"]))


def clip_outputs(fx: Fixture) -> Produced:
  """Every `output/*` of `clip.npz` and the recomputed `input/tokenizer_ids_full_vocab`."""
  config = clip_config_from_original(fx.config["clip_config"])
  pre = preprocess_config_from_original(fx.config["processor_config"])
  params, report = keymap.CLIP.to_flax(fx.weights, param_shapes(config), prefix="model.")
  report.check()
  variables = {"params": jax.tree_util.tree_map(jnp.asarray, params)}
  model = CLIPModel(config)
  apply = jax.jit(model.apply, static_argnames="method")
  run = lambda method, x: apply(variables, x, method=method)

  produced: Produced = {}
  ids = jnp.asarray(fx.inputs["token_ids"])
  text = run(CLIPModel.text, ids)
  produced["text_last_hidden_state"] = (np.asarray(text.last_hidden_state), CLIP_TOL)
  produced["text_pooler_output"] = (np.asarray(text.pooler_output), CLIP_TOL)
  produced["encode_text"] = (np.asarray(run(CLIPModel.encode_text, ids)), CLIP_TOL)

  image = einops.rearrange(fx.inputs["image"], "b c h w -> b h w c")
  video = einops.rearrange(fx.inputs["video"], "b c f h w -> b f h w c")
  pixels = {"image": preprocess(image, pre), "video": preprocess(video, pre)}
  produced["pixel_values_image"] = (
      einops.rearrange(pixels["image"], "b h w c -> b c h w"), PIXEL_TOL)
  produced["pixel_values_video"] = (
      einops.rearrange(pixels["video"], "b f h w c -> (b f) c h w"), PIXEL_TOL)
  for name, px in pixels.items():
    out = run(CLIPModel.vision, jnp.asarray(px))
    suffix = "_framemean" if name == "video" else ""
    produced[f"vision_{name}_last_hidden_state{suffix}"] = (np.asarray(out.last_hidden_state),
                                                            CLIP_TOL)
    produced[f"vision_{name}_pooler_output"] = (np.asarray(out.pooler_output), CLIP_TOL)
    produced[f"encode_vision_{name}"] = (np.asarray(run(CLIPModel.encode_vision, jnp.asarray(px))),
                                         CLIP_TOL)
  zeros = preprocess(np.zeros_like(image), pre)  # the unconditional (all-zero) image prompt
  produced["encode_vision_zeros_image"] = (
      np.asarray(run(CLIPModel.encode_vision, jnp.asarray(zeros))), CLIP_TOL)

  produced["input/tokenizer_ids_full_vocab"] = (_tokenizer_ids(fx), IDS_TOL)
  return produced
