r"""codi-jax eval: the any-to-any benchmark on held-out synthetic examples (`codi_jax.evaluate`).

  codi-jax eval --ckpt CKPT [--json eval.json] [--out outputs/eval] [--num_examples 32] \
      [--ddim_steps 25] [--guidance_scale G | --guidance_sweep 2,4,7.5] [--seed 0] \
      [--split test] [--tokenizers DIR]

Generates every single input -> single output pair over text, image, video and audio, a few
multi-input requests and joint text -> image+audio / video+audio (alignment others, self and
none) from the checkpoint, reads the outputs back with the dataset's analyzers and prints one
table per section and a summary against the accuracy bars (colour and pitch >= 0.9, size,
position and rhythm >= 0.8, the others >= 0.7, joint agreement others > self). --json writes
every number, --out a gallery (index.html) of the first examples. The guidance scale is the
checkpoint's `config.sample.guidance_scale` unless --guidance_scale is given; --guidance_sweep
first scores the single pairs at each scale on --sweep_examples validation examples and records
the best in the checkpoint (a small sweep on data the test split does not share). The exit
status is 0 whatever the scores (it is a measurement); it is non-zero only when the evaluation
itself fails.

  codi-jax eval --stage_checks --ckpt CKPT [--json quality.json] [--num_examples 128]

instead runs the training stages' quality checks (`codi_jax.quality.checks`: the autoencoders'
round trips read by the analyzers, the normalised latents' std, the prompt encoders' attribute
probes and cross-modal retrieval, each diffuser's condition sensitivity) that the parts the
checkpoint holds allow, prints a table and with --json writes `{name: {"value", "bar", "met"}}`.
"""

from __future__ import annotations

import pathlib

from absl import flags

from codi_jax import eval_report, evaluate
from codi_jax.commands import common
from codi_jax.data import synthetic
from codi_jax.io_utils import atomic_write_json
from codi_jax.pipeline import CoDiPipeline


CKPT = flags.DEFINE_string("ckpt", None, "Model checkpoint folder (`codi_jax.checkpoint`).")
OUT = flags.DEFINE_string("out", None, "Also write a gallery (index.html + media) here.")
NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 32, "Held-out examples per task.")
STEPS = flags.DEFINE_integer("ddim_steps", 25, "DDIM steps.")
GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale "
                               "(default: the checkpoint's config.sample.guidance_scale).")
SWEEP = flags.DEFINE_list(
    "guidance_sweep", [], "Guidance scales to try first on --sweep_examples validation examples "
    "(single pairs); the best is written into the checkpoint's config.sample.guidance_scale and "
    "the benchmark runs with it.")
SWEEP_EXAMPLES = flags.DEFINE_integer("sweep_examples", 8,
                                      "Validation examples per pair in --guidance_sweep.")
SPLIT = flags.DEFINE_enum("split", "test", list(synthetic.SPLITS), "Synthetic dataset split.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Requests per compiled program call.")
GALLERY_EXAMPLES = flags.DEFINE_integer("gallery_examples", 2,
                                        "Examples shown in the --out gallery.")
TOKENIZERS = flags.DEFINE_string("tokenizers", None, common.TOKENIZERS_HELP)
STAGE_CHECKS = flags.DEFINE_bool(
    "stage_checks", False, "Run the training stages' quality checks that the checkpoint's parts "
    "allow instead of the generation benchmark (--num_examples: held-out examples, at least 64).")


def run_stage_checks() -> dict:
  from codi_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from codi_jax.quality import checks  # pylint: disable=import-outside-toplevel
  from codi_jax.train.data import load_tokenizers  # pylint: disable=import-outside-toplevel
  if not CKPT.value:
    raise ValueError("--ckpt is required")
  stages = checks.applicable_stages(checkpoint.saved_parts(CKPT.value))
  if not stages:
    raise ValueError(f"{CKPT.value} holds none of the parts the stage checks read "
                     f"({', '.join(p for parts, _ in checks.STAGE_CHECKS.values() for p in parts)})")
  result = checks.check_model(CKPT.value, stages, num_examples=NUM_EXAMPLES.value,
                              tokenizers=load_tokenizers(TOKENIZERS.value))
  print(checks.format_table(result))
  if common.JSON.value:
    atomic_write_json(common.JSON.value, checks.as_json(result))
  return result


def run() -> dict:
  if not CKPT.value:
    raise ValueError("--ckpt is required")
  pipe = CoDiPipeline.from_checkpoint(CKPT.value, TOKENIZERS.value)
  seed = pipe.config.seed if common.SEED.value is None else common.SEED.value
  sweep = None
  if SWEEP.value:
    if GUIDANCE.value is not None:
      raise ValueError("give --guidance_scale or --guidance_sweep, not both")
    try:
      candidates = [float(g) for g in SWEEP.value]
    except ValueError:
      raise ValueError(f"--guidance_sweep takes numbers, got {SWEEP.value}") from None
    sweep = evaluate.sweep_guidance(pipe, candidates, num_examples=SWEEP_EXAMPLES.value,
                                    ddim_steps=STEPS.value, seed=seed,
                                    batch_size=BATCH_SIZE.value)
    evaluate.record_guidance(CKPT.value, sweep)
    print(eval_report.format_sweep(sweep))
    guidance = sweep["best"]
  else:
    guidance = (float(pipe.config.sample.guidance_scale) if GUIDANCE.value is None
                else GUIDANCE.value)
  result = evaluate.evaluate(
      pipe, num_examples=NUM_EXAMPLES.value, ddim_steps=STEPS.value,
      guidance_scale=guidance, seed=seed, split=SPLIT.value, batch_size=BATCH_SIZE.value,
      gallery=OUT.value, gallery_examples=GALLERY_EXAMPLES.value)
  result["settings"]["checkpoint"] = str(pathlib.Path(CKPT.value).resolve())
  if sweep is not None:
    result["guidance_sweep"] = sweep
  if common.JSON.value:
    atomic_write_json(common.JSON.value, result)
  return result


def main(argv: list[str]) -> int:
  del argv
  try:
    if STAGE_CHECKS.value:
      run_stage_checks()
      if common.JSON.value:
        print(f"Wrote JSON {pathlib.Path(common.JSON.value).resolve()}")
      return 0
    result = run()
  except (ValueError, FileNotFoundError) as e:  # media.MediaError is a ValueError
    raise SystemExit(f"codi-jax eval: error: {e}") from None
  print(eval_report.format_report(result))
  written = [f"JSON {pathlib.Path(common.JSON.value).resolve()}" if common.JSON.value else "",
             f"gallery {pathlib.Path(OUT.value).resolve() / 'index.html'}" if OUT.value else ""]
  written = [w for w in written if w]
  if written:
    print("Wrote " + ", ".join(written))
  return 0
