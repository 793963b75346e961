r"""codi-jax train: train one CoDi stage (see `codi_jax.train.stages`), resumable and sharded.

  codi-jax train --config configs/codi.py:tiny --config.stage=diffuse_image --workdir W \
      [--config.init_from=W_prev/model,...] [--config.train.steps=1000] [--config.mesh.ici.fsdp=4]

Stages, in CoDi's order: autoencoders, align_encoders, diffuse_image, diffuse_video,
diffuse_audio, diffuse_text, latent_align. A run resumes from the newest complete checkpoint in
W, else starts from `config.init_from` (model checkpoints: earlier stages' `W/model` folders or
a converted released CoDi), else from scratch. SIGTERM checkpoints and exits cleanly. Outputs in
W: checkpoints/, metrics.jsonl, tensorboard/ and, at the end, model/ (a model checkpoint).
Every process of a multi-host job runs this same command (`launch/`).
"""

from __future__ import annotations

import json

from absl import flags, logging

from codi_jax.commands import common
from codi_jax.io_utils import atomic_write_json

WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, the model.")
NO_EXPORT = flags.DEFINE_bool("no_export", False, "Do not write W/model at the end.")


def main(argv: list[str]) -> int:
  del argv
  if not WORKDIR.value:
    raise SystemExit("codi-jax train: --workdir is required")
  from codi_jax.train.loop import NonFiniteLoss, train

  logging.set_verbosity(logging.INFO)
  # Orbax narrates every save at INFO; keep our own progress readable.
  logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname)
  config = common.CONFIG.value
  try:
    summary = train(config, WORKDIR.value, export=not NO_EXPORT.value)
  except NonFiniteLoss as e:
    print(f"codi-jax train: stopped: {e}")
    return 3
  result = {k: v for k, v in vars(summary).items()}
  print(json.dumps(result, indent=2))
  if summary.preempted:
    print(f"preempted at step {summary.end_step}: checkpoint saved; run the same command to "
          "resume")
  elif summary.model_dir:
    print(f"stage {summary.stage} done: model in {summary.model_dir}")
  if common.JSON.value:
    atomic_write_json(common.JSON.value, result)
  return 0
