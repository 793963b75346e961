"""Flags with one meaning across subcommands.

`codi-jax` imports only the chosen command's module, so a command may define a flag whose name
another command also uses (`--out`, `--ckpt`, ...); a test that needs two commands runs them as
subprocesses, as users do.
"""

from __future__ import annotations

import pathlib

from absl import flags
from ml_collections import config_flags

CONFIG_FILE = pathlib.Path(__file__).resolve().parents[2] / "configs" / "codi.py"

CONFIG = config_flags.DEFINE_config_file(
    "config", f"{CONFIG_FILE}:tiny",
    "Config file and preset, e.g. configs/codi.py:full; override fields with --config.x=y.",
    lock_config=True)
JSON = flags.DEFINE_string("json", None, "Also write the results as JSON to this file.")
# Each command that reads text defines its own --tokenizers; `codi_jax.text.vocab_dir` resolves it.
TOKENIZERS_HELP = ("Folder holding the tokenizer vocabularies (default: $CODI_TOKENIZERS, else "
                   "the ones bundled with codi-jax).")

# Data commands (cache, data-throughput, import-data).
SOURCE = flags.DEFINE_enum("source", "synthetic", ["synthetic", "records"],
                           "The embedded synthetic dataset, or our record shards (--records).")
RECORDS = flags.DEFINE_list("records", None,
                            "Record shards: files, folders or glob patterns (--source records).")
SEED = flags.DEFINE_integer("seed", None, "Seed in [0, 2**32 - 1] (default: config.seed).",
                            lower_bound=0, upper_bound=2 ** 32 - 1)
PROCESS_INDEX = flags.DEFINE_integer("process_index", None,
                                     "This process's index (default: jax.process_index()).")
PROCESS_COUNT = flags.DEFINE_integer("process_count", None,
                                     "Number of processes (default: jax.process_count()).")
