"""CoDi's training stages (DESIGN.md "Training stages"): what each trains, freezes, reads and
minimises.

  autoencoders     image KL-VAE, audio mel VAE, HiFi-GAN vocoder, Optimus text VAE, one after the
                   other, each on its own modality (`config.train.autoencoders` picks which and
                   their shares of the steps, e.g. "autokl:2,optimus:3")
  align_encoders   "bridging alignment": CLIP vision (image and video) and CLAP are trained
                   contrastively into the CLIP text space (text is the bridge). The text tower
                   stays frozen when it is pretrained (`config.train.align_text_encoder=False`,
                   e.g. the released CLIP); from scratch it trains too, or text tokens would be
                   a random encoder's and carry little of the caption (the tiny preset)
  diffuse_image    the image diffuser (spatial layers), conditioned on text tokens
  diffuse_video    the image diffuser's temporal layers only, on video, conditioned on text
  diffuse_audio    the audio diffuser, conditioned on text
  diffuse_text     the text diffuser, conditioned on image tokens
  latent_align     diffusers frozen; environment encoders + connector cross-attention trained on
                   joint generation, in the paper's order of pairs: text-image, then text-audio,
                   then audio-video (one phase each, `config.train.latent_align_pairs`;
                   image-audio can be trained directly too)

A stage names the parts it needs (loaded or initialised), a predicate selecting its trainable
leaves (everything else is frozen and never enters the optimizer), and its phases. A phase has
its data (the modalities it reads) and the subset of the trainable leaves it updates; the loss
is `loss(phase, models, params, batch, keys, config)`.

Parameter leaves are addressed as (part, path) with path the tuple of Flax names inside the part
(CLAP's part tree is {"params", "batch_stats"}).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from codi_jax.diffusion.schedule import ScheduleConfig
from codi_jax.modality import Modality
from codi_jax.train import objectives as obj
from codi_jax.train.state import part_batch_sizes

PyTree = Any
Path = tuple[str, ...]
Selector = Callable[[str, Path], bool]

CONNECTORS = frozenset(("connecters_out", "input_block_connecters_in",
                        "output_block_connecters_in"))
# Children of the video architecture's SpatioTemporalAttention (`_VideoRes` child "1").
_TEMPORAL_CHILDREN = frozenset(("ff", "frameshiftblock", "temporal_attn", "temporal_rel_pos_bias"))
PAIRS: dict[str, tuple[Modality, Modality]] = {
    "text_image": (Modality.TEXT, Modality.IMAGE),
    "audio_text": (Modality.AUDIO, Modality.TEXT),
    "audio_video": (Modality.AUDIO, Modality.VIDEO),
    "image_audio": (Modality.IMAGE, Modality.AUDIO),
}


def is_connector(path: Path) -> bool:
  """Latent-alignment leaves of a diffuser: environment encoder and connector attention."""
  return len(path) > 1 and path[1] in CONNECTORS


def is_temporal(path: Path) -> bool:
  """Video-only leaves of the image diffuser (the temporal half of each video ResBlock pair)."""
  if path[0] != "unet_image":
    return False
  for i in range(2, len(path) - 1):
    if path[i] == "1" and path[i - 1].isdigit() and path[i + 1] in _TEMPORAL_CHILDREN:
      return "transformer_blocks" not in path[:i]
  return False


@dataclasses.dataclass(frozen=True)
class Phase:
  name: str
  modalities: tuple[Modality, ...]  # what the batch holds
  updates: Selector  # which trainable leaves this phase moves
  # The output (diffusion stages) or pair (latent alignment).
  outputs: tuple[Modality, ...] = ()
  # Diffusion stages: the modalities whose tokens condition the rows (one per row, uniformly),
  # the stage's own condition first.
  conditions: tuple[Modality, ...] = ()
  share: int = 1  # the phase's share of the stage's steps
  # The one part this phase trains, if so: its learning rate then warms up and decays over the
  # phase's steps, not the stage's.
  part: str | None = None
  # The phase's global batch, if not `config.train.batch_size` (`config.train.part_batch_sizes`).
  batch_size: int | None = None

  @property
  def condition(self) -> Modality | None:
    """A diffusion stage's own condition (what its samples and its check condition on)."""
    return self.conditions[0] if self.conditions else None

  def batch(self, config: ml_collections.ConfigDict) -> int:
    """The phase's global batch size."""
    return self.batch_size or int(config.train.batch_size)


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  parts: tuple[str, ...]  # parts the stage reads (trainable or frozen)
  trainable: Selector
  phases: tuple[Phase, ...]
  loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  description: str

  def phase_starts(self, total_steps: int) -> list[int]:
    """The first step of each phase, then total_steps: the steps are split in order, in
    proportion to the phases' shares (phase i starts at ceil(total * shares before i / all))."""
    shares = [p.share for p in self.phases]
    whole, done, starts = sum(shares), 0, []
    for share in shares:
      starts.append(-(-done * total_steps // whole))
      done += share
    return starts + [total_steps]

  def phase_at(self, step: int, total_steps: int) -> int:
    """Index of the phase step `step` belongs to."""
    starts = self.phase_starts(max(total_steps, 1))
    return max(i for i in range(len(self.phases)) if starts[i] <= step)

  def part_spans(self, total_steps: int) -> dict[str, tuple[int, int]]:
    """{part: (first step, steps)} of the phases that train one part (`Phase.part`)."""
    starts = self.phase_starts(total_steps)
    return {p.part: (starts[i], starts[i + 1] - starts[i])
            for i, p in enumerate(self.phases) if p.part}


_ALL: Selector = lambda part, path: True


# --- losses per stage ---------------------------------------------------------------------------

def _vae_options(t: ml_collections.ConfigDict) -> dict:
  return dict(sample_posterior=t.vae_sample_posterior, l2_weight=t.vae_l2_weight,
              contrast_weight=t.vae_contrast_weight)


def _image_vae_loss(models: obj.Models, params, batch, keys, config):
  return obj.vae_loss(models.image_vae, params["autokl"], batch["image"], keys,
                      config.train.kl_weight, **_vae_options(config.train))


def _audio_vae_loss(models: obj.Models, params, batch, keys, config):
  fbank = obj.wav_to_fbank(batch["audio"], obj.audio_frames(config.data.audio_samples))
  return obj.vae_loss(models.audio_vae, params["audioldm_vae"], fbank[..., None], keys,
                      config.train.kl_weight, **_vae_options(config.train))


def _vocoder_loss(models: obj.Models, params, batch, keys, config):
  return obj.vocoder_loss(models.vocoder, params["hifigan_vocoder"], batch["audio"],
                          obj.audio_frames(config.data.audio_samples))


def _optimus_loss(models: obj.Models, params, batch, keys, config):
  t = config.train
  return obj.optimus_loss(models.optimus, params["optimus"], batch["bert_ids"], batch["gpt2_ids"],
                          keys, t.optimus_beta, t.optimus_free_bits, **obj.optimus_options(t))


# Autoencoder part -> (its loss, the modality it reads). The `autoencoders` stage trains them one
# phase each (a phase is named after its part), so every part has its own step budget.
AUTOENCODERS = {
    "autokl": (_image_vae_loss, Modality.IMAGE),
    "audioldm_vae": (_audio_vae_loss, Modality.AUDIO),
    "hifigan_vocoder": (_vocoder_loss, Modality.AUDIO),
    "optimus": (_optimus_loss, Modality.TEXT),
}


def _autoencoders_loss(phase: Phase, models: obj.Models, params, batch, keys, config):
  loss, metrics = AUTOENCODERS[phase.name][0](models, params, batch, keys, config)
  return loss, {f"{phase.name}/{k}": v for k, v in metrics.items()}


def _align_loss(phase: Phase, models: obj.Models, params, batch, keys, config):
  text = obj.condition_token(models, params, batch, Modality.TEXT)
  if not config.train.align_text_encoder:
    text = jax.lax.stop_gradient(text)
  scale = jnp.minimum(params["clip"]["logit_scale"], jnp.log(100.0))  # CLIP's clamp
  total, metrics = 0.0, {"logit_scale": jnp.exp(scale)}
  uniformity = config.train.align_uniformity_weight
  if uniformity and config.train.align_text_encoder:
    metrics["text_uniformity"] = obj.uniformity_loss(text)
    total = total + uniformity * metrics["text_uniformity"]
  for m in (Modality.IMAGE, Modality.VIDEO, Modality.AUDIO):
    tok = obj.condition_token(models, params, batch, m)
    loss = obj.contrastive_loss(tok, text, scale)
    total = total + loss
    metrics[f"{m.value}_text"] = loss
    metrics[f"{m.value}_text_cosine"] = jnp.mean(jnp.sum(tok * text, axis=-1))
    if uniformity:
      metrics[f"{m.value}_uniformity"] = obj.uniformity_loss(tok)
      total = total + uniformity * metrics[f"{m.value}_uniformity"]
  return total, metrics


def _context(models, params, batch, keys, config, conditions: tuple[Modality, ...]
             ) -> jax.Array:
  """[B, 1, D] condition tokens with guidance dropout: per row, the token of one of
  `conditions` (uniformly), or that modality's null token."""
  tokens = [obj.condition_token(models, params, batch, m) for m in conditions]
  nulls = [obj.null_token(models, params, batch, m) for m in conditions]
  if len(conditions) == 1:
    return obj.drop_conditions(tokens[0], nulls[0], keys, config.train.cond_dropout)[:, None]
  return obj.choose_conditions(tokens, nulls, keys, config.train.cond_dropout)[:, None]


def _diffuse_loss(phase: Phase, models: obj.Models, params, batch, keys, config):
  out = phase.outputs[0]
  frozen = jax.lax.stop_gradient
  x0 = frozen(obj.latent(models, params, batch, out))
  context = frozen(_context(models, params, batch, keys, config, phase.conditions))
  loss, _ = obj.diffusion_loss(models, params["diffusers"], {out: x0}, context, keys,
                               ScheduleConfig(**config.diffusion))
  return loss, {f"{out.value}_mse": loss}


def _latent_align_loss(phase: Phase, models: obj.Models, params, batch, keys, config):
  frozen = jax.lax.stop_gradient
  x0 = {m: frozen(obj.latent(models, params, batch, m)) for m in phase.outputs}
  tokens = [frozen(obj.condition_token(models, params, batch, m)) for m in phase.outputs]
  null = frozen(obj.null_token(models, params, batch, Modality.TEXT))
  context = obj.choose_conditions(tokens, [null] * len(tokens), keys,
                                  config.train.cond_dropout)[:, None]
  schedule = ScheduleConfig(**config.diffusion)
  loss, per = obj.diffusion_loss(models, params["diffusers"], x0, context, keys,
                                 schedule)
  metrics = {f"{m.value}_mse": v for m, v in per.items()}
  weight = config.train.env_contrastive_weight
  if weight:
    env = obj.environment_contrastive(models, params["diffusers"], x0, keys, schedule,
                                      config.train.env_contrastive_scale,
                                      config.train.env_contrastive_max_timestep)
    metrics["env_contrastive"] = env
    loss = loss + weight * env
  return loss, metrics


# --- the table --------------------------------------------------------------------------------

def _shares(config: ml_collections.ConfigDict, field: str, allowed) -> dict[str, int]:
  """`config.train.<field>` as {name: share}: comma-separated names from `allowed`, each
  optionally `name:share` with a positive integer share (default 1)."""
  value = config.train[field]
  error = ValueError(f"config.train.{field}: choose a non-empty comma-separated subset of "
                     f"{list(allowed)}, each optionally with :N (its share of the steps), "
                     f"got {value!r}")
  out = {}
  for item in (p.strip() for p in str(value).split(",") if p.strip()):
    name, sep, share = item.partition(":")
    if name.strip() not in allowed or name.strip() in out:
      raise error
    try:
      out[name.strip()] = int(share) if sep else 1
    except ValueError:
      raise error from None
    if out[name.strip()] < 1:
      raise error
  if not out:
    raise error
  return out


def _autoencoder_parts(config: ml_collections.ConfigDict) -> dict[str, int]:
  return _shares(config, "autoencoders", AUTOENCODERS)


LATENT_ALIGN_PARTS = ("diffusers", "autokl", "audioldm_vae", "optimus", "clip", "clap")


def latent_align_pairs(config: ml_collections.ConfigDict) -> dict[str, int]:
  """The pairs latent alignment trains (`config.train.latent_align_pairs`): {name: share}."""
  return _shares(config, "latent_align_pairs", PAIRS)


def _diffusion_conditions(config: ml_collections.ConfigDict) -> tuple[Modality, ...]:
  """`config.train.diffusion_conditions` ("text,image", ...; "" for the stage's own)."""
  names = [n.strip() for n in str(config.train.diffusion_conditions).split(",") if n.strip()]
  try:
    conditions = tuple(Modality(n) for n in names)
  except ValueError:
    raise ValueError(f"config.train.diffusion_conditions {config.train.diffusion_conditions!r}: "
                     f"name modalities among {[m.value for m in Modality]}") from None
  if len(set(conditions)) != len(conditions):
    raise ValueError(f"config.train.diffusion_conditions {config.train.diffusion_conditions!r} "
                     "names a modality twice")
  return conditions


def _branches_of(modalities) -> frozenset[str]:
  return frozenset(m.branch for m in modalities)


# The diffusion stages: the output each trains and the condition it learns to follow.
DIFFUSION_STAGES: dict[str, tuple[Modality, Modality, str]] = {
    "diffuse_image": (Modality.IMAGE, Modality.TEXT, "image diffuser, text-conditioned"),
    "diffuse_video": (Modality.VIDEO, Modality.TEXT,
                      "temporal layers of the image diffuser, on text-conditioned video"),
    "diffuse_audio": (Modality.AUDIO, Modality.TEXT, "audio diffuser, text-conditioned"),
    "diffuse_text": (Modality.TEXT, Modality.IMAGE, "text diffuser, image-conditioned"),
}


def diffusion_stage(name: str, conditions: tuple[Modality, ...] = ()) -> Stage:
  """The diffusion stage `name` (a key of `DIFFUSION_STAGES`), its rows conditioned on the
  tokens of `conditions` (default: the stage's own condition alone, as CoDi trains)."""
  out, condition, description = DIFFUSION_STAGES[name]
  if conditions and condition not in conditions:
    raise ValueError(f"stage {name} learns from {condition.value} tokens; its conditions "
                     f"{[m.value for m in conditions]} must include them")
  conditions = (condition,) + tuple(m for m in conditions if m is not condition)
  branch = out.branch
  if out is Modality.VIDEO:
    trainable = lambda part, path: (part == "diffusers" and is_temporal(path)
                                    and not is_connector(path))
  else:
    trainable = lambda part, path: (part == "diffusers" and path[0] == branch
                                    and not is_connector(path) and not is_temporal(path))
  encoder = "autokl" if out in (Modality.IMAGE, Modality.VIDEO) else (
      "audioldm_vae" if out is Modality.AUDIO else "optimus")
  prompts = tuple(dict.fromkeys("clap" if m is Modality.AUDIO else "clip" for m in conditions))
  phase = Phase(name, tuple(dict.fromkeys((out,) + conditions)), _ALL, outputs=(out,),
                conditions=conditions)
  return Stage(name, ("diffusers", encoder) + prompts, trainable, (phase,), _diffuse_loss,
               description)


def _stage(config: ml_collections.ConfigDict) -> Stage:
  name = config.stage
  if name == "autoencoders":
    shares = _autoencoder_parts(config)
    parts = tuple(shares)
    batches = part_batch_sizes(config.train)
    phases = tuple(Phase(part, (AUTOENCODERS[part][1],),
                         (lambda part: lambda p, path: p == part)(part), share=share, part=part,
                         batch_size=batches.get(part))
                   for part, share in shares.items())
    return Stage(name, parts, lambda part, path: part in parts, phases, _autoencoders_loss,
                 "image VAE, audio VAE, vocoder and Optimus reconstruction, one phase each")
  if name == "align_encoders":
    clip_trees = ("vision_model", "visual_projection", "logit_scale") + (
        ("text_model", "text_projection") if config.train.align_text_encoder else ())

    def trainable(part: str, path: Path) -> bool:
      if part == "clip":
        return path[0] in clip_trees
      return part == "clap" and path[0] == "params"
    phase = Phase("align_encoders", (Modality.TEXT, Modality.IMAGE, Modality.VIDEO,
                                     Modality.AUDIO), _ALL)
    return Stage(name, ("clip", "clap"), trainable, (phase,), _align_loss,
                 "contrastive alignment of CLIP vision (image, video) and CLAP to CLIP text")
  if name in DIFFUSION_STAGES:
    return diffusion_stage(name, _diffusion_conditions(config))
  if name == "latent_align":
    phases = []
    for pair, share in latent_align_pairs(config).items():
      mods = PAIRS[pair]
      branches = _branches_of(mods)
      updates = (lambda branches: lambda part, path: path[0] in branches)(branches)
      phases.append(Phase(f"latent_align_{pair}", mods, updates, outputs=mods, share=share))
    trainable = lambda part, path: part == "diffusers" and is_connector(path)
    return Stage(name, LATENT_ALIGN_PARTS, trainable, tuple(phases), _latent_align_loss,
                 "environment encoders and connectors on joint generation, diffusers frozen")
  raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")


def get_stage(config: ml_collections.ConfigDict) -> Stage:
  """The stage `config.stage` names, with its phases for this config."""
  stage = _stage(config)
  unknown = sorted(set(part_batch_sizes(config.train)) - {p.part for p in stage.phases})
  if unknown:
    raise ValueError(f"config.train.part_batch_sizes names {unknown}, which no phase of stage "
                     f"{stage.name} trains on its own (such parts: "
                     f"{[p.part for p in stage.phases if p.part]})")
  return stage


STAGES = ("autoencoders", "align_encoders", "diffuse_image", "diffuse_video", "diffuse_audio",
          "diffuse_text", "latent_align")
# The stages whose encoders are all frozen: they may read cached latents and tokens
# (`config.data.cache`) instead of running the encoders.
FROZEN_ENCODER_STAGES = (*DIFFUSION_STAGES, "latent_align")
