"""Flags shared by several subcommands (absl forbids defining one flag in two modules)."""

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
