"""The joint CoDi diffuser: image/video, text and audio UNets with latent alignment.

Ported from the original `UNetModelCoDi.forward` (`latent_diffusion/diffusion_unet.py`,
CODI_REFERENCE §2.5). Any non-empty set of output modalities is denoised in one call with one
shared timestep per sample. With more than one output, each modality's environment encoder maps
its noisy latent to an L2-normalised code, and the connector cross-attention of modality m
attends to:
  Alignment.SELF    m's own code (what the released code does; matches its weights bit for bit);
  Alignment.OTHERS  the codes of the other outputs (the paper's design).
With a single output the connectors are skipped, as in the original single-output path.

Latents (channels last): image [B, H, W, 4], video [B, F, H, W, 4], audio [B, T, M, 8] (time x
mel-bins), text [B, 768]. context [B, T, context_dim]; timesteps [B] int.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from codi_jax.modality import Alignment, Modality
from codi_jax.models.attention import AttentionImpl
from codi_jax.models.unet import UNet2D, UNetConfig
from codi_jax.models.unet_text import UNet0D

Latents = Mapping[Modality, jax.Array]

_LATENT_NDIM = {Modality.IMAGE: 4, Modality.VIDEO: 5, Modality.AUDIO: 4, Modality.TEXT: 2}


@dataclasses.dataclass(frozen=True)
class CoDiConfig:
  """The three diffusers (any may be None when a model lacks it) and how they are run."""

  image: UNetConfig | None
  text: UNetConfig | None
  audio: UNetConfig | None
  alignment: Alignment = Alignment.OTHERS
  attention_impl: AttentionImpl = AttentionImpl.XLA
  dtype: str = "float32"
  remat: str = "none"  # rematerialisation per block: none | full | dots (`unet.REMAT_POLICIES`)

  def __post_init__(self):
    object.__setattr__(self, "alignment", Alignment.parse(self.alignment))
    object.__setattr__(self, "attention_impl", AttentionImpl(self.attention_impl))
    jnp.dtype(self.dtype)  # raises on an unknown dtype name
    if self.text is not None and not self.text.fully_connected:
      raise ValueError("CoDiConfig.text must be a fully connected UNet (set second_dim)")
    for name in ("image", "audio"):
      branch = getattr(self, name)
      if branch is not None and branch.fully_connected:
        raise ValueError(f"CoDiConfig.{name} must be a 2-D UNet (no second_dim)")
    if not self.branches:
      raise ValueError("CoDiConfig needs at least one diffuser")
    for field in ("connector_channels", "context_dim"):
      values = {getattr(b, field) for b in self.branches.values()}
      if len(values) > 1:
        raise ValueError(f"all diffusers must share one {field}, got {sorted(values)}")

  @property
  def context_dim(self) -> int:
    return next(iter(self.branches.values())).context_dim

  @property
  def branches(self) -> dict[str, UNetConfig]:
    """Present diffusers by their original attribute name (`unet_image`, ...)."""
    return {f"unet_{k}": v for k, v in
            (("image", self.image), ("text", self.text), ("audio", self.audio)) if v is not None}


def parse_latents(latents: Mapping[Modality | str, jax.Array]) -> dict[Modality, jax.Array]:
  """Validates a {modality: latent} mapping: known names, ranks, one batch size."""
  if not latents:
    raise ValueError("at least one output modality is required")
  parsed = {Modality.parse(k): v for k, v in latents.items()}
  if len(parsed) != len(latents):
    raise ValueError(f"a modality is repeated in {list(latents)}")
  for m, x in parsed.items():
    if x.ndim != _LATENT_NDIM[m]:
      raise ValueError(f"{m.value} latent must have {_LATENT_NDIM[m]} dims, got shape {x.shape}")
  batch = {x.shape[0] for x in parsed.values()}
  if len(batch) > 1:
    raise ValueError(f"latents disagree on the batch size: {sorted(batch)}")
  return parsed


class CoDiUNet(nn.Module):
  """model.diffusion_model of the original: {modality: x_t} -> {modality: predicted noise}."""

  config: CoDiConfig

  def setup(self):
    cfg = self.config
    kw = dict(attention_impl=cfg.attention_impl, dtype=jnp.dtype(cfg.dtype), remat=cfg.remat)
    if cfg.image is not None:
      self.unet_image = UNet2D(cfg.image, **kw)
    if cfg.text is not None:
      self.unet_text = UNet0D(cfg.text, **kw)
    if cfg.audio is not None:
      self.unet_audio = UNet2D(cfg.audio, **kw)

  def _branch(self, modality: Modality) -> UNet2D:
    if modality.branch not in self.config.branches:
      raise ValueError(f"this model has no {modality.branch} to generate {modality.value}")
    return getattr(self, modality.branch)

  def environment_codes(self, latents: Latents, timesteps: jax.Array) -> dict[Modality, jax.Array]:
    """Each output's environment code [B, D] (`h_con` of the original)."""
    latents = parse_latents(latents)
    return {m: self._branch(m).environment_code(x, timesteps) for m, x in latents.items()}

  def connector_contexts(self, codes: Mapping[Modality, jax.Array]) -> dict[Modality, jax.Array]:
    """What each modality's connector cross-attention attends to, [B, K, D]."""
    if self.config.alignment is Alignment.SELF:
      return {m: c[:, None, :] for m, c in codes.items()}
    return {m: jnp.stack([c for o, c in codes.items() if o != m], axis=1) for m in codes}

  def __call__(self, latents: Latents, timesteps: jax.Array,
               context: jax.Array) -> dict[Modality, jax.Array]:
    latents = parse_latents(latents)
    batch = next(iter(latents.values())).shape[0]
    if timesteps.shape != (batch,):
      raise ValueError(f"timesteps must have shape ({batch},), got {timesteps.shape}")
    if context.ndim != 3 or context.shape[0] != batch:
      raise ValueError(f"context must be [{batch}, T, D], got shape {context.shape}")
    conn = {m: None for m in latents}
    if len(latents) > 1:
      conn = self.connector_contexts(self.environment_codes(latents, timesteps))
    return {m: self._branch(m)(x, timesteps, context, conn[m]) for m, x in latents.items()}


def example_inputs(config: CoDiConfig, batch: int = 1
                   ) -> tuple[dict[Modality, jax.Array], jax.Array, jax.Array]:
  """Smallest inputs that touch every parameter: one latent per diffuser (video when the image
  diffuser has video layers, so they are created), timesteps, and a one-token context."""
  latents = {}
  for modality, cfg in ((Modality.IMAGE, config.image), (Modality.AUDIO, config.audio)):
    if cfg is None:
      continue
    side = 2 ** max(len(cfg.channel_mult) - 1, len(cfg.connector_channel_mult) - 1)
    shape = (batch, side, side, cfg.in_channels)
    if modality is Modality.IMAGE and cfg.video:
      modality, shape = Modality.VIDEO, (batch, 2) + shape[1:]
    latents[modality] = jnp.zeros(shape, jnp.float32)
  if config.text is not None:
    latents[Modality.TEXT] = jnp.zeros((batch, config.text.in_channels), jnp.float32)
  return (latents, jnp.zeros((batch,), jnp.int32),
          jnp.zeros((batch, 1, config.context_dim), jnp.float32))


def init_params(config: CoDiConfig, rng: jax.Array):
  """Initial (logically partitioned) parameters of every diffuser and connector."""
  latents, t, ctx = example_inputs(config)
  if len(latents) == 1 and Modality.VIDEO in latents:
    # Connectors are only built by a joint call; a video-only model can pair video with image.
    latents[Modality.IMAGE] = latents[Modality.VIDEO][:, 0]
  return CoDiUNet(config).init(rng, latents, t, ctx)["params"]


def param_shapes(config: CoDiConfig):
  """`jax.eval_shape` of `init_params`: the full tree with no memory allocated."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def codi_config_from_dict(model: Mapping) -> CoDiConfig:
  """`config.model` of `configs/codi.py` (a ConfigDict or dict) -> CoDiConfig."""
  branch = lambda key: UNetConfig(**dict(model[key])) if model.get(key) is not None else None
  return CoDiConfig(image=branch("image"), text=branch("text"), audio=branch("audio"),
                    alignment=model.get("alignment", Alignment.OTHERS),
                    attention_impl=model.get("attention_impl", AttentionImpl.XLA),
                    dtype=model.get("dtype", "float32"), remat=model.get("remat", "none"))
