"""The parts of CoDi, one row each: typed config, parameter shapes, checkpoint keys.

`config.model` of `configs/codi.py` holds one field dict per part (`image_vae`, `audio_vae`,
`vocoder`, `optimus`, `clip`, `clap`; the diffusers read `image`/`text`/`audio`); the builders here
turn them into the models' typed configs.
Each row also names the part as `manifest_full.json` does, where its keys live in the
released CoDi state dict and which non-parameter tensors the original keeps there
(`convert.buffers`), so parameter reports, conversion and export share one table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from codi_jax.convert import keymap
from codi_jax.convert.buffers import (Buffer, audioldm_buffers, clap_buffers, clip_buffers,
                                      optimus_buffers)
from codi_jax.models import autoencoder, clap, clip, codi, optimus, vocoder

PyTree = Any


def _dict(d: Mapping | None) -> dict:
  return dict(d or {})


def image_vae_config(model: Mapping) -> autoencoder.AutoencoderConfig:
  return autoencoder.AutoencoderConfig(**_dict(model["image_vae"]))


def audio_vae_config(model: Mapping) -> autoencoder.AutoencoderConfig:
  return autoencoder.AutoencoderConfig(**_dict(model["audio_vae"]))


def vocoder_config(model: Mapping) -> vocoder.VocoderConfig:
  return vocoder.VocoderConfig(**_dict(model["vocoder"]))


def optimus_config(model: Mapping) -> optimus.OptimusConfig:
  c = _dict(model["optimus"])
  return optimus.OptimusConfig(encoder=optimus.BertConfig(**_dict(c.pop("encoder", None))),
                               decoder=optimus.GPT2Config(**_dict(c.pop("decoder", None))),
                               dtype=model.get("dtype", "float32"), **c)


def clip_config(model: Mapping) -> clip.CLIPConfig:
  c = _dict(model["clip"])
  return clip.CLIPConfig(text=clip.CLIPTextConfig(**_dict(c.pop("text", None))),
                         vision=clip.CLIPVisionConfig(**_dict(c.pop("vision", None))),
                         dtype=model.get("dtype", "float32"), **c)


def clap_config(model: Mapping) -> clap.ClapConfig:
  c = _dict(model["clap"])
  return clap.ClapConfig(audio=clap.ClapAudioConfig(**_dict(c.pop("audio", None))),
                         htsat=clap.HTSATConfig(**_dict(c.pop("htsat", None))),
                         dtype=model.get("dtype", "float32"), **c)


@dataclasses.dataclass(frozen=True)
class Component:
  name: str  # as in manifest_full.json
  prefix: str  # of its keys in the released CoDi state dict
  keymap: keymap.KeyMap
  config: Callable[[Mapping], Any]  # config.model -> typed config
  param_shapes: Callable[[Any], PyTree]  # typed config -> parameter shapes (no memory)
  # (typed config, key) -> initial variables, boxed with logical axis names (CLAP: {"params",
  # "batch_stats"}; the others: the params tree).
  init: Callable[[Any, Any], PyTree]
  # Non-trainable state loaded from checkpoint buffers (CLAP's BatchNorm running statistics).
  state_shapes: Callable[[Any], PyTree] = lambda config: {}
  # typed config -> {key under `prefix`: Buffer}: what the original's state dict holds beyond
  # the parameters and state above (regenerated on export).
  buffers: Callable[[Any], dict[str, Buffer]] = lambda config: {}

  def shapes(self, model: Mapping) -> PyTree:
    return self.param_shapes(self.config(model))


COMPONENTS: tuple[Component, ...] = (
    Component("autokl", "autokl.", keymap.AUTOENCODER, image_vae_config,
              autoencoder.param_shapes, autoencoder.init_params),
    Component("audioldm_vae", "audioldm.", keymap.AUTOENCODER, audio_vae_config,
              autoencoder.param_shapes, autoencoder.init_params,
              buffers=lambda config: audioldm_buffers()),
    Component("hifigan_vocoder", "audioldm.vocoder.", keymap.VOCODER, vocoder_config,
              vocoder.param_shapes, vocoder.init_params),
    Component("optimus", "optimus.", keymap.OPTIMUS, optimus_config, optimus.param_shapes,
              optimus.init_params, buffers=optimus_buffers),
    Component("clip", "clip.model.", keymap.CLIP, clip_config, clip.param_shapes,
              clip.init_params, buffers=clip_buffers),
    Component("clap", "clap.model.", keymap.CLAP, clap_config, clap.param_shapes,
              lambda config, key: dict(clap.init_variables(config, key)),
              lambda config: clap.variable_shapes(config)["batch_stats"], clap_buffers),
)


# The three diffusers as one part (the manifest counts them per branch: `param_report`). Their
# DDPM schedule buffers are top-level keys of the CoDi state dict (`checkpoint.SCHEDULE_BUFFERS`).
DIFFUSERS = Component("diffusers", "model.diffusion_model.", keymap.UNET,
                      codi.codi_config_from_dict, codi.param_shapes, codi.init_params)

# Every part of a CoDi checkpoint, in order.
PARTS: tuple[Component, ...] = (DIFFUSERS,) + COMPONENTS


def component(name: str) -> Component:
  for c in PARTS:
    if c.name == name:
      return c
  raise ValueError(f"unknown component {name!r}; choose one of {[c.name for c in PARTS]}")
