"""`codi-jax parity`: compare our modules with outputs of the original CoDi code.

For every fixture file, a handler chosen by the fixture's kind (its `component`, or the whole
pipeline for an end-to-end fixture: `Fixture.kind`) builds our module from the fixture's own
config, loads its weights through the key map, runs every case and returns the outputs it
computed (keys `<output name>`, `input/<name>` for stored inputs it can recompute, such as token
ids from the stored texts, and `meta/<name>` for stored strings). Every stored output is then
compared; a stored output the handler did not compute, a file no handler knows, or a handler
error is a failure, never a skip. The one exception is an output no port can recompute (a torch
RNG draw), which a handler marks `Covered` by other outputs: it passes only if they all pass.

A tolerance is (atol, rtol): |ours - reference| <= atol + rtol * max|reference| everywhere; or
(atol, rtol, fraction): the same, and at most that fraction of the values may differ at all
(uint8 pixels at truncation boundaries). Strings and other non-numeric arrays must be equal.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import traceback
from typing import Callable

import numpy as np

from codi_jax.parity import autoencoder, clap, clip, diffusion, e2e, optimus, vocoder
from codi_jax.parity.fixtures import E2E_KIND, Covered, Fixture, load_fixture

Handler = Callable[[Fixture], diffusion.Produced]

# fixture kind prefix (the component as written by the fixture generator) -> handler
HANDLERS: tuple[tuple[str, Handler], ...] = (
    (E2E_KIND, e2e.e2e_outputs),
    ("openai_unet_codi", diffusion.unet_outputs),
    ("autokl = AutoencoderKL", autoencoder.autokl_outputs),
    ("audioldm = AudioAutoencoderKL", autoencoder.audioldm_outputs),
    ("DDIMSampler_VD", diffusion.ddim_outputs),
    ("optimus = optimus_vae", optimus.optimus_outputs),
    ("clip = FrozenCLIP", clip.clip_outputs),
    ("clap = CLAPAudioEmbeddingClassifier", clap.clap_outputs),
    ("HiFi-GAN Generator", vocoder.vocoder_outputs),
)


@dataclasses.dataclass(frozen=True)
class Row:
  max_abs: float
  tol: float
  passed: bool
  error: str | None = None
  note: str | None = None

  def as_json(self) -> dict:
    out = {"max_abs": self.max_abs, "tol": self.tol, "pass": self.passed}
    if self.error:
      out["error"] = self.error
    if self.note:
      out["note"] = self.note
    return out


def _handler(fx: Fixture) -> Handler | None:
  for prefix, handler in HANDLERS:
    if fx.kind.startswith(prefix):
      return handler
  return None


def compare(expected: np.ndarray, produced: np.ndarray, tol: tuple[float, ...]) -> Row:
  if expected.shape != produced.shape:
    return Row(float("inf"), 0.0, False, f"shape {produced.shape} != expected {expected.shape}")
  if not (np.issubdtype(expected.dtype, np.number) or expected.dtype == bool):
    differ = int(np.sum(expected != produced))  # strings: exact
    return Row(float(differ), 0.0, differ == 0,
               note=f"{differ} of {expected.size} differ" if differ else None)
  atol, rtol, *fraction = tol
  bound = float(atol + rtol * (np.abs(expected).max() if expected.size else 0.0))
  diff = np.abs(expected.astype(np.float64) - produced.astype(np.float64))
  max_abs = float(diff.max()) if diff.size else 0.0
  passed = bool(np.isfinite(max_abs) and max_abs <= bound)
  if not fraction:
    return Row(max_abs, bound, passed)
  differ = int(np.sum(diff > 0))
  return Row(max_abs, bound, passed and differ <= fraction[0] * diff.size,
             note=f"{differ} of {diff.size} values differ (at most {fraction[0]:.2%} may)")


def _stored(fx: Fixture, key: str) -> np.ndarray | None:
  """The stored array `key` names: `input/<name>`, `meta/<name>` or an output name."""
  group, _, name = key.partition("/")
  if group == "input":
    return fx.inputs.get(name)
  if group == "meta":
    return None if name not in fx.meta else np.asarray(fx.meta[name])
  return fx.outputs.get(key)


def check_file(path: pathlib.Path) -> dict[str, Row]:
  """All rows of one fixture file (a failure row "<file>" if it cannot be handled at all)."""
  try:
    fx = load_fixture(path)
  except ValueError as e:
    return {"<file>": Row(float("inf"), 0.0, False, str(e))}
  handler = _handler(fx)
  if handler is None:
    return {"<file>": Row(float("inf"), 0.0, False,
                          f"no parity handler for component {fx.component!r}")}
  try:
    produced = handler(fx)
  except Exception as e:  # a handler crash fails the file, with its message
    logging.debug("parity handler failed:\n%s", traceback.format_exc())
    return {"<file>": Row(float("inf"), 0.0, False, f"{type(e).__name__}: {e}")}
  return compare_outputs(fx, produced)


def compare_outputs(fx: Fixture, produced: diffusion.Produced) -> dict[str, Row]:
  """The rows of what a handler `produced` against the fixture's stored arrays."""
  rows = {}
  # Every stored output, and the stored inputs and strings a handler recomputes (e.g. token ids
  # from the stored texts).
  keys = sorted(fx.outputs) + sorted(k for k in produced if k.startswith(("input/", "meta/")))
  covered = {}
  for key in keys:
    if key not in produced:
      rows[key] = Row(float("inf"), 0.0, False, "output not computed")
      continue
    value, tol = produced[key]
    if isinstance(value, Covered):
      covered[key] = value
      continue
    expected = _stored(fx, key)
    rows[key] = (Row(float("inf"), 0.0, False, "no such stored array") if expected is None else
                 compare(np.asarray(expected), np.asarray(value), tol))
  for key, c in covered.items():
    failed = [k for k in c.by if not (k in rows and rows[k].passed)]
    rows[key] = Row(0.0, 0.0, not failed, f"covering outputs failed or absent: {failed}"
                    if failed else None, note=f"{c.reason} ({len(c.by)} outputs)")
  if not rows:
    rows["<file>"] = Row(float("inf"), 0.0, False, "fixture stores no outputs")
  return rows


def fixture_files(directory: pathlib.Path, only: list[str] | None = None) -> list[pathlib.Path]:
  """The `.npz` fixtures in `directory`, optionally only those named (with or without `.npz`)."""
  if not directory.is_dir():
    raise FileNotFoundError(f"fixture directory {directory} does not exist")
  files = sorted(p for p in directory.glob("*.npz") if p.stem != "manifest_full")
  if only:
    wanted = {o.removesuffix(".npz") for o in only}
    unknown = wanted - {p.stem for p in files}
    if unknown:
      raise FileNotFoundError(f"no fixture named {sorted(unknown)} in {directory}")
    files = [p for p in files if p.stem in wanted]
  if not files:
    raise FileNotFoundError(f"no .npz fixtures in {directory}")
  return files


def run(directory: pathlib.Path, only: list[str] | None = None,
        on_file: Callable[[str, dict[str, Row]], None] | None = None) -> dict[str, dict[str, Row]]:
  results = {}
  for path in fixture_files(directory, only):
    results[path.name] = check_file(path)
    if on_file:
      on_file(path.name, results[path.name])
  return results
