"""What each training stage computes: frozen features of a batch, and the stage's loss.

Everything here runs inside the jitted train step on one global batch (host tokenisation is done
by `codi_jax.train.data`). Randomness is per example: every row has its own key, folded from
the step key and the example's global position in the data stream (`batch["index"]`), so a
step's loss is the same whatever the device count, the process count or the order rows arrive in.

Batch fields (B rows; see `codi_jax.train.data`): `index` int [B]; `image` [B, S, S, 3] and
`video` [B, F, S, S, 3] in [-1, 1]; `audio` [B, L] 16 kHz mono; `clip_ids` [B, 77] (CLIP text),
`bert_ids` [B, Tb] (Optimus encoder), `gpt2_ids` [B, Tg] (Optimus decoder: <BOS> text <EOS>,
then <PAD>).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from codi_jax import components
from codi_jax.audio.mel import HOP, fbank_clip, mel_spectrogram, wav_to_fbank
from codi_jax.diffusion.losses import add_noise, epsilon_loss
from codi_jax.diffusion.schedule import ScheduleConfig
from codi_jax.modality import Modality
from codi_jax.models import autoencoder, clap, clip, optimus, vocoder
from codi_jax.models.clip_preprocess import CLIP_MEAN, CLIP_STD
from codi_jax.models.codi import CoDiUNet, codi_config_from_dict
from codi_jax.models.layers import l2_normalize
from codi_jax.models.optimus import PAD_ID

PyTree = Any
Batch = Mapping[str, jax.Array]

# Per-row random streams (folded into each row's key).
_T, _NOISE, _POSTERIOR, _DROP, _CHOICE, _WORD_DROP = 0, 1, 2, 3, 4, 5


@dataclasses.dataclass(frozen=True)
class Models:
  """The modules of every part, built from `config.model` (no parameters)."""

  diffusers: CoDiUNet
  image_vae: autoencoder.AutoencoderKL
  audio_vae: autoencoder.AutoencoderKL
  vocoder: vocoder.HiFiGAN
  optimus: optimus.Optimus
  clip: clip.CLIPModel
  clap: clap.ClapAudioEncoder

  @classmethod
  def from_config(cls, model: Mapping) -> Models:
    return cls(diffusers=CoDiUNet(codi_config_from_dict(model)),
               image_vae=autoencoder.AutoencoderKL(components.image_vae_config(model)),
               audio_vae=autoencoder.AutoencoderKL(components.audio_vae_config(model)),
               vocoder=vocoder.HiFiGAN(components.vocoder_config(model)),
               optimus=optimus.Optimus(components.optimus_config(model)),
               clip=clip.CLIPModel(components.clip_config(model)),
               clap=clap.ClapAudioEncoder(components.clap_config(model)))


def row_keys(rng: jax.Array, index: jax.Array) -> jax.Array:
  """One key per example: rng folded with the example's global stream position [B]."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(index.astype(jnp.uint32))


def _stream(keys: jax.Array, stream: int) -> jax.Array:
  return jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys)


def _normal(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """[B, *shape] standard normal, row b from keys[b]."""
  return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def _uniform(keys: jax.Array) -> jax.Array:
  return jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)


def _kl(posterior: autoencoder.DiagonalGaussian) -> jax.Array:
  """KL(q || N(0, I)) per element."""
  return 0.5 * (jnp.square(posterior.mean) + jnp.exp(posterior.logvar) - 1.0 - posterior.logvar)


def _sample(posterior: autoencoder.DiagonalGaussian, keys: jax.Array) -> jax.Array:
  noise = _normal(keys, posterior.mean.shape[1:])
  return posterior.mean + jnp.exp(0.5 * posterior.logvar) * noise


def audio_frames(samples: int) -> int:
  """Log-mel frames of a training clip of `samples` 16 kHz samples: AudioLDM's
  `int(seconds * 102.4)`, in exact integer arithmetic."""
  frames = samples * 16 // 2500
  if frames < 1:
    raise ValueError(f"a clip of {samples} samples has no log-mel frames")
  return frames


# --- frozen features ------------------------------------------------------------------------------

def clip_pixels(x: jax.Array, size: int) -> jax.Array:
  """[-1, 1] images [..., S, S, 3] -> CLIP pixel values at size x size (bicubic when resized).

  The in-graph counterpart of `clip_preprocess.preprocess` (which runs PIL on the host for
  bit-exact inference); training only needs the same transform at every step."""
  if x.shape[-3:-1] != (size, size):
    lead = x.shape[:-3]
    flat = x.reshape((-1,) + x.shape[-3:])
    flat = jax.image.resize(flat, (flat.shape[0], size, size, 3), "bicubic")
    x = flat.reshape(lead + (size, size, 3))
  x = (jnp.clip(x, -1.0, 1.0) + 1.0) / 2.0
  return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def condition_token(models: Models, params: Mapping[str, PyTree], batch: Batch,
                    modality: Modality) -> jax.Array:
  """Unit-norm prompt token [B, D] of one modality of the batch (CLIP text/vision, CLAP), or the
  cached one (`<modality>_token`) when the batch holds it."""
  if f"{modality.value}_token" in batch:
    return batch[f"{modality.value}_token"]
  if modality is Modality.TEXT:
    tok = models.clip.apply({"params": params["clip"]}, batch["clip_ids"],
                            method=clip.CLIPModel.encode_text)
  elif modality in (Modality.IMAGE, Modality.VIDEO):
    pixels = clip_pixels(batch[modality.value], models.clip.config.vision.image_size)
    tok = models.clip.apply({"params": params["clip"]}, pixels,
                            method=clip.CLIPModel.encode_vision)
  else:
    tok = models.clap.apply(params["clap"], batch["audio"][:, None])
  return tok[:, 0]


def null_token(models: Models, params: Mapping[str, PyTree], batch: Batch,
               modality: Modality) -> jax.Array:
  """The unconditional token [D] of a modality, as inference builds it (CLIP of "", of a grey
  image/video, CLAP of silence), from the batch's `null_*` inputs (`train.data.null_inputs`)."""
  field = "clip_ids" if modality is Modality.TEXT else modality.value
  return condition_token(models, params, {field: batch[f"null_{field}"]}, modality)[0]


def latent(models: Models, params: Mapping[str, PyTree], batch: Batch, modality: Modality
           ) -> jax.Array:
  """The diffusion latent x0 of one modality (what the diffuser learns to generate): the frozen
  VAE's posterior mode, or the Optimus mean for text, normalised by the part's shift and scale;
  or the cached one (`<modality>_latent`) when the batch holds it.

  The mode, not a posterior sample: a VAE trained briefly from scratch keeps a wide posterior,
  and its noise would dominate the diffusion target."""
  if f"{modality.value}_latent" in batch:
    return batch[f"{modality.value}_latent"]
  if modality in (Modality.IMAGE, Modality.VIDEO):
    return autoencoder.encode_image(models.image_vae, params["autokl"], batch[modality.value])
  if modality is Modality.AUDIO:
    vae = models.audio_vae
    fbank = wav_to_fbank(batch["audio"], audio_frames(batch["audio"].shape[1]))[..., None]
    posterior = vae.apply({"params": params["audioldm_vae"]}, fbank,
                          method=autoencoder.AutoencoderKL.encode)
    return autoencoder.scale_latent(vae.config, posterior.mode())
  return models.optimus.apply({"params": params["optimus"]}, batch["bert_ids"],
                              method=optimus.Optimus.codi_encode)


# --- losses -----------------------------------------------------------------------------------

def contrastive_loss(a: jax.Array, b: jax.Array, logit_scale: jax.Array | float) -> jax.Array:
  """Symmetric InfoNCE between unit-norm rows of a and b [B, D] (row i of a pairs row i of b)."""
  logits = jnp.exp(logit_scale) * a @ b.T  # [B, B]
  labels = jnp.arange(a.shape[0])
  ce = lambda x: -jnp.mean(jax.nn.log_softmax(x, axis=-1)[labels, labels])
  return 0.5 * (ce(logits) + ce(logits.T))


def uniformity_loss(z: jax.Array, t: float = 2.0) -> jax.Array:
  """Wang & Isola's uniformity of unit-norm rows z [B, D]: log mean over pairs i != j of
  exp(-t |z_i - z_j|^2). Lower when the rows spread over the sphere."""
  sq = jnp.maximum(2.0 - 2.0 * z @ z.T, 0.0)  # [B, B] squared distances of unit vectors
  off = ~jnp.eye(z.shape[0], dtype=bool)
  return jax.nn.logsumexp(jnp.where(off, -t * sq, -jnp.inf)) - jnp.log(jnp.sum(off))


def contrast_weights(x: jax.Array, recon: jax.Array, contrast_weight: float) -> jax.Array:
  """[B, ..., 1] per-pixel weights of `vae_loss`'s contrast term for images x [B, ..., C]: 1 +
  contrast_weight * max over channels of the larger of |x - bg| and |recon - bg|, bg the input's
  per-channel median (its background); no gradient flows through them."""
  background = jnp.median(x.reshape(x.shape[0], -1, x.shape[-1]), axis=1)  # [B, C]
  background = background.reshape((-1,) + (1,) * (x.ndim - 2) + (x.shape[-1],))
  away = jnp.maximum(jnp.abs(x - background), jnp.abs(recon - background))
  return jax.lax.stop_gradient(1.0 + contrast_weight * jnp.max(away, axis=-1, keepdims=True))


def vae_loss(vae: autoencoder.AutoencoderKL, params: PyTree, x: jax.Array, keys: jax.Array,
             kl_weight: float, *, sample_posterior: bool = True, l2_weight: float = 0.0,
             contrast_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L1 reconstruction (mean per element) + kl_weight * KL per input element (LDM's KL-VAE
  objective with both terms divided by the number of input elements).

  sample_posterior: decode a posterior sample (LDM) or the posterior mode. A VAE trained for a
  few hundred steps from scratch still has a posterior std near its initial 1, which buries the
  latent in noise; decoding the mode trains an autoencoder whose mode is the diffusion target.
  l2_weight: adds a squared-error term. L1 alone is minimised by the median, so where the decoder
  is unsure (a small object) it paints the background; the squared error keeps the object.
  contrast_weight: per-pixel weight 1 + contrast_weight * contrast, so pixels unlike the
  background count more. The contrast is the larger of the input's and the (constant)
  reconstruction's distance from the input's median, max over channels: weighing the input's
  object pixels alone makes painting object colour over background cheap, and the decoder learns
  blobs larger than the object. Tailored to the synthetic data (a small object on a plain
  background, ~6% of the pixels); 0 (off) for real data."""
  posterior = vae.apply({"params": params}, x, method=autoencoder.AutoencoderKL.encode)
  z = _sample(posterior, _stream(keys, _POSTERIOR)) if sample_posterior else posterior.mode()
  recon = vae.apply({"params": params}, z, method=autoencoder.AutoencoderKL.decode)
  weight = contrast_weights(x, recon, contrast_weight) if contrast_weight else 1.0
  l1 = jnp.mean(jnp.abs(recon - x))
  rec = (jnp.mean(weight * jnp.abs(recon - x))
         + l2_weight * jnp.mean(weight * jnp.square(recon - x)))
  kl = jnp.mean(jnp.sum(_kl(posterior), axis=tuple(range(1, z.ndim)))) / (x.size / x.shape[0])
  return rec + kl_weight * kl, {"rec": rec, "l1": l1, "kl": kl,
                                "latent_std": jnp.std(posterior.mean)}


def vocoder_loss(model: vocoder.HiFiGAN, params: PyTree, audio: jax.Array, frames: int
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """HiFi-GAN's mel-spectrogram L1 term: the vocoder turns the clip's log-mel into a wave whose
  log-mel should match (the adversarial terms of HiFi-GAN are not used)."""
  wave = fbank_clip(audio, frames)  # [B, frames * HOP], what the mel is computed from
  mel, _, _ = mel_spectrogram(wave)  # [B, M, frames + 1]
  mel = jnp.swapaxes(mel[:, :, :frames], 1, 2)  # [B, frames, M]
  out = vocoder.mel_to_waveform(model, params, mel[:, None])[:, 0, :frames * HOP]
  out_mel, _, _ = mel_spectrogram(jnp.clip(out, -1.0, 1.0))
  out_mel = jnp.swapaxes(out_mel[:, :, :frames], 1, 2)
  loss = jnp.mean(jnp.abs(out_mel - mel))
  return loss, {"mel_l1": loss}


def optimus_loss(model: optimus.Optimus, params: PyTree, bert_ids: jax.Array, gpt2_ids: jax.Array,
                 keys: jax.Array, beta: float, free_bits: float, *, softmax: str = "full",
                 candidates: int = 0, word_dropout: float = 0.0, bow_weight: float = 0.0,
                 posterior_noise: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Optimus' VAE objective: token cross-entropy of GPT-2 given z ~ q(z | BERT(text)), plus
  beta * KL with free bits (per latent dimension, as Optimus does), both per target token.

  Training-only options (the defaults are the plain objective; none changes the model):
    softmax          "full": over the whole vocabulary. "batch": over the tokens that occur among
                     the batch's targets only (a sampled softmax with the batch as candidates;
                     the tied output matrix restricted to those rows): the full 50k-way softmax
                     is most of a small model's cost, and from scratch it learns faster.
    candidates       "batch" only: at most this many candidates (0: as many as the batch has
                     target tokens, which always holds every distinct id). The logits are
                     [B, T, candidates], so a cap near the number of distinct ids a batch really
                     holds (~90 in 128 synthetic captions) halves a tiny Optimus' step. Should a
                     batch hold more distinct ids, the smallest ones are kept and the targets left
                     out are dropped from the loss (metric `candidate_miss`: their share).
    word_dropout     probability of replacing each decoder input token after <BOS> by <PAD>
                     (Bowman et al. 2016): a weaker language model leans on z, against collapse.
    bow_weight       weight of a bag-of-words loss (Zhao et al. 2017): `linear_emb(z)` against the
                     tied token embeddings must predict every target token, order-free; a
                     direct path from the decoder's loss into the encoder.
    posterior_noise  multiplier of the posterior sample's noise: 0 trains a deterministic
                     autoencoder on the mean (what the text diffuser and the checks read).
  """
  if softmax not in ("full", "batch"):
    raise ValueError(f"optimus_loss: softmax must be 'full' or 'batch', got {softmax!r}")
  variables = {"params": params}
  posterior = model.apply(variables, bert_ids, method=optimus.Optimus.encode)
  noise = _normal(_stream(keys, _POSTERIOR), posterior.mu.shape[1:])
  z = posterior.mu + posterior_noise * jnp.exp(0.5 * posterior.logvar) * noise
  inputs, targets = gpt2_ids[:, :-1], gpt2_ids[:, 1:]
  if word_dropout > 0:
    u = jax.vmap(lambda k: jax.random.uniform(k, inputs.shape[1:]))(_stream(keys, _WORD_DROP))
    inputs = jnp.where((u < word_dropout) & (jnp.arange(inputs.shape[1]) > 0), PAD_ID, inputs)
  mask = (targets != PAD_ID).astype(jnp.float32)
  tokens = jnp.maximum(jnp.sum(mask), 1.0)
  if softmax == "full" and bow_weight == 0:
    logits = model.apply(variables, inputs, z, method=optimus.Optimus.decode_logits)
    target_index, vocab = targets, None
  else:
    hidden, _ = model.apply(variables, inputs, z, method=_decoder_hidden)  # [B, T, E]
    table = params["decoder"]["transformer"]["wte"]["embedding"]  # [V, E]
    if softmax == "batch":
      # Candidates: the distinct target ids, padded with -1 to a static size (masked out).
      size = min(candidates, targets.size) if candidates > 0 else targets.size
      # jnp.unique: the sorted distinct ids first, then the padding.
      vocab = jnp.unique(targets.reshape(-1), size=targets.size, fill_value=-1)[:size]  # [K]
      valid = vocab >= 0
      rows = table[jnp.where(valid, vocab, 0)]  # [K, E]
      target_index = jnp.minimum(jnp.searchsorted(
          jnp.where(valid, vocab, jnp.iinfo(vocab.dtype).max), targets), size - 1)
      found = (vocab[target_index] == targets).astype(jnp.float32)
      miss = jnp.sum(mask * (1.0 - found)) / tokens
      mask, tokens = mask * found, jnp.maximum(jnp.sum(mask * found), 1.0)
      restrict = lambda x: jnp.where(valid, x, -1e9)
    else:
      vocab, rows, target_index, restrict = None, table, targets, lambda x: x
    logits = restrict(jnp.einsum("bte,ke->btk", hidden.astype(jnp.float32), rows))
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, target_index[..., None], axis=-1)[..., 0]
  ce = jnp.sum(nll * mask) / tokens
  kl_dim = 0.5 * (jnp.square(posterior.mu) + jnp.exp(posterior.logvar) - 1.0 - posterior.logvar)
  kl = jnp.sum(jnp.maximum(jnp.mean(kl_dim, axis=0), free_bits)) * gpt2_ids.shape[0] / tokens
  predicted = jnp.argmax(logits, -1)
  if vocab is not None:
    predicted = vocab[predicted]
  accuracy = jnp.sum((predicted == targets) * mask) / tokens
  loss = ce + beta * kl
  metrics = {"ce": ce, "kl": kl, "token_accuracy": accuracy,
             "mu_spread": jnp.mean(jnp.std(posterior.mu, axis=0))}
  if vocab is not None:
    metrics["candidate_miss"] = miss
  if bow_weight > 0:
    bow_logits = restrict(model.apply(variables, z, method=_latent_embedding) @ rows.T)  # [B, K]
    bow_logp = jax.nn.log_softmax(bow_logits, axis=-1)
    bow = -jnp.sum(jnp.take_along_axis(bow_logp, target_index, axis=-1) * mask) / tokens
    loss = loss + bow_weight * bow
    metrics["bow"] = bow
  return loss, metrics


def optimus_options(t: Mapping[str, Any]) -> dict[str, Any]:
  """`optimus_loss`'s training-only options from `config.train` (`optimus_softmax`,
  `optimus_softmax_candidates`, `optimus_word_dropout`, `optimus_bow_weight`,
  `optimus_posterior_noise`); absent keys keep the plain objective."""
  return dict(softmax=str(t.get("optimus_softmax", "full")),
              candidates=int(t.get("optimus_softmax_candidates", 0)),
              word_dropout=float(t.get("optimus_word_dropout", 0.0)),
              bow_weight=float(t.get("optimus_bow_weight", 0.0)),
              posterior_noise=float(t.get("optimus_posterior_noise", 1.0)))


def _decoder_hidden(module: optimus.Optimus, ids: jax.Array, z: jax.Array):
  """The decoder's final hidden states [B, T, E] (before the tied LM head) and its cache."""
  decoder = module.decoder
  return decoder.transformer(ids, z, decoder.init_cache(z, ids.shape[1] + 1), 0)


def _latent_embedding(module: optimus.Optimus, z: jax.Array) -> jax.Array:
  """`linear_emb(z)` [B, E]: what the decoder adds to every token embedding."""
  return module.decoder.transformer.linear_emb(z)


def diffusion_loss(models: Models, diffuser_params: PyTree, x0: Mapping[Modality, jax.Array],
                   context: jax.Array, keys: jax.Array, schedule: ScheduleConfig
                   ) -> tuple[jax.Array, dict[Modality, jax.Array]]:
  """The epsilon loss of the joint diffuser on clean latents x0 (one or several modalities)."""
  model_fn = lambda p, x, t, c: models.diffusers.apply({"params": p}, x, t, c)
  return epsilon_loss(model_fn, diffuser_params, x0, context, keys, schedule)


def drop_conditions(token: jax.Array, null: jax.Array, keys: jax.Array, rate: float
                    ) -> jax.Array:
  """Replaces each row's token by the null token with probability `rate` (guidance training)."""
  drop = _uniform(_stream(keys, _DROP)) < rate
  return jnp.where(drop[:, None], null[None], token)


def choose_conditions(tokens: list[jax.Array], nulls: list[jax.Array], keys: jax.Array,
                      null_rate: float) -> jax.Array:
  """Per row: one of `tokens` [B, D] uniformly, or with probability null_rate one of `nulls`
  [D] (one per token) uniformly."""
  if len(nulls) != len(tokens):
    raise ValueError(f"choose_conditions: {len(tokens)} tokens but {len(nulls)} null tokens")
  n = len(tokens)
  u = _uniform(_stream(keys, _CHOICE))
  which = jnp.floor(jnp.minimum((u - null_rate) / (1.0 - null_rate) * n, n - 1))
  which_null = jnp.floor(jnp.minimum(u / max(null_rate, 1e-12) * n, n - 1))
  out = jnp.zeros_like(tokens[0])
  for i, (tok, null) in enumerate(zip(tokens, nulls)):
    out = jnp.where(((u >= null_rate) & (which == i))[:, None], tok, out)
    out = jnp.where(((u < null_rate) & (which_null == i))[:, None], null[None], out)
  return out


def environment_contrastive(models: Models, diffuser_params: PyTree,
                            x0: Mapping[Modality, jax.Array], keys: jax.Array,
                            schedule: ScheduleConfig, logit_scale: float,
                            max_timestep: int | None = None) -> jax.Array:
  """InfoNCE between the environment codes of paired latents: pulls the codes of matching
  examples together across modalities (latent alignment).

  Every row is noised at the same timestep. The codes depend on the timestep, so with one per
  row a pair could be matched by its timestep alone: the loss then fell to ~0.5 (chance log 8)
  while every example's code stayed the same vector at a given timestep (cosine 0.998), and
  the connectors had nothing to pass on.

  The codes are centred over the batch before the loss. Mean-pooled, they share a component
  that dwarfs what tells examples apart (pairwise cosine 0.998 at the start), and at the many
  timesteps where noise hides which latents pair, InfoNCE is lowest with equal logits: it
  pulled every code onto that common vector (cosine 1.000, the loss at chance for 800 steps,
  and likewise 600 steps at batch 64 on the encoders alone). Centred, a constant code scores
  nothing, and the same 400 steps at batch 32 retrieve an image's audio among 32 at 0.59 (t
  50; chance 0.03)."""
  t_key = _stream(keys, _T)[0]
  high = min(max_timestep or schedule.num_timesteps, schedule.num_timesteps)
  t = jnp.full((keys.shape[0],), jax.random.randint(t_key, (), 0, high))
  x_t = {m: add_noise(x, _normal(_stream(keys, _NOISE + 10 + i), x.shape[1:]), t, schedule)
         for i, (m, x) in enumerate(sorted(x0.items()))}
  codes = models.diffusers.apply({"params": diffuser_params}, x_t, t,
                                 method=CoDiUNet.environment_codes)
  centred = lambda c: c - jnp.mean(c, axis=0, keepdims=True)
  a, b = (l2_normalize(centred(codes[m].astype(jnp.float32))) for m in sorted(codes))
  return contrastive_loss(a, b, jnp.log(logit_scale))
