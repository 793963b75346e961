r"""codi-jax demo: the main job. Trains tiny CoDi from scratch on the embedded synthetic dataset,
stage by stage, then measures and shows any-to-any generation.

  codi-jax demo [--workdir outputs/demo] [--config configs/codi.py:tiny] \
      [--steps diffuse_image=2000,latent_align=300] [--eval_examples 12] [--ddim_steps 15]

1. Trains every stage in CoDi's order (`codi_jax.train.stages.STAGES`: autoencoders, encoder
   alignment, the image, video, audio and text diffusers, latent alignment), each in
   `<workdir>/stages/<stage>` with `codi-jax train`'s semantics, initialised from the stages
   before it. Once the encoders are trained, their outputs on the training split are cached
   (`<workdir>/cache`, `codi-jax cache`) and the later stages read them from there. A finished
   stage (its `model/` exists) is reused; an interrupted one resumes from its newest
   checkpoint, so stopping the demo and running it again loses at most a few steps.
2. Merges the stages' models into `<workdir>/model` (a checkpoint `generate`, `sample` and `eval`
   read; later stages win per part).
3. Chooses the guidance scale by a small sweep on validation examples (`GUIDANCE_CANDIDATES`,
   recorded in the model's `config.sample.guidance_scale`), then runs the any-to-any benchmark
   (`codi_jax.evaluate`, the same as `codi-jax eval`) on held-out examples: every single input
   -> output pair, multi-input conditioning and joint generation (full, partial and no captions),
   scored by the dataset's analyzers; writes the gallery `<workdir>/gallery/index.html` (inputs
   beside outputs), `<workdir>/report.md` and `<workdir>/report.json`.
"""

from __future__ import annotations

import json
import logging as py_logging
import pathlib
import time

from absl import flags, logging

from codi_jax.commands import common
from codi_jax.io_utils import atomic_write_json, atomic_write_text

WORKDIR = flags.DEFINE_string("workdir", "outputs/demo", "Where the demo writes everything.")
STEPS = flags.DEFINE_list("steps", [], "Per-stage step counts overriding the demo's, e.g. "
                          "diffuse_image=600,latent_align=300.")
EVAL_EXAMPLES = flags.DEFINE_integer("eval_examples", 48,
                                     "Held-out examples per input -> output pair in the report.")
DDIM_STEPS = flags.DEFINE_integer("ddim_steps", 15, "DDIM steps of the generated examples.")
SWEEP_EXAMPLES = flags.DEFINE_integer(
    "sweep_examples", 8, "Validation examples per single pair in the guidance sweep.")
TOKENIZERS = flags.DEFINE_string("tokenizers", None, common.TOKENIZERS_HELP)

# Per stage: its steps and the `config.train` fields it sets beside them (sized for 2 CPU cores;
# benchmarks/RESULTS.md has the measured times and what the model reaches). The image VAE weighs
# the object's pixels up (`vae_contrast_weight`: the demo's data is always the synthetic set, one
# small object on a plain background) and trains at batch 8 (1,200 steps at 8 read shapes better
# than 600 at 16 in the same time: image shape 0.82 against 0.76). Optimus learns what a caption
# says only at a large batch (at 16 its latent carries the sentence's template, not its words),
# with the batch softmax (at most 256 candidates: a batch of 128 captions holds ~90 distinct ids),
# a bag-of-words loss and the posterior mean as the latent (`objectives.optimus_loss`); text is
# cheap, so it gets batch 128 and the largest share (1,500 steps: text position 0.99 and motion
# 0.98, from 0.91 and 0.92 after 1,000). Its encoder keeps moving until the end of this budget,
# so the stage keeps a constant rate and exports its last parameters (an EMA averages encoder and
# decoder states that do not match; measured: text size and rhythm 0.77 with the EMA, 0.95
# without; position 0.57 after a cosine decay, 0.93 at a constant rate). The audio VAE's short
# phase ends on a cosine decay (round-trip timbre 0.81 with it, 0.59 at a constant rate).
# Contrastive alignment needs a batch where the negatives differ in more than one attribute, and
# steps: position is read from the tokens at 0.32 after 300 steps, 0.65-0.72 after 600. It also
# needs negatives that differ in one attribute only: the synthetic data's minimal pairs
# (`config.data.minimal_pairs`) raise image position from 0.72 to 0.80 and retrieval from 0.78
# to 0.86. The two members of a pair then start with nearly equal tokens on both sides (a video's
# frames are averaged), a saddle the cross-modal loss alone leaves slowly; a uniformity term
# (`align_uniformity_weight`) pushes every tower's tokens apart and carries position to 0.95-0.97
# and motion from 0.30 to 0.50 (weight 1.0 also reaches motion 0.52 but costs colour and shape).
# The image diffuser learns its condition only with more examples than 800 steps at batch 8
# give it: its stage check (epsilon-MSE with the example's own text token against another's)
# then gains 0.07-0.10; at batch 32 and learning rate 3e-3 for 1,200 steps it gains 0.46-0.77,
# and text -> image reads colour 0.96, shape 0.71, size 0.96, position 0.96 (48 examples).
# The text diffuser is cheap per step and needs many examples: after 600 steps at batch 8 every
# `* -> text` output was the same caption; 4,000 steps at batch 128 gain 0.44-0.84. Learning from
# image tokens alone (CoDi's pairing), text -> text read 0.27-0.77; with each row conditioned on
# its image's or its caption's token (`diffusion_conditions`) text -> text reads 0.83-0.96 and
# image -> text 0.85-0.92 (motion 0.40; 4-10 % unreadable). The image diffuser keeps text alone:
# text + image tokens lifted image -> image shape (0.58 -> 0.73) but cost text -> image colour
# (0.96 -> 0.73) in the same steps.
# The audio diffuser learns from many small batches: 800 steps at batch 32 (913 s) gained
# 0.17-0.22 and read text -> audio pitch 0.56, timbre 0.27; 4,000 steps at batch 8 (834 s)
# gain 0.25-0.39 and read pitch 0.96, timbre 0.69, rhythm 0.98 (none unreadable). A third
# level with attention at 4 x 4 only was cheaper per step and worse (0.06-0.09 in 800 at 32).
# A stage's `data` entry updates `config.data`.
DEMO_STAGES = {
    "autoencoders": dict(steps=2900, batch_size=16,
                         autoencoders="autokl:12,audioldm_vae:2,optimus:15",
                         part_learning_rates="autokl=3e-3,optimus=3e-3",
                         part_batch_sizes="optimus=128,autokl=8", vae_contrast_weight=10.0,
                         optimus_softmax="batch", optimus_softmax_candidates=256,
                         optimus_bow_weight=1.0, optimus_posterior_noise=0.0, decay="constant",
                         export_ema=False, part_decays="audioldm_vae=cosine"),
    "align_encoders": dict(steps=600, batch_size=128, align_uniformity_weight=0.3,
                           data=dict(minimal_pairs=True)),
    "diffuse_image": dict(steps=1200, batch_size=32, learning_rate=3e-3),
    "diffuse_video": dict(steps=100),
    "diffuse_audio": dict(steps=4000, batch_size=8, learning_rate=3e-3),
    "diffuse_text": dict(steps=4000, batch_size=128, learning_rate=3e-3,
                         diffusion_conditions="image,text"),
    # Its checks run three joint pairs: 64 examples (the retrieval group) keep them near 2 min.
    "latent_align": dict(steps=90, quality_examples=64),
}


# The guidance scales tried on --sweep_examples validation examples per single pair before the
# benchmark; the best is recorded in the model's config (at 7.5 the text diffuser's latents
# decode to 85 % unreadable captions, at 4 to 55 %, at 2 to 31 %; benchmarks/RESULTS.md run 8).
GUIDANCE_CANDIDATES = (1.0, 2.0, 4.0)
CACHE_DIR = "cache"  # under the workdir: the encoders' outputs the frozen-encoder stages read
CHECKPOINT_EVERY = 500  # steps between a stage's checkpoints (a hard kill loses at most these)


def stage_steps(overrides: list[str]) -> dict[str, int]:
  steps = {stage: settings["steps"] for stage, settings in DEMO_STAGES.items()}
  for item in overrides:
    name, sep, value = item.partition("=")
    if not sep or name not in steps:
      raise SystemExit(f"codi-jax demo: --steps takes stage=N with a stage among "
                       f"{', '.join(steps)}; got {item!r}")
    try:
      steps[name] = int(value)
    except ValueError:
      raise SystemExit(f"codi-jax demo: --steps {item!r}: N must be an integer") from None
    if steps[name] < 1:
      raise SystemExit(f"codi-jax demo: --steps {item!r}: N must be positive")
  return steps


def train_stages(config, workdir: pathlib.Path, steps: dict[str, int]) -> list[dict]:
  """Trains the stages in order (reusing finished ones); returns one summary per stage."""
  from codi_jax.train.loop import MODEL_DIR, train
  from codi_jax.train.stages import FROZEN_ENCODER_STAGES, STAGES

  summaries, models, cached = [], [], None
  for index, stage in enumerate(STAGES, 1):
    run_dir = workdir / "stages" / stage
    model_dir = run_dir / MODEL_DIR
    if stage in FROZEN_ENCODER_STAGES and cached is None and not model_dir.is_dir():
      encoders = [m for s, m in zip(STAGES, models) if s not in FROZEN_ENCODER_STAGES]
      cached = cache_training_split(config, encoders, workdir / CACHE_DIR)
    if model_dir.is_dir():
      print(f"[{index}/{len(STAGES)}] {stage}: done earlier, reusing {model_dir}")
      summaries.append(_finished_summary(stage, run_dir))
    else:
      print(f"[{index}/{len(STAGES)}] {stage}: training {steps[stage]} steps")
      stage_config = config.copy_and_resolve_references()
      stage_config.unlock()
      stage_config.stage = stage
      settings = dict(DEMO_STAGES[stage])
      stage_config.data.update(settings.pop("data", {}))
      stage_config.train.update(settings, steps=steps[stage])
      stage_config.init_from = ",".join(str(m) for m in models)
      stage_config.data.cache = str(cached) if stage in FROZEN_ENCODER_STAGES else ""
      stage_config.train.sample_every = 0  # the gallery at the end shows what the model makes
      # A save costs ~2-3 s of the 2 cores; SIGTERM (Ctrl-C, preemption) saves anyway.
      stage_config.train.checkpoint_every = CHECKPOINT_EVERY
      start = time.perf_counter()
      summary = train(stage_config, str(run_dir))
      if summary.preempted:
        raise SystemExit(f"codi-jax demo: stopped during {stage}; run the same command to resume")
      result = dict(stage=stage, steps=summary.end_step, resumed_from=summary.resumed_from,
                    final_loss=summary.final_loss, seconds=round(time.perf_counter() - start, 1),
                    quality=_quality(run_dir))
      atomic_write_json(run_dir / "summary.json", result)
      summaries.append(result)
    models.append(model_dir)
  return summaries


def cache_training_split(config, models: list[pathlib.Path], out: pathlib.Path) -> pathlib.Path:
  """The frozen encoders of the stages trained so far over the synthetic training split, once
  (`codi-jax cache`; a re-run finds its shards done): the diffusers and latent alignment read
  latents and tokens from it instead of running the encoders every step."""
  from codi_jax.data import synthetic
  from codi_jax.train import data as train_data

  print(f"caching the frozen encoders' outputs on the training split in {out}")
  source = synthetic.SplitSource(train_data.synthetic_config(config), "train")
  summary = train_data.cache_examples(
      config, [str(m) for m in models], source, dict(source="synthetic", split="train"), out,
      name="train", seed=config.seed, batch_size=64, shard_size=1024,
      tokenizers=config.data.tokenizers or None)
  print(f"  {summary.written} examples cached ({summary.shards_skipped} shards done earlier), "
        f"{summary.seconds:.0f} s")
  return out


def _finished_summary(stage: str, run_dir: pathlib.Path) -> dict:
  path = run_dir / "summary.json"
  if path.is_file():
    return dict(json.loads(path.read_text()), reused=True)
  return dict(stage=stage, reused=True)


def _quality(run_dir: pathlib.Path) -> dict | None:
  """The stage's quality checks (`<run>/quality.json`), where the stage has them."""
  from codi_jax.train.loop import QUALITY_FILE
  path = run_dir / QUALITY_FILE
  return json.loads(path.read_text()) if path.is_file() else None


def merge_models(workdir: pathlib.Path) -> pathlib.Path:
  """`<workdir>/model`: every part from the last stage that holds it."""
  from codi_jax import checkpoint
  from codi_jax.train.loop import MODEL_DIR
  from codi_jax.train.stages import STAGES

  out = workdir / MODEL_DIR
  params, config = {}, None
  for stage in STAGES:
    config, stage_params = checkpoint.load_model(workdir / "stages" / stage / MODEL_DIR)
    params.update(stage_params)
  checkpoint.save_model(out, params, config, overwrite=True)
  return out


def report_markdown(config, summaries: list[dict], result: dict, seconds: float) -> str:
  from codi_jax.eval_report import format_report, format_sweep
  from codi_jax.quality.checks import Check, format_table

  lines = ["# codi-jax demo report", "",
           f"Preset `{config.preset}`, trained from scratch on the synthetic paired dataset; "
           f"total {seconds / 60:.1f} min.", "",
           "| stage | steps | final loss | seconds | from |", "|---|---|---|---|---|"]
  for s in summaries:
    loss = s.get("final_loss")
    lines.append(f"| {s['stage']} | {s.get('steps', '')} | "
                 f"{'' if loss is None else f'{loss:.4f}'} | {s.get('seconds', '')} | "
                 f"{'reused' if s.get('reused') else s.get('resumed_from', '')} |")
  for s in summaries:
    quality = s.get("quality")
    if quality:
      lines += ["", f"## {s['stage']}: quality checks", "", "```",
                format_table({k: Check.from_json(v) for k, v in quality.items()}), "```"]
  lines += ["", "## Any-to-any benchmark", "", "```"]
  if "guidance_sweep" in result:
    lines += [format_sweep(result["guidance_sweep"]), ""]
  lines += [format_report(result), "```", ""]
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  del argv
  from codi_jax import eval_report, evaluate
  from codi_jax.pipeline import CoDiPipeline

  logging.set_verbosity(logging.WARNING)
  py_logging.getLogger("absl").setLevel(py_logging.WARNING)
  config = common.CONFIG.value
  workdir = pathlib.Path(WORKDIR.value)
  steps = stage_steps(STEPS.value)
  if TOKENIZERS.value:  # the stages' training and the benchmark read the same vocabularies
    config.data.tokenizers = TOKENIZERS.value
  start = time.perf_counter()
  summaries = train_stages(config, workdir, steps)
  model_dir = merge_models(workdir)
  print(f"model: {model_dir}")
  pipeline = CoDiPipeline.from_checkpoint(model_dir, config.data.tokenizers)
  sweep = evaluate.sweep_guidance(pipeline, GUIDANCE_CANDIDATES, num_examples=SWEEP_EXAMPLES.value,
                                  ddim_steps=DDIM_STEPS.value, seed=config.seed)
  evaluate.record_guidance(model_dir, sweep)
  print(eval_report.format_sweep(sweep))
  result = evaluate.evaluate(pipeline, num_examples=EVAL_EXAMPLES.value,
                             ddim_steps=DDIM_STEPS.value, guidance_scale=sweep["best"],
                             seed=config.seed, gallery=workdir / "gallery")
  result["guidance_sweep"] = sweep
  seconds = time.perf_counter() - start
  result["training"] = summaries
  atomic_write_json(workdir / "report.json", result)
  if common.JSON.value:
    atomic_write_json(common.JSON.value, result)
  atomic_write_text(workdir / "report.md", report_markdown(config, summaries, result, seconds))
  print(eval_report.format_report(result))
  print(f"\ndemo done in {seconds / 60:.1f} min. Outputs in {workdir.resolve()}:")
  print("  gallery/index.html  any-to-any examples, inputs beside outputs")
  print("  report.md           training summary and the benchmark (report.json: every number)")
  print(f"  model/              the trained tiny CoDi (codi-jax generate --ckpt {model_dir})")
  print("  stages/<stage>/     each stage's checkpoints, metrics.jsonl, tensorboard/")
  return 0
