"""The original's yaml-style model configs -> our typed configs and run configs.

Used to build a model from a released config or from a reference fixture's own configs: the
diffusers from an `openai_unet_codi` config (`unet_{image,text,audio}_cfg.args`), and a whole
CoDi (every part, `run_config_from_original`) from the resolved `codi` config with the CLIP,
HiFi-GAN and CLAP dicts the original builds beside it; never from hard-coded sizes.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping

import ml_collections

from codi_jax.modality import Alignment
from codi_jax.models.autoencoder import autoencoder_config_from_original
from codi_jax.models.clap import clap_config_from_original
from codi_jax.models.clip import clip_config_from_original
from codi_jax.models.clip_preprocess import PreprocessConfig, preprocess_config_from_original
from codi_jax.models.codi import CoDiConfig
from codi_jax.models.optimus import optimus_config_from_original
from codi_jax.models.unet import UNetConfig
from codi_jax.models.vocoder import vocoder_config_from_original
from codi_jax.pipeline_options import ORIGINAL

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


# --- the whole model --------------------------------------------------------------------------

def _fields(config: Any, drop: tuple[str, ...] = ("dtype",)) -> dict[str, Any]:
  """A typed config -> the plain field dict `config.model.<part>` holds (enums as their values,
  tuples as lists, nested configs as dicts); `drop`: fields the run config sets once for all."""
  def plain(v: Any) -> Any:
    if isinstance(v, enum.Enum):
      return v.value
    if dataclasses.is_dataclass(v):
      return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)
              if f.name not in drop}
    if isinstance(v, (tuple, list)):
      return [plain(x) for x in v]
    return v
  return plain(config)


def _args(cfg: Mapping[str, Any], key: str) -> Mapping[str, Any]:
  try:
    return cfg[key]["args"]
  except (KeyError, TypeError):
    raise ValueError(f"CoDi config has no {key}.args") from None


def run_config_from_original(codi_cfg: Mapping[str, Any], *, clip: Mapping[str, Any],
                             hifigan: Mapping[str, Any], clap_model_cfg: Mapping[str, Any],
                             htsat_sizes: Mapping[str, Any] | None = None
                             ) -> ml_collections.ConfigDict:
  """The run config (`configs/codi.py` layout: `model`, `diffusion`, `sample`) of a CoDi built
  from the original's own configs, with the original's inference behaviour (`pipeline_options.
  ORIGINAL`) and its `inference` defaults (DDIM 50, guidance 7.5, image 256, 8 frames, audio
  latent 256 x 16).

  codi_cfg: the resolved `codi` model config (`configs/model/codi.yaml` with what it references:
    `args.{unet_config, autokl_cfg, audioldm_cfg, optimus_cfg, clap_cfg}` and the scale
    factors and DDPM schedule). clip: the CLIP config dicts as `CLIPConfig.from_pretrained` gives
    them (`text_config_dict` or `text_config`, the vision twin, `projection_dim`) with
    `processor_config` (the image processor's settings). hifigan: the vocoder's HiFi-GAN dict
    (`HIFIGAN_16K_64` in the original). clap_model_cfg: the HTSAT model json; htsat_sizes:
    HTSAT sizes for a `model_name` outside `create_htsat_model`'s table (HTSATConfig fields).
  """
  args = codi_cfg.get("args", codi_cfg)
  try:
    scales = {k: float(args[k]) for k in ("vision_scale_factor", "text_scale_factor",
                                          "audio_scale_factor")}
    schedule = dict(num_timesteps=int(args["timesteps"]),
                    beta_start=float(args["beta_linear_start"]),
                    beta_end=float(args["beta_linear_end"]))
  except KeyError as e:
    raise ValueError(f"CoDi config is missing {e.args[0]!r}") from None
  if args.get("beta_schedule", "linear") != "linear":
    raise ValueError(f"only the original's linear beta schedule is supported, got "
                     f"{args['beta_schedule']!r}")
  diffusers = codi_config_from_original(args["unet_config"])
  clip_dict = {("text_config" if k == "text_config_dict" else
                "vision_config" if k == "vision_config_dict" else k): v for k, v in clip.items()}
  clip_config = clip_config_from_original(clip_dict)
  side = clip_config.vision.image_size
  if "processor_config" in clip and preprocess_config_from_original(
      clip["processor_config"]) != PreprocessConfig(size=side, crop_size=side):
    raise ValueError(f"CLIP processor_config {dict(clip['processor_config'])} is not CoDi's "
                     f"(bicubic resize to {side}, centre crop {side}, the CLIP mean/std)")
  clap_config = clap_config_from_original(
      clap_model_cfg, joint_embed_shape=int(_args(args, "clap_cfg")["joint_embed_shape"]),
      htsat_sizes=htsat_sizes)
  model = dict(
      image=_fields(diffusers.image) if diffusers.image else None,
      audio=_fields(diffusers.audio) if diffusers.audio else None,
      text=_fields(diffusers.text) if diffusers.text else None,
      image_vae=_fields(autoencoder_config_from_original(_args(args, "autokl_cfg"),
                                                        scales["vision_scale_factor"])),
      audio_vae=_fields(autoencoder_config_from_original(_args(args, "audioldm_cfg"),
                                                        scales["audio_scale_factor"])),
      vocoder=_fields(vocoder_config_from_original(hifigan)),
      optimus=_fields(optimus_config_from_original(_args(args, "optimus_cfg"),
                                                   scale_factor=scales["text_scale_factor"])),
      clip=_fields(clip_config),
      clap=_fields(clap_config),
      alignment=Alignment.SELF.value, audio_decoder="hifigan", attention_impl="xla",
      dtype="float32", remat="none")
  config = ml_collections.ConfigDict()
  config.preset = "original"
  config.model = ml_collections.ConfigDict(model)
  config.diffusion = ml_collections.ConfigDict(schedule)
  config.sample = ml_collections.ConfigDict(dict(
      ddim_steps=50, eta=0.0, guidance_scale=7.5, num_samples=1, image_latent_size=32,
      num_frames=8, audio_latent_frames=256, audio_latent_bins=16,
      outputs="image,video,audio,text", **ORIGINAL.as_config()))
  return config
