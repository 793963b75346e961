"""Parity handler for end-to-end fixtures (`codi_e2e.npz`): the whole pipeline vs the original's.

The fixture records the original's own inference (`model_module.inference` + `decode`) on a tiny
random-weight CoDi (`tests/fixtures/codi_e2e/README.md`). The handler builds the run config from
the fixture's original configs (`convert.original.run_config_from_original`: the original's
inference behaviour, `pipeline_options.ORIGINAL`), converts its weights with the code
`codi-jax convert` runs (`checkpoint.convert_state`), and runs every case through `CoDiPipeline`
itself: `plan` -> `conditions` / `prepare` (with the stored x_T as `initial_noise`, moved to
channels last, the recorded flip of an image input as `image_flip` and, for a non-square one,
the crop offset that reproduces the stored regularised image as `image_crop`) -> the jitted
`program_fn` of a tracing `Program` (the one `generate` and `sample` compile, plus its
intermediates) -> `finish`. Text is decoded greedily (the fixture's deterministic decode); the
original's multinomial draw cannot be replayed, so its sampled tokens are checked by teacher
forcing: GPT-2 on the stored tokens with our latent gives each step's top-16 logits and
logsumexp, and our text post-processing of the stored tokens gives the stored strings.

Tolerances (`atol + rtol * max|reference|`), from the fixture README's float64 rerun (the
original's own float32 rounding: 1e-7 on tokens, ~1e-5 relative on latents and decoders):
  condition tokens, mixed context       atol 1e-4
  latents (x_t, pred_x0, final), decoded images, mel, waveform, GPT-2 latent   rtol 1e-4
  teacher-forced logits (top-16 values, logsumexp, chosen)   rtol 1e-4 (of max |logit| ~20)
  CLIP pixel values                     1e-5 (exact up to float rounding)
  uint8 pixels                          off by one in at most 0.5 % of values (truncation
                                        boundaries; the float64 rerun moves 0.04 %)
  token ids, strings, regularised image exact
Nothing depends on the fixture's sizes or seeds: they are all read from its config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax import checkpoint
from codi_jax.convert.layout import to_channels_first, to_channels_last
from codi_jax.convert.original import run_config_from_original
from codi_jax.data.preprocess import from_unit_range
from codi_jax.modality import Alignment, Modality
from codi_jax.models.clip_preprocess import preprocess
from codi_jax.models.optimus import PAD_ID, Optimus
from codi_jax.parity.diffusion import Produced
from codi_jax.parity.fixtures import Covered, Fixture
from codi_jax.pipeline import CoDiPipeline, Program, Settings, load_tokenizers
from codi_jax.pipeline_options import TextDecoding, regularize_image

TOKEN_TOL = (1e-4, 0.0)
LATENT_TOL = (0.0, 1e-4)
LOGITS_TOL = (0.0, 1e-4)
PIXEL_VALUES_TOL = (1e-5, 1e-5)
PIXELS_U8_TOL = (1.0, 0.0, 0.005)  # (atol, rtol, largest fraction of values that may differ)
EXACT = (0.0, 0.0)
TOP_K = 16  # logits the fixture keeps per decoding step
NO_TOKEN = -1  # the fixture pads token ids after <EOS> with it


def build_pipeline(fx: Fixture) -> CoDiPipeline:
  """The fixture's whole tiny CoDi as a pipeline: config from its original configs, weights
  through the converter, tokenizers from `vocab_dir()`."""
  cfg = fx.config
  p = cfg["params"]["clap"]
  sizes = dict(spec_size=p["spec"], embed_dim=p["embed_dim"], depths=tuple(p["depths"]),
               num_heads=tuple(p["heads"]), window_size=p["window"])
  config = run_config_from_original(cfg["codi_cfg"], clip=cfg["clip"],
                                    hifigan=cfg["hifigan_config"],
                                    clap_model_cfg=cfg["clap_model_cfg"], htsat_sizes=sizes)
  _, params = checkpoint.convert_state(fx.weights, config)
  return CoDiPipeline(config, params, load_tokenizers())


def e2e_outputs(fx: Fixture) -> Produced:
  """Every stored output of every case (and the regularised image input), computed."""
  pipe = build_pipeline(fx)
  programs: dict[Program, Any] = {}  # compiled once, shared by cases of one shape
  produced: Produced = {}
  for case, spec in fx.config["cases"].items():
    produced.update(_case(pipe, fx, case, spec, programs))
  return produced


def _inputs(fx: Fixture, case: str, types: list[Modality]) -> dict[Modality, Any]:
  """The stored inputs of a case, in condition order, as the pipeline takes them."""
  out = {}
  for m in types:
    if m is Modality.TEXT:
      out[m] = fx.meta[f"{case}/text"]
    elif m is Modality.IMAGE:
      out[m] = fx.inputs[f"{case}/image_uint8"]
    elif m is Modality.AUDIO:
      out[m] = fx.inputs[f"{case}/audio_wave_16k"][0]  # [1, S] -> [S]
    else:
      raise ValueError(f"{case}: video conditions are not covered by the end-to-end parity "
                       "(the original's regularize_video is not implemented)")
  return out


def _crop_offset(pipe: CoDiPipeline, fx: Fixture, case: str, flip: bool) -> int | None:
  """Where the original's RandomCrop cut a non-square image input (drawn from torch's RNG and
  not recorded): the one offset whose regularised image is the stored one. None for a square
  image (nothing to cut) or when no offset reproduces it (then the regularised image and the
  image tokens fail, naming it)."""
  image = fx.inputs[f"{case}/image_uint8"]
  h, w = image.shape[:2]
  stored = fx.inputs[f"{case}/image_regularized_uint8_chw"]
  size = pipe.options.image_prompt_size
  for offset in range(max(h, w) - min(h, w) + 1 if h != w else 0):
    x = regularize_image(image, size, flip=flip, offset=offset)
    if np.array_equal(to_channels_first(Modality.IMAGE, from_unit_range(x)), stored):
      return offset
  return None


def _plan(pipe: CoDiPipeline, fx: Fixture, case: str, spec: Mapping[str, Any],
          types: list[Modality]) -> Settings:
  outputs = [Modality.parse(m) for m in spec["xtype"]]
  flip = crop = None
  if Modality.IMAGE in types:
    flip = bool(spec["random_horizontal_flip_applied"])
    crop = _crop_offset(pipe, fx, case, flip)
  settings = pipe.plan(types, outputs, weights={m: spec["mix_weight"][m.value] for m in types},
                       guidance_scale=spec["scale"], ddim_steps=spec["ddim_steps"],
                       eta=spec["eta"], num_samples=spec["n_samples"],
                       image_size=spec["image_size"], num_frames=spec["num_frames"],
                       alignment=Alignment.SELF, text_decoding=TextDecoding.GREEDY,
                       image_flip=flip, image_crop=crop)
  for m, shape in zip(outputs, spec["latent_shapes"]):
    want = to_channels_last(m, np.zeros(shape, np.int8)).shape
    if tuple(settings.latent_shapes[m.value]) != want:
      raise ValueError(f"{case}: our {m.value} latent is {settings.latent_shapes[m.value]}, the "
                       f"original's {shape} ({list(want)} channels last)")
  return settings


def _case(pipe: CoDiPipeline, fx: Fixture, case: str, spec: Mapping[str, Any],
          programs: dict[Program, Any]) -> Produced:
  types = [Modality.parse(t) for t in spec["condition_types"]]
  inputs = _inputs(fx, case, types)
  settings = _plan(pipe, fx, case, spec, types)
  n = settings.num_samples
  rows_of = lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)[1:])  # one encode, n rows
  produced: Produced = {}

  # Conditioning, per input in condition order, then mixed: [uncond; cond] as the original.
  conditions = pipe.conditions(settings, inputs)
  for j, m in enumerate(types):
    key = f"{case}/cond{j}_{m.value}"
    cond, uncond = (rows_of(x) for x in conditions.inputs[m])
    produced[f"{key}/cond"] = (cond, TOKEN_TOL)
    produced[f"{key}/uncond"] = (uncond, TOKEN_TOL)
    produced[f"{case}/condition_{j}_uncond_cond"] = (np.concatenate([uncond, cond]), TOKEN_TOL)
    if m is Modality.TEXT:
      tokenizer = pipe.encoders.tokenizer
      produced[f"{key}/token_ids_cond"] = (tokenizer.encode_batch([inputs[m]] * n), EXACT)
      produced[f"{key}/token_ids_uncond"] = (tokenizer.encode_batch([""] * n), EXACT)
    elif m is Modality.IMAGE:
      x = pipe.condition_input(settings, m, inputs[m])  # [1, S, S, 3] in [-1, 1]
      produced[f"input/{case}/image_regularized_uint8_chw"] = (
          to_channels_first(m, from_unit_range(x[0])), EXACT)
      pre = pipe.encoders.clip.preprocess_config
      for name, image in (("cond", x), ("uncond", np.zeros_like(x))):
        pixels = to_channels_first(m, preprocess(image, pre))  # [1, 3, s, s]
        produced[f"{key}/pixel_values_{name}"] = (rows_of(pixels), PIXEL_VALUES_TOL)

  initial = {m: to_channels_last(m, fx.inputs[f"{case}/x_T_{m}"]) for m in settings.outputs}
  rows = pipe.prepare(settings, inputs, initial_noise=initial)
  produced[f"{case}/mixed_context"] = (np.concatenate([rows.uncond, rows.cond]), TOKEN_TOL)

  program = Program.of(settings, trace=True)
  if program not in programs:
    programs[program] = jax.jit(pipe.program_fn(program))
  raw = jax.tree_util.tree_map(np.asarray,
                               programs[program](pipe.program_params(program), rows))
  generated = pipe.finish(settings, raw)
  for name in settings.outputs:
    m = Modality(name)
    first = lambda x, mod=m: to_channels_first(mod, x)
    produced[f"{case}/final_latent_{name}"] = (first(raw[f"latent_{name}"]), LATENT_TOL)
    for trace in ("x_t", "pred_x0"):  # ours [B, steps, ...] -> [steps, B, ...]
      produced[f"{case}/{trace}_{name}"] = (first(np.moveaxis(raw[f"{trace}_{name}"], 1, 0)),
                                            LATENT_TOL)
    if m is Modality.IMAGE:
      produced[f"{case}/decoded_image"] = (first(raw["decoded_image"]), LATENT_TOL)
      produced[f"{case}/pixels_image_uint8_hwc"] = (generated.image, PIXELS_U8_TOL)
    elif m is Modality.VIDEO:  # the original's decoded video is [B, F, 3, H, W]
      produced[f"{case}/decoded_video"] = (np.moveaxis(raw["decoded_video"], -1, 2), LATENT_TOL)
      produced[f"{case}/pixels_video_uint8_fhwc"] = (generated.video, PIXELS_U8_TOL)
    elif m is Modality.AUDIO:
      produced[f"{case}/mel_audio"] = (first(raw["mel_audio"]), LATENT_TOL)
      produced[f"{case}/waveform_audio"] = (generated.audio[:, None], LATENT_TOL)
    else:
      produced.update(_text(pipe, fx, case, settings, raw, generated.text))
  return produced


def _padded(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """Token ids with everything after each row's <EOS> set to the fixture's -1."""
  return np.where(np.arange(ids.shape[1]) < lengths[:, None], ids, NO_TOKEN).astype(np.int64)


def _lengths(ids: np.ndarray) -> np.ndarray:
  """Tokens per row of fixture ids (<BOS> ... <EOS>, padded with -1)."""
  return np.sum(ids != NO_TOKEN, axis=1)


def _text(pipe: CoDiPipeline, fx: Fixture, case: str, settings: Settings,
          raw: Mapping[str, np.ndarray], texts: list[str]) -> Produced:
  """Greedy ids and strings, the GPT-2 latent, and teacher-forced logits of both decodes."""
  ids, lengths = raw["text_ids"], raw["text_lengths"]
  latent = raw["text_latent"]  # [B, Z]
  gpt2 = pipe.tokenizers.gpt2
  produced: Produced = {
      f"{case}/gpt_past_latent": (latent, LATENT_TOL),
      f"{case}/gpt_context_ids": (ids[0, :1].astype(np.int64), EXACT),
      f"{case}/text_greedy_token_ids": (_padded(ids, lengths), EXACT),
      f"meta/{case}/text_greedy_final": (np.asarray(texts), EXACT),
      f"meta/{case}/text_greedy_raw": (np.asarray(
          [gpt2.decode_generated(row[:k].tolist()) for row, k in zip(ids, lengths)]), EXACT)}
  # The original's sampled tokens through our post-processing (`finish`) and GPT-2.
  sampled = fx.outputs[f"{case}/text_sampled_token_ids"]
  k = _lengths(sampled)
  as_raw = {"text_ids": np.where(sampled == NO_TOKEN, PAD_ID, sampled), "text_lengths": k}
  produced[f"meta/{case}/text_sampled_final"] = (
      np.asarray(pipe.finish(dataclasses.replace(settings, outputs=("text",)), as_raw).text),
      EXACT)
  produced[f"meta/{case}/text_sampled_raw"] = (np.asarray(
      [gpt2.decode_generated(row[:n].tolist()) for row, n in zip(sampled, k)]), EXACT)
  for name in ("sampled", "greedy"):
    reference = fx.outputs[f"{case}/text_{name}_token_ids"]
    produced.update(_teacher_forced(pipe, latent, reference, f"{case}/text_{name}"))
  produced[f"{case}/text_sampled_token_ids"] = (Covered(
      "torch.multinomial draws cannot be replayed; checked by teacher forcing",
      tuple(f"{case}/text_sampled_{s}" for s in ("logits_topk_values", "logits_topk_ids",
                                                 "logits_logsumexp", "chosen_logit"))), EXACT)
  return produced


def _teacher_forced(pipe: CoDiPipeline, latent: np.ndarray, ids: np.ndarray, prefix: str
                    ) -> Produced:
  """GPT-2 on the reference tokens with our latent: row t of sample b is the logits after
  ids[b, :t+1] (one causal forward per sample), as the fixture's decoding records."""
  k = _lengths(ids)
  fed = np.where(ids == NO_TOKEN, PAD_ID, ids)[:, :-1]  # positions after a row's end are unread
  logits = np.asarray(jax.jit(lambda p, x, z: pipe.optimus.apply(
      {"params": p}, x, z, method=Optimus.decode_logits))(
          pipe.params["optimus"], jnp.asarray(fed), jnp.asarray(latent)))  # [B, T, V]
  steps = [(b, t) for b in range(ids.shape[0]) for t in range(k[b] - 1)]
  table = np.stack([logits[b, t] for b, t in steps])  # [rows, V]
  top = np.argsort(-table, axis=-1, kind="stable")[:, :TOP_K]
  lse = np.log(np.sum(np.exp(table.astype(np.float64) - table.max(-1, keepdims=True)), -1)) \
      + table.max(-1)
  chosen = np.asarray([logits[b, t, ids[b, t + 1]] for b, t in steps])
  return {
      f"{prefix}_logits_topk_values": (np.take_along_axis(table, top, -1), LOGITS_TOL),
      f"{prefix}_logits_topk_ids": (top.astype(np.int64), EXACT),
      f"{prefix}_logits_logsumexp": (lse, LOGITS_TOL),
      f"{prefix}_chosen_logit": (chosen, LOGITS_TOL),
      f"{prefix}_step_sample_index": (np.asarray([b for b, _ in steps], np.int64), EXACT),
      f"{prefix}_logits_step0_full": (logits[:, 0], LOGITS_TOL),
  }
