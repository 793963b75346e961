"""Reading reference fixtures: `.npz` files made by running the original CoDi code.

Format (`tests/fixtures/codi_reference/README.md`): weights under their original state-dict
keys (float16 parameters are exact: widen to float32), `input/<name>`, `output/<name>`,
`meta/<name>`, and `config_json` with the component's own config.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, NamedTuple

import numpy as np

from codi_jax.text import vocab_dir


# The kind of an end-to-end fixture (`tests/fixtures/codi_e2e/README.md`), which records the
# original's whole inference and so names no `component`: its config has the model's `codi_cfg`.
E2E_KIND = "CoDi inference (end to end)"


class Covered(NamedTuple):
  """What a handler returns for a stored output no port can recompute (a torch RNG draw): it
  passes exactly when the named outputs, which check the same thing another way, all pass."""

  reason: str
  by: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Fixture:
  path: pathlib.Path
  config: dict[str, Any]
  weights: dict[str, np.ndarray]
  inputs: dict[str, np.ndarray]
  outputs: dict[str, np.ndarray]
  meta: dict[str, Any]  # `meta/<name>` strings, JSON-decoded

  @property
  def name(self) -> str:
    return self.path.name

  @property
  def component(self) -> str:
    return str(self.config.get("component", ""))

  @property
  def kind(self) -> str:
    """What the fixture records: its `component`, or `E2E_KIND` for a whole-pipeline run."""
    return self.component or (E2E_KIND if "codi_cfg" in self.config else "")

  def vocab_file(self, name: str) -> pathlib.Path:
    """A real tokenizer vocabulary file, from `vocab_dir()` ($CODI_TOKENIZERS or the bundled
    vocabularies)."""
    path = vocab_dir() / name
    if not path.is_file():
      raise FileNotFoundError(f"{self.name} needs the tokenizer file {path} (set CODI_TOKENIZERS "
                              "to the folder holding the real vocabularies)")
    return path


def load_fixture(path: str | pathlib.Path) -> Fixture:
  path = pathlib.Path(path)
  try:
    z = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable .npz fixture ({e})") from e
  with z:
    if "config_json" not in z.files:
      raise ValueError(f"{path}: no config_json entry; not a CoDi reference fixture")
    config = json.loads(str(z["config_json"]))
    weights, inputs, outputs, meta = {}, {}, {}, {}
    for key in z.files:
      value = z[key]
      if key.startswith("input/"):
        inputs[key[len("input/"):]] = value
      elif key.startswith("output/"):
        outputs[key[len("output/"):]] = value
      elif key.startswith("meta/"):
        meta[key[len("meta/"):]] = json.loads(str(value))
      elif "/" not in key and key != "config_json":
        weights[key] = value.astype(np.float32) if value.dtype == np.float16 else value
  return Fixture(path, config, weights, inputs, outputs, meta)
