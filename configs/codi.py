r"""CoDi model and run configuration: `get_config("tiny" | "small" | "full")`.

Presets live in one table (`PRESETS`); `full` is the released CoDi (CODI_REFERENCE §2,
`configs/model/openai_unet.yaml` of the original), `small` a single-accelerator development size,
`tiny` the CPU size used by tests and the demo. Override any field on the command line:

  codi-jax inspect --config configs/codi.py:full --params
  codi-jax train --config configs/codi.py:tiny --config.stage=diffuse_image --workdir runs/image
  codi-jax train --config.stage=latent_align --config.model.alignment=self --workdir runs/align

`model.alignment`: "self" reproduces the released weights (each output's connectors attend to its
own environment code); "others" is the paper's design (attend to the other outputs' codes) and
the default for training from scratch. The `full` preset describes the released model, so it
defaults to "self".
"""

from __future__ import annotations

import ml_collections

T, F = True, False

# One row per preset. Branch widths, level structure, connector structure, shared widths.
PRESETS = {
    "tiny": dict(
        image_channels=64, audio_channels=64, text_channels=32, text_latent=32,
        channel_mult=(1, 2), num_res_blocks=(1, 1), attention=(T, F), connector=(T, F),
        connector_channel_mult=(1, 2), second_dim=(4, 4), connector_second_dim=(4, 4),
        context_dim=32, connector_channels=64, num_heads=2, alignment="others",
        image_latent=8, num_frames=4, audio_latent=(16, 8), ddim_steps=10),
    "small": dict(
        image_channels=128, audio_channels=64, text_channels=128, text_latent=768,
        channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2), attention=(T, T, F),
        connector=(T, T, F), connector_channel_mult=(1, 2), second_dim=(4, 4, 4),
        connector_second_dim=(4, 4), context_dim=768, connector_channels=512, num_heads=8,
        alignment="others", image_latent=32, num_frames=8, audio_latent=(256, 16),
        ddim_steps=50),
    "full": dict(
        image_channels=320, audio_channels=192, text_channels=320, text_latent=768,
        channel_mult=(1, 2, 4, 4), num_res_blocks=(2, 2, 2, 2), attention=(T, T, T, F),
        connector=(T, T, T, F), connector_channel_mult=(1, 2, 4), second_dim=(4, 4, 4, 4),
        connector_second_dim=(4, 4, 4), context_dim=768, connector_channels=1280, num_heads=8,
        alignment="self", image_latent=32, num_frames=8, audio_latent=(256, 16),
        ddim_steps=50),
}

# The autoencoders, vocoder and prompt encoders per preset (field names of their typed configs:
# `codi_jax.components`). `full` is the released CoDi (CODI_REFERENCE §1); the latent sizes of
# every preset agree with its diffusers (image/video f8 with 4 channels, audio f4 with 8 channels,
# text latent = the text diffuser's width, prompt token = context_dim). The latent scale/shift
# are the released CoDi's; training the autoencoders from scratch replaces them with its latents'
# measured statistics in the checkpoint it exports (`codi_jax.train.latent_stats`).
ENCODERS = {
    "tiny": dict(
        # f4 on 32 x 32 images (the 8 x 8 latent of the tiny diffuser; CPU-cheap).
        image_vae=dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1),
        # Log-mel normalised in the VAE: mean / std of the synthetic train clips' log-mel.
        audio_vae=dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, input_shift=-8.14,
                       input_scale=3.55),
        vocoder=dict(upsample_initial_channel=64),
        optimus=dict(bert=(64, 2, 2, 128), gpt2=(64, 2, 2)),
        clip=dict(text=(64, 2, 2, 128), vision=(64, 2, 2, 128), image_size=32, patch_size=8),
        # A 0.625 s clip at 48 kHz, hop 10 ms: 63 frames of 64 mel bins fill the 64 x 64 image
        # (not padded to CoDi's 10 s).
        clap=dict(spec_size=64, mel_bins=64, hop_size=480, clip_samples=30000, embed_dim=16,
                  depths=(2, 1), num_heads=(2, 4))),
    "small": dict(
        image_vae=dict(ch=64, ch_mult=(1, 2, 2, 4), num_res_blocks=1),
        audio_vae=dict(ch=64, ch_mult=(1, 2, 4), num_res_blocks=1),
        vocoder=dict(upsample_initial_channel=256),
        optimus=dict(bert=(256, 4, 4, 1024), gpt2=(256, 4, 4)),
        clip=dict(text=(256, 4, 4, 1024), vision=(256, 4, 4, 1024), image_size=128,
                  patch_size=16),
        clap=dict(spec_size=256, mel_bins=64, hop_size=480, clip_samples=480000, embed_dim=64,
                  depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))),
    "full": dict(
        image_vae=dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2),
        audio_vae=dict(ch=128, ch_mult=(1, 2, 4), num_res_blocks=2),
        vocoder=dict(upsample_initial_channel=1024),
        optimus=dict(bert=(768, 12, 12, 3072), gpt2=(768, 12, 12)),
        clip=dict(text=(768, 12, 12, 3072), vision=(1024, 24, 16, 4096), image_size=224,
                  patch_size=14),
        clap=dict(spec_size=256, mel_bins=64, hop_size=480, clip_samples=480000, embed_dim=256,
                  depths=(2, 2, 12, 2), num_heads=(4, 8, 16, 32))),
}

# Training defaults per preset: sizes that fit the model (image side = VAE factor x latent side;
# audio = 625 samples per latent frame: 4 mel frames of AudioLDM's 102.4 frames/s) and a
# schedule that suits the preset's scale.
PRESET_TRAIN = {
    "tiny": dict(steps=200, batch_size=8, learning_rate=1e-3, warmup_steps=20, image_size=32,
                 audio_samples=16 * 625, clip_length=32, bert_length=32, gpt2_length=32,
                 log_every=10, checkpoint_every=100, sample_every=100),
    "small": dict(steps=100_000, batch_size=64, learning_rate=1e-4, warmup_steps=1000,
                  image_size=256, audio_samples=256 * 625, clip_length=77, bert_length=64,
                  gpt2_length=64, log_every=50, checkpoint_every=2000, sample_every=5000),
    "full": dict(steps=500_000, batch_size=256, learning_rate=1e-4, warmup_steps=10_000,
                 image_size=256, audio_samples=256 * 625, clip_length=77, bert_length=64,
                 gpt2_length=64, log_every=100, checkpoint_every=5000, sample_every=5000),
}

# Logical axis -> mesh axes, tried in order; a dim takes the first rule whose mesh axes are free
# in that array and divide its size (`codi_jax.parallel.sharding`). Parameters use embed/embed_in/
# mlp/heads; activations use batch/act_length/act_height/act_width/act_embed.
SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("embed_in", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("mlp", "fsdp"),
    ("heads", "fsdp"),
    ("vocab", "tensor"),
    ("act_length", "context"),
    ("act_height", "context"),
    ("act_width", None),
    ("act_embed", None),
    ("norm", None),
    ("conv_height", None),
    ("conv_width", None),
    ("position", None),
    ("frames", None),
    ("unmodeled", None),
)


def _unet(p: dict, channels: int, in_channels: int, *, video: bool = False,
          text: bool = False) -> dict:
  return dict(
      in_channels=in_channels,
      out_channels=in_channels,
      model_channels=channels,
      channel_mult=p["channel_mult"],
      num_res_blocks=p["num_res_blocks"],
      attention=p["attention"],
      connector=p["connector"],
      connector_channel_mult=p["connector_channel_mult"],
      connector_num_res_blocks=(1,) * len(p["connector_channel_mult"]),
      connector_channels=p["connector_channels"],
      num_heads=p["num_heads"],
      context_dim=p["context_dim"],
      video=video,
      second_dim=p["second_dim"] if text else None,
      connector_second_dim=p["connector_second_dim"] if text else None,
  )


def _encoders(p: dict, e: dict) -> dict:
  """Typed-config fields of the autoencoders, vocoder and prompt encoders."""
  bert, gpt2, clip = e["optimus"]["bert"], e["optimus"]["gpt2"], e["clip"]
  tower = lambda w: dict(width=w[0], layers=w[1], heads=w[2], mlp_width=w[3])
  return dict(
      image_vae=dict(e["image_vae"], in_channels=3, out_ch=3, z_channels=4, embed_dim=4,
                     scale_factor=0.18215, shift_factor=0.0),
      audio_vae=dict(e["audio_vae"], in_channels=1, out_ch=1, z_channels=8, embed_dim=8,
                     scale_factor=0.9228, shift_factor=0.0),
      vocoder=dict(e["vocoder"]),
      optimus=dict(
          encoder=dict(hidden_size=bert[0], num_layers=bert[1], num_heads=bert[2],
                       intermediate_size=bert[3]),
          decoder=dict(n_embd=gpt2[0], n_layer=gpt2[1], n_head=gpt2[2]),
          latent_size=p["text_latent"], scale_factor=4.3108, shift_factor=0.0),
      clip=dict(text=tower(clip["text"]),
                vision=dict(tower(clip["vision"]), image_size=clip["image_size"],
                            patch_size=clip["patch_size"]),
                projection_dim=p["context_dim"]),
      clap=dict(
          audio=dict(mel_bins=e["clap"]["mel_bins"], hop_size=e["clap"]["hop_size"]),
          htsat=dict(spec_size=e["clap"]["spec_size"], embed_dim=e["clap"]["embed_dim"],
                     depths=e["clap"]["depths"], num_heads=e["clap"]["num_heads"]),
          joint_embed_dim=p["context_dim"], clip_samples=e["clap"]["clip_samples"]),
  )


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg not in PRESETS:
    raise ValueError(f"unknown preset {arg!r}; choose one of {sorted(PRESETS)}")
  p = PRESETS[arg]
  config = ml_collections.ConfigDict()
  config.preset = arg
  config.seed = 0

  config.model = ml_collections.ConfigDict(dict(
      image=_unet(p, p["image_channels"], 4, video=True),
      audio=_unet(p, p["audio_channels"], 8),
      text=_unet(p, p["text_channels"], p["text_latent"], text=True),
      **_encoders(p, ENCODERS[arg]),
      alignment=p["alignment"],
      # log-mel -> wave: "hifigan" (the vocoder part, as the original) or "griffin_lim" (no
      # parameters: mel inversion + Griffin-Lim, `codi_jax.audio.griffin_lim`), which the tiny
      # preset uses because a CPU-sized HiFi-GAN does not learn audible, pitched waves in minutes.
      audio_decoder="griffin_lim" if arg == "tiny" else "hifigan",
      attention_impl="xla",  # "cudnn" for the fused GPU kernel
      dtype="float32",  # compute dtype; "bfloat16" on accelerators (params stay float32)
      remat="none",  # diffuser blocks: none | full | dots (recompute in the backward pass)
  ))

  config.diffusion = ml_collections.ConfigDict(dict(
      num_timesteps=1000, beta_start=0.00085, beta_end=0.012))

  # Where our inference and the original's differ on purpose (`codi_jax.pipeline_options`):
  # `full` (the released weights, converted) behaves as the original: pixels truncated, the
  # vocoder's whole output, image inputs regularised to 512 x 512 and randomly mirrored first.
  original = arg == "full"
  config.sample = ml_collections.ConfigDict(dict(
      ddim_steps=p["ddim_steps"], eta=0.0, guidance_scale=7.5, num_samples=2,
      image_latent_size=p["image_latent"], num_frames=p["num_frames"],
      audio_latent_frames=p["audio_latent"][0], audio_latent_bins=p["audio_latent"][1],
      outputs="image,video,audio,text",
      pixel_quantization="truncate" if original else "round", trim_audio=not original,
      image_prompt_size=512 if original else 0, image_prompt_flip=original))

  # Training (`codi-jax train`, `codi_jax.train`): the stage, where it starts from, its optimiser
  # and its data. init_from: comma-separated model checkpoints (`codi_jax.checkpoint` folders,
  # e.g. earlier stages' `<workdir>/model` or a converted released CoDi); later ones win per part.
  config.stage = "diffuse_image"
  config.init_from = ""
  t = PRESET_TRAIN[arg]
  config.train = ml_collections.ConfigDict(dict(
      steps=t["steps"], batch_size=t["batch_size"],  # global batch, split over processes
      learning_rate=t["learning_rate"], warmup_steps=t["warmup_steps"],
      decay="cosine",  # cosine | constant (after warm-up)
      end_learning_rate_fraction=0.1, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8,
      grad_clip=1.0,  # per part: each part's gradient is clipped on its own
      part_learning_rates="",  # e.g. "optimus=3e-3,autokl=2e-3": peak rates overriding the above
      part_batch_sizes="",  # e.g. "optimus=128": global batches of parts trained alone
      part_decays="",  # e.g. "audioldm_vae=cosine": per part, overriding `decay`
      ema_decay=0.999, export_ema=True,
      cond_dropout=0.1,  # guidance dropout of the condition token
      # Diffusion stages: the modalities whose tokens condition the rows, one per row ("" = the
      # stage's own: text for image, video and audio, image for text, as CoDi trains; e.g.
      # "text,image" also teaches the diffuser the image tokens it is asked from).
      diffusion_conditions="",
      kl_weight=1e-6,
      # Both VAEs: decode a posterior sample (LDM) or the mode, plus a squared-error term beside
      # L1 (objectives.vae_loss says why the tiny preset, trained for minutes, uses both).
      vae_sample_posterior=arg != "tiny", vae_l2_weight=1.0 if arg == "tiny" else 0.0,
      # Synthetic data only (off for real data): pixels unlike the plain background weigh
      # 1 + vae_contrast_weight * contrast (objectives.vae_loss).
      vae_contrast_weight=0.0,
      optimus_beta=0.5, optimus_free_bits=0.5,
      # Optimus training-only options (objectives.optimus_loss): softmax "full" | "batch" (over
      # the batch's target tokens only: a sampled softmax, far cheaper than 50k-way on a CPU);
      # softmax_candidates: "batch"'s candidate count (0: one per target token, always every
      # distinct id; a cap near the ids a batch really holds is faster, and should a batch hold
      # more, the targets left out are dropped from the loss and counted in a metric);
      # word_dropout: decoder inputs -> <PAD> with this probability (against posterior collapse);
      # bow_weight: bag-of-words loss from linear_emb(z); posterior_noise 0: a deterministic
      # autoencoder on the mean. The released recipe is the plain objective (full, 0, 0, 1).
      optimus_softmax="full", optimus_softmax_candidates=0, optimus_word_dropout=0.0,
      optimus_bow_weight=0.0, optimus_posterior_noise=1.0,
      # latent_align: + weight x InfoNCE between the batch-centred environment codes of the
      # pair at logit scale `scale`, each batch noised at one timestep below max_timestep. Where
      # noise hides which latents pair the term only blurs the codes; from scratch, codes
      # trained below t = 300 told pairs apart better than over every timestep (RESULTS run 10).
      env_contrastive_weight=0.1, env_contrastive_scale=10.0,
      env_contrastive_max_timestep=1000 if arg == "full" else 300,
      # After `autoencoders`: examples the latent shift/scale are measured on (latent_stats).
      latent_stats_examples=512,
      # autoencoders / align_encoders end with their quality checks (codi_jax.quality.checks) on
      # this many held-out examples, written to <workdir>/quality.json (0: off).
      quality_examples=128,
      # align_encoders also trains the CLIP text tower: for training from scratch; a pretrained
      # (e.g. released) CLIP keeps its text space frozen as the bridge.
      align_text_encoder=arg != "full",
      # align_encoders: + this weight x each token's uniformity (objectives.uniformity_loss).
      align_uniformity_weight=0.0,
      # The autoencoders stage trains these one after the other; part:N gives the part N shares of
      # the stage's steps (default 1 each).
      # (the tiny preset decodes audio with Griffin-Lim, so it trains no vocoder).
      autoencoders=("autokl,audioldm_vae,optimus" if arg == "tiny" else
                    "autokl,audioldm_vae,hifigan_vocoder,optimus"),
      latent_align_pairs="text_image,audio_text,audio_video",
      log_every=t["log_every"], checkpoint_every=t["checkpoint_every"], keep_checkpoints=3,
      async_checkpoints=True,
      # Sample media in TensorBoard (`codi_jax.train.samples`) every sample_every steps and at
      # the last step (0: off): sample_count validation examples, DDIM with sample_ddim_steps.
      sample_every=t["sample_every"], sample_count=4, sample_ddim_steps=20))
  config.data = ml_collections.ConfigDict(dict(
      source="synthetic",  # synthetic | records | tfds
      records="",  # record shards (files, folders, globs; comma-separated) for `records`
      tfds_dir="",  # a prepared tfds dataset folder for `tfds`
      # `codi-jax cache` folders (comma-separated) of the training examples: stages whose
      # encoders are frozen (diffusers, latent alignment) then read the encoders' latents and
      # tokens from there instead of running them each step; "" runs them.
      cache="",
      image_size=t["image_size"], num_frames=p["num_frames"], audio_samples=t["audio_samples"],
      # Training's CLIP token length (CLIP's context is 77). The text tower is causal and reads
      # its output at the first end-of-text, so a caption that fits gives the same token at any
      # length; a shorter one is cheaper (longer captions are cut, keeping the end-of-text).
      clip_length=t["clip_length"], bert_length=t["bert_length"], gpt2_length=t["gpt2_length"],
      # Synthetic only: examples in pairs that differ in one attribute, kept in one batch (hard
      # negatives for align_encoders; `codi_jax.data.synthetic`).
      minimal_pairs=False,
      # Synthetic only: each visual attribute is left out of a training caption with this
      # probability (`codi_jax.data.synthetic`): captions that name some attributes, as the
      # benchmark's partial-caption joint requests do.
      caption_dropout=0.0,
      tokenizers="",  # CLIP/BERT/GPT-2 vocabulary folder (default: $CODI_TOKENIZERS, else bundled)
      num_workers=0))

  # Mesh sizes per slice (ici) and across slices (dcn); -1 takes the remaining devices.
  config.mesh = ml_collections.ConfigDict(dict(
      ici=dict(data=-1, fsdp=1, context=1, tensor=1),
      dcn=dict(data=1, fsdp=1, context=1, tensor=1)))
  config.sharding_rules = SHARDING_RULES
  return config


def with_defaults(stored: dict) -> dict:
  """A stored run config (`config.json` of a checkpoint) over its preset's defaults: a field
  added after the checkpoint was written takes its default (new fields default to the behaviour
  before them), so older checkpoints keep loading; the stored values win. A config without a
  known preset is returned as it is."""
  if not isinstance(stored, dict) or stored.get("preset") not in PRESETS:
    return stored

  def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
      both_dicts = isinstance(value, dict) and isinstance(base.get(key), dict)
      out[key] = merge(base[key], value) if both_dicts else value
    return out

  return merge(get_config(stored["preset"]).to_dict(), stored)
