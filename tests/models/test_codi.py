"""The joint model: alignment modes, single vs joint paths, input validation."""

import jax.numpy as jnp
import pytest

from codi_jax.convert.layout import to_channels_last
from codi_jax.modality import Alignment, Modality
from codi_jax.models.codi import CoDiConfig, CoDiUNet
from codi_jax.models.unet import UNetConfig


@pytest.fixture(scope="module")
def inputs(unet_fixture):
  fx = unet_fixture
  return ({Modality.IMAGE: jnp.asarray(to_channels_last("image", fx.inputs["x_image"])),
           Modality.AUDIO: jnp.asarray(to_channels_last("audio", fx.inputs["x_audio"]))},
          jnp.asarray(fx.inputs["timesteps"]), jnp.asarray(fx.inputs["ctx_text"]))


def _image_out(config, params, latents, t, ctx):
  return CoDiUNet(config).apply({"params": params}, latents, t, ctx)[Modality.IMAGE]


@pytest.mark.parametrize("alignment,crosses", [(Alignment.SELF, False), (Alignment.OTHERS, True)])
def test_alignment_decides_whether_information_crosses(tiny_model, inputs, alignment, crosses):
  config, params = tiny_model
  config = CoDiConfig(config.image, config.text, config.audio, alignment=alignment)
  latents, t, ctx = inputs
  base = _image_out(config, params, latents, t, ctx)
  other = dict(latents)
  other[Modality.AUDIO] = latents[Modality.AUDIO] + 1.0
  changed = float(jnp.abs(_image_out(config, params, other, t, ctx) - base).max())
  if crosses:
    assert changed > 1e-3
  else:
    assert changed == 0.0  # the released code: the audio latent cannot reach the image output
  single = _image_out(config, params, {Modality.IMAGE: latents[Modality.IMAGE]}, t, ctx)
  assert float(jnp.abs(single - base).max()) > 1e-2  # the joint path uses the connectors


def test_bad_inputs_raise_clear_errors(tiny_model, inputs):
  config, params = tiny_model
  latents, t, ctx = inputs
  model = CoDiUNet(config)
  apply = lambda x, tt=t, c=ctx: model.apply({"params": params}, x, tt, c)
  img = latents[Modality.IMAGE]
  with pytest.raises(ValueError, match="unknown modality 'smell'"):
    apply({"smell": img})
  with pytest.raises(ValueError, match="video latent must have 5 dims"):
    apply({"video": img})
  with pytest.raises(ValueError, match="at least one output"):
    apply({})
  with pytest.raises(ValueError, match="expects 4"):
    apply({"image": img[..., :3]})
  with pytest.raises(ValueError, match="batch size"):
    apply({"image": img, "audio": latents[Modality.AUDIO][:1]})
  with pytest.raises(ValueError, match="timesteps must have shape"):
    apply({"image": img}, tt=t[:1])


def test_config_validation():
  with pytest.raises(ValueError, match="num_res_blocks has 1 entries"):
    UNetConfig(4, 4, 64, channel_mult=(1, 2), num_res_blocks=(1,), attention=(True, False),
               connector=(True, False))
  good = UNetConfig(4, 4, 64, channel_mult=(1,), num_res_blocks=(1,), attention=(True,),
                    connector=(True,), connector_channel_mult=(1,),
                    connector_num_res_blocks=(1,), connector_channels=32, context_dim=8)
  with pytest.raises(ValueError, match="share one connector_channels"):
    CoDiConfig(image=good, text=None,
               audio=UNetConfig(8, 8, 64, channel_mult=(1,), num_res_blocks=(1,),
                                attention=(True,), connector=(True,),
                                connector_channel_mult=(1,), connector_num_res_blocks=(1,),
                                connector_channels=48, context_dim=8))
  with pytest.raises(ValueError, match="unknown alignment"):
    CoDiConfig(image=good, text=None, audio=None, alignment="both")


def test_bfloat16_compute_tracks_float32(tiny_model, unet_fixture):
  """bf16 compute (params stay fp32; the temporal LayerNorm switches to eps 1e-3).

  (Not the dev set's text branch: with 1-2 elements per GroupNorm group it is sign-like, so bf16
  rounding flips it; see README "Fidelity notes".)"""
  config, params = tiny_model
  fx = unet_fixture
  x = {Modality.VIDEO: jnp.asarray(to_channels_last("video", fx.inputs["x_video"])),
       Modality.AUDIO: jnp.asarray(to_channels_last("audio", fx.inputs["x_audio"]))}
  t, ctx = jnp.asarray(fx.inputs["timesteps"]), jnp.asarray(fx.inputs["ctx_text"])
  ref = CoDiUNet(config).apply({"params": params}, x, t, ctx)
  bf16 = CoDiConfig(config.image, config.text, config.audio, config.alignment, dtype="bfloat16")
  out = CoDiUNet(bf16).apply({"params": params}, x, t, ctx)
  for m in x:
    assert out[m].dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out[m])))
    rel = float(jnp.linalg.norm(out[m] - ref[m]) / jnp.linalg.norm(ref[m]))
    assert rel < 0.1, (m, rel)
