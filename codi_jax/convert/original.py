"""The original's yaml-style model configs -> our typed configs.

Used to build a model from a released config or from a reference fixture's own `unet_config`
(`openai_unet_codi` with `unet_{image,text,audio}_cfg.args`), never from hard-coded sizes.
"""

from __future__ import annotations

from typing import Any, Mapping

from codi_jax.modality import Alignment
from codi_jax.models.codi import CoDiConfig
from codi_jax.models.unet import UNetConfig

# Class defaults of the original constructors that the yaml may leave out.
_DEFAULTS = dict(channel_mult_connector=(1, 2, 4), num_noattn_blocks_connector=(1, 1, 1),
                 with_attn=(True, True, True, False), with_connector=(True, True, True, False),
                 num_noattn_blocks=(2, 2, 2, 2), connector_output_channel=1280, num_heads=8,
                 context_dim=768, second_dim_connector=(4, 4, 4))


def unet_config_from_original(args: Mapping[str, Any], *, text: bool) -> UNetConfig:
  """One `openai_unet_2d` / `openai_unet_0dmd` args dict -> UNetConfig."""
  a = {**_DEFAULTS, **args}
  if not a.get("init_connector", True):
    raise ValueError("UNets built without connectors (init_connector=False) are not supported")
  return UNetConfig(
      in_channels=a["input_channels"],
      out_channels=a["output_channels"],
      model_channels=a["model_channels"],
      channel_mult=tuple(a["channel_mult"]),
      num_res_blocks=tuple(a["num_noattn_blocks"]),
      attention=tuple(a["with_attn"]),
      connector=tuple(a["with_connector"]),
      connector_channel_mult=tuple(a["channel_mult_connector"]),
      connector_num_res_blocks=tuple(a["num_noattn_blocks_connector"]),
      connector_channels=a["connector_output_channel"],
      num_heads=a["num_heads"],
      context_dim=a["context_dim"],
      video=bool(a.get("use_video_architecture", False)) and not text,
      second_dim=tuple(a["second_dim"]) if text else None,
      connector_second_dim=tuple(a["second_dim_connector"]) if text else None,
  )


def codi_config_from_original(unet_config: Mapping[str, Any], *,
                              alignment: Alignment | str = Alignment.SELF,
                              dtype: str = "float32") -> CoDiConfig:
  """An `openai_unet_codi` config (name/type/args) -> CoDiConfig (default: the released `self`)."""
  args = unet_config.get("args", unet_config)
  types = set(args.get("model_type", ("video", "image", "text", "audio")))
  branch = lambda key, text: (unet_config_from_original(args[key]["args"], text=text)
                              if key in args else None)
  return CoDiConfig(
      image=branch("unet_image_cfg", False) if types & {"image", "video"} else None,
      text=branch("unet_text_cfg", True) if "text" in types else None,
      audio=branch("unet_audio_cfg", False) if "audio" in types else None,
      alignment=alignment,
      dtype=dtype,
  )
