"""Flags with one meaning across subcommands.

`codi-jax` imports only the chosen command's module, so a command may define a flag whose name
another command also uses (`--out`, `--ckpt`, ...); a test that needs two commands runs them as
subprocesses, as users do.
"""

from __future__ import annotations

import os
import pathlib

from absl import flags
from ml_collections import config_flags

CONFIG_FILE = pathlib.Path(__file__).resolve().parents[2] / "configs" / "codi.py"
DEFAULT_TOKENIZERS = pathlib.Path(__file__).resolve().parents[3] / "shared" / "tokenizers"

CONFIG = config_flags.DEFINE_config_file(
    "config", f"{CONFIG_FILE}:tiny",
    "Config file and preset, e.g. configs/codi.py:full; override fields with --config.x=y.",
    lock_config=True)
JSON = flags.DEFINE_string("json", None, "Also write the results as JSON to this file.")

# Data commands (cache, data-throughput, import-data).
SOURCE = flags.DEFINE_enum("source", "synthetic", ["synthetic", "records"],
                           "The embedded synthetic dataset, or our record shards (--records).")
RECORDS = flags.DEFINE_list("records", None,
                            "Record shards: files, folders or glob patterns (--source records).")
SEED = flags.DEFINE_integer("seed", None, "Seed (default: config.seed).")
PROCESS_INDEX = flags.DEFINE_integer("process_index", None,
                                     "This process's index (default: jax.process_index()).")
PROCESS_COUNT = flags.DEFINE_integer("process_count", None,
                                     "Number of processes (default: jax.process_count()).")


def tokenizers_dir(flag_value: str | None) -> str:
  """The tokenizer folder a command reads: its --tokenizers, else $CODI_TOKENIZERS, else the
  repository's ../shared/tokenizers."""
  return flag_value or os.environ.get("CODI_TOKENIZERS") or str(DEFAULT_TOKENIZERS)
