"""Model checkpoints: one orbax item per CoDi part plus the run config, written atomically.

A checkpoint directory holds

  config.json          the run config (`configs/codi.py`) as JSON
  <part>/              one orbax PyTree item per part present, part in `PARTS`

`diffusers` is the `CoDiUNet` parameter tree, `clap` is {"params", "batch_stats"} (bn0's running
statistics), every other part is its model's parameter tree (`codi_jax.components`). Trees are
stored as float32 numpy leaves with plain (unboxed) names. The directory is built under a
temporary name beside the target and renamed, so a reader never sees half a checkpoint.

Conversion from the released PyTorch CoDi weights (`convert_files`, `codi-jax convert`) routes
each original key to its part by prefix (`route`), checks every part against its `KeyMap` from
the files' indices alone (`check_state`: nothing read yet), then converts and writes one part at a
time, reading one tensor at a time, so it holds at most one part in float32. `export_file`
(`codi-jax export`) writes a checkpoint back to safetensors under the original names and layouts
with every buffer the original's state dict holds (`params_to_state`), or under our paths
(`params_to_flax_names`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import flax.traverse_util
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from codi_jax import components
from codi_jax.convert import buffers, keymap, torch_io
from codi_jax.diffusion.schedule import ScheduleConfig
from codi_jax.io_utils import atomic_write_text, temp_dir

PyTree = Any

PARTS = tuple(c.name for c in components.PARTS)
CONFIG_FILE = "config.json"


def _check_parts(parts: Sequence[str]) -> tuple[str, ...]:
  unknown = [p for p in parts if p not in PARTS]
  if unknown:
    raise ValueError(f"unknown model parts {unknown}; choose from {list(PARTS)}")
  return tuple(parts)


def part_prefix(part: str) -> str:
  """Where `part`'s keys live in the released CoDi state dict."""
  _check_parts([part])
  return components.component(part).prefix


def part_keymap(part: str) -> keymap.KeyMap:
  _check_parts([part])
  return components.component(part).keymap


def part_shapes(model: Mapping, part: str) -> PyTree:
  """Unboxed `ShapeDtypeStruct` tree of `part` for `config.model` (no memory allocated; cached
  per model config, as tracing the full diffusers takes seconds)."""
  _check_parts([part])
  key = (part, json.dumps(_plain(model), sort_keys=True, default=str))
  if key not in _SHAPES:
    _SHAPES[key] = _part_shapes(model, part)
  return _SHAPES[key]


_SHAPES: dict[tuple[str, str], PyTree] = {}


def _plain(model: Mapping) -> Any:
  return model.to_dict() if isinstance(model, ml_collections.ConfigDict) else dict(model)


def _part_shapes(model: Mapping, part: str) -> PyTree:
  c = components.component(part)
  typed = c.config(model)
  shapes = nn.meta.unbox(c.param_shapes(typed))
  state = c.state_shapes(typed)
  return {"params": shapes, "batch_stats": nn.meta.unbox(state)} if state else shapes


def random_params(model: Mapping, seed: int, parts: Sequence[str] | None = None
                  ) -> dict[str, PyTree]:
  """Random stand-in weights of `parts` (default all) of `config.model`, filled on the host from
  the parts' shapes (no compiled init): kernels ~ N(0, 1/fan_in), norm scales and running
  variances 1, biases and running means 0, other tables ~ N(0, 0.02). One generator draws the
  parts in the given order. For tests and demos; real runs load checkpoints."""
  parts = _check_parts(PARTS if parts is None else parts)
  rng = np.random.default_rng(seed)

  def fill(path, leaf) -> np.ndarray:
    name = getattr(path[-1], "key", str(path[-1]))
    shape = tuple(leaf.shape)
    if name in ("scale", "var"):
      return np.ones(shape, np.float32)
    if name in ("bias", "mean"):
      return np.zeros(shape, np.float32)
    std = 1 / np.sqrt(max(1, int(np.prod(shape[:-1])))) if name == "kernel" else 0.02
    return rng.normal(0.0, std, shape).astype(np.float32)

  return {p: jax.tree_util.tree_map_with_path(fill, part_shapes(model, p)) for p in parts}


def random_model_params(config: ml_collections.ConfigDict, seed: int,
                        parts: Sequence[str] | None = None) -> dict[str, PyTree]:
  """`random_params` of a run config's model."""
  return random_params(config.model, seed, parts)


def _config_json(config: Any) -> str:
  if isinstance(config, ml_collections.ConfigDict):
    return config.to_json_best_effort(indent=2, sort_keys=True)
  return json.dumps(config, indent=2, sort_keys=True, default=str)


@contextlib.contextmanager
def _staged(directory: str | os.PathLike, overwrite: bool) -> Iterator[pathlib.Path]:
  """A temporary directory beside `directory` that becomes it when the block succeeds and is
  removed when it fails, so `directory` is never half written. An existing `directory` is an
  error unless `overwrite`."""
  directory = pathlib.Path(directory).absolute()
  if directory.exists() and not overwrite:
    raise ValueError(f"{directory} already exists (--overwrite on the command line, or "
                     "overwrite=True, replaces it)")
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = temp_dir(directory)
  try:
    yield tmp
    if directory.exists():
      old = directory.with_name(f".{directory.name}.old")
      shutil.rmtree(old, ignore_errors=True)
      os.replace(directory, old)
      os.replace(tmp, directory)
      shutil.rmtree(old)
    else:
      os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _save_part(directory: pathlib.Path, part: str, tree: PyTree) -> None:
  """One part as an orbax PyTree item at `directory / part` (float32 numpy leaves)."""
  # No compression: float weights barely compress, and tensorstore's compressed write path holds
  # about two extra copies of the tree. No defensive copy either (orbax deep-copies host arrays
  # by default, in case they change during an async save): this save is synchronous.
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
      (jax.Array, ocp.type_handlers.ArrayHandler()))  # unused (leaves are numpy); orbax wants one
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
      use_compression=False, type_handler_registry=registry))
  checkpointer.save(directory / part, jax.tree_util.tree_map(_host_float32, nn.meta.unbox(tree)))


def save_model(directory: str | os.PathLike, params: Mapping[str, PyTree], config: Any, *,
               overwrite: bool = False) -> None:
  """Writes `params` ({part: tree}, any non-empty subset of `PARTS`) and `config` to `directory`.

  Leaves are stored as float32 (integers kept). The checkpoint is assembled in a temporary
  directory beside `directory` and renamed into place; an existing `directory` is an error
  unless `overwrite`.
  """
  if not params:
    raise ValueError("save_model: no parts to save")
  _check_parts(list(params))
  with _staged(directory, overwrite) as tmp:
    for part, tree in params.items():
      _save_part(tmp, part, tree)
    (tmp / CONFIG_FILE).write_text(_config_json(config))


def save_config(directory: str | os.PathLike, config: Any) -> None:
  """Replaces a checkpoint's config (atomically), e.g. to record sampling settings chosen after
  training (`evaluate.sweep_guidance`); the weights are untouched."""
  load_config(directory)  # it must be a checkpoint already
  atomic_write_text(pathlib.Path(directory) / CONFIG_FILE, _config_json(config))


def _host_float32(x: Any) -> np.ndarray:
  x = np.asarray(x)
  return x.astype(np.float32, copy=False) if np.issubdtype(x.dtype, np.floating) else x


def saved_parts(directory: str | os.PathLike) -> tuple[str, ...]:
  """The parts a checkpoint directory holds, in `PARTS` order."""
  directory = pathlib.Path(directory)
  return tuple(p for p in PARTS if (directory / p).is_dir())


def load_config(directory: str | os.PathLike) -> ml_collections.ConfigDict:
  path = pathlib.Path(directory) / CONFIG_FILE
  if not path.is_file():
    raise ValueError(f"{directory} is not a CoDi checkpoint: {CONFIG_FILE} is missing")
  try:
    stored = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"corrupt checkpoint config {path}: {e}") from e
  from configs import codi  # pylint: disable=import-outside-toplevel
  return ml_collections.ConfigDict(codi.with_defaults(stored))


def load_model(directory: str | os.PathLike, parts: Sequence[str] | None = None
               ) -> tuple[ml_collections.ConfigDict, dict[str, PyTree]]:
  """(config, {part: numpy tree}) of a checkpoint written by `save_model`.

  `parts` defaults to every part the checkpoint holds; a requested part that is absent, or an
  item orbax cannot read, raises ValueError naming it.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise ValueError(f"checkpoint directory {directory} does not exist")
  config = load_config(directory)
  present = saved_parts(directory)
  parts = present if parts is None else _check_parts(parts)
  missing = [p for p in parts if p not in present]
  if missing:
    raise ValueError(f"checkpoint {directory} has no {missing} (it holds {list(present)})")
  if not parts:
    raise ValueError(f"checkpoint {directory} holds no model parts")
  out = {}
  with ocp.PyTreeCheckpointer() as checkpointer:
    for part in parts:
      path = (directory / part).absolute()
      _silence_failed_reads(path)
      try:
        # As numpy, whatever mesh wrote it: the saved shardings name the writer's devices
        # (a model trained on 2 devices then fails to load on 1).
        tree = checkpointer.metadata(path).item_metadata.tree
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        out[part] = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
      except Exception as e:  # orbax raises many types (OSError, ValueError, tensorstore errors)
        first = str(e).split(". See full TensorStore details")[0].splitlines()
        raise ValueError(f"corrupt checkpoint part {part!r} in {directory} (a file missing or "
                         f"damaged): {type(e).__name__}: {first[0] if first else ''}") from e
  return config, out


_READ_PATHS: set[str] = set()  # checkpoint parts this process has read (`_silence_failed_reads`)


def _not_a_failed_read_task(record: logging.LogRecord) -> bool:
  message = record.getMessage()
  return not (message.startswith("Task exception was never retrieved")
              and any(path in message for path in _READ_PATHS))


def _silence_failed_reads(path: pathlib.Path) -> None:
  """Drops, for this process, what the reads of `path` still in flight report when a restore
  fails (orbax closes its event loop at the first failed read; the others then finish on
  tensorstore's threads, before or seconds after the failure reaches us): asyncio's "Task
  exception was never retrieved" logs naming `path`, and every unraisable "RuntimeError: Event
  loop is closed" (hundreds for a large part). Every other report passes."""
  _READ_PATHS.add(str(path))
  previous = sys.unraisablehook
  if not getattr(previous, "drops_closed_loop_reports", False):

    def hook(unraisable) -> None:
      value = unraisable.exc_value
      if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
        previous(unraisable)

    hook.drops_closed_loop_reports = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_not_a_failed_read_task)


def check_params(model: Mapping, part: str, tree: PyTree) -> None:
  """Raises ValueError unless `tree` has exactly `part`'s configured structure and shapes."""
  expected = part_shapes(model, part)
  got = nn.meta.unbox(tree)
  if jax.tree_util.tree_structure(got) != jax.tree_util.tree_structure(expected):
    raise ValueError(f"params for {part!r} do not have the configured tree structure")
  for (path, leaf), want in zip(jax.tree_util.tree_leaves_with_path(got),
                                jax.tree_util.tree_leaves(expected)):
    if tuple(np.shape(leaf)) != tuple(want.shape):
      raise ValueError(f"params for {part!r}: {jax.tree_util.keystr(path)} has shape "
                       f"{np.shape(leaf)}, the config needs {tuple(want.shape)}")


# --- conversion from / to the original's state-dict names ----------------------------------------

# The original's DDPM schedule buffers (top-level keys of the CoDi state dict): recomputed by
# `codi_jax.diffusion`, never loaded; export writes them back with the diffusers.
SCHEDULE_BUFFERS = frozenset(buffers.SCHEDULE)


def route(key: str) -> str | None:
  """The part owning an original state-dict key: longest matching prefix (so
  `audioldm.vocoder.*` is the vocoder, other `audioldm.*` the audio VAE); None if no part."""
  best = None
  for part in PARTS:
    prefix = part_prefix(part)
    if key.startswith(prefix) and (best is None or len(prefix) > len(part_prefix(best))):
      best = part
  return best


class _Subset(Mapping):
  """A lazy view of some keys of a state dict (reads nothing until indexed)."""

  def __init__(self, state: Mapping[str, np.ndarray], keys: Sequence[str]):
    self._state, self._keys = state, frozenset(keys)

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {k: v for k, v in keymap.state_shapes(self._state).items() if k in self._keys}

  def __getitem__(self, key: str) -> np.ndarray:
    if key not in self._keys:
      raise KeyError(key)
    return self._state[key]

  def __iter__(self):
    return iter(sorted(self._keys))

  def __len__(self) -> int:
    return len(self._keys)

  def __contains__(self, key: object) -> bool:
    return key in self._keys


def _merge(a: keymap.ConversionReport, b: keymap.ConversionReport) -> keymap.ConversionReport:
  return keymap.ConversionReport(a.loaded + b.loaded, a.buffers + b.buffers,
                                 a.missing + b.missing, a.unexpected + b.unexpected,
                                 a.mismatched + b.mismatched)


def _targets(model: Mapping, part: str) -> list[tuple[str | None, PyTree, Callable[[str], bool]]]:
  """(collection, shapes, owns) of the trees `part`'s keys convert into: its one tree, or CLAP's
  "params" and "batch_stats" (bn0's running statistics, by key)."""
  km, prefix, shapes = part_keymap(part), part_prefix(part), part_shapes(model, part)
  if not (isinstance(shapes, dict) and set(shapes) == {"params", "batch_stats"}):
    return [(None, shapes, lambda k: True)]
  stats = {km.torch_key(path, prefix) for path in
           flax.traverse_util.flatten_dict(shapes["batch_stats"])}
  return [("params", shapes["params"], lambda k: k not in stats),
          ("batch_stats", shapes["batch_stats"], lambda k: k in stats)]


def _part_report(model: Mapping, part: str, shapes: Mapping[str, tuple[int, ...]]
                 ) -> keymap.ConversionReport:
  """What converting `part` from the keys routed to it (`shapes`: key -> shape) would find; reads
  nothing."""
  km, prefix = part_keymap(part), part_prefix(part)
  report = keymap.ConversionReport()
  for _, target, owns in _targets(model, part):
    report = _merge(report, km.match(shapes, target, prefix=prefix, owns=owns)[1])
  return report


def part_from_state(model: Mapping, part: str, state: Mapping[str, np.ndarray]
                    ) -> tuple[PyTree, keymap.ConversionReport]:
  """`part`'s tree from the state-dict keys routed to it (original names, any float dtype; read
  one tensor at a time, cast to float32). Every key of `state` is owned by the part."""
  km, prefix = part_keymap(part), part_prefix(part)
  trees, report = {}, keymap.ConversionReport()
  for collection, target, owns in _targets(model, part):
    trees[collection], r = km.to_flax(state, target, prefix=prefix, owns=owns)
    report = _merge(report, r)
  return (trees[None] if None in trees else trees), report


class ConversionError(ValueError):
  """The weight files do not match the configured model; the message holds the table."""


@dataclasses.dataclass
class ConversionResult:
  reports: dict[str, keymap.ConversionReport]
  unrouted: list[str]  # keys under no part's prefix (and not schedule buffers)
  schedule_buffers: int  # DDPM schedule buffers skipped (recomputed)
  disallowed_missing: dict[str, list[str]]  # part -> missing keys not under --allow-missing
  incomplete: list[str]  # parts partly loaded, missing keys allowed
  parts: list[str]  # parts written (or to write)
  routed: dict[str, list[str]] = dataclasses.field(default_factory=dict, repr=False)  # part -> keys

  @property
  def ok(self) -> bool:
    return not (self.unrouted or self.incomplete or any(self.disallowed_missing.values())
                or any(r.unexpected or r.mismatched for r in self.reports.values()))

  def table(self, limit: int = 20) -> str:
    head = ("part", "loaded", "missing", "unexpected", "mismatched", "buffers", "status")
    rows = [head]
    for part, r in self.reports.items():
      status = ("complete" if part in self.parts else
                "INCOMPLETE" if part in self.incomplete else
                "MISSING" if self.disallowed_missing.get(part) else
                "BAD" if r.unexpected or r.mismatched else "absent (allowed)")
      rows.append((part, r.loaded, len(r.missing), len(r.unexpected), len(r.mismatched),
                   r.buffers, status))
    rows.append(("(no part)", 0, 0, len(self.unrouted), 0, self.schedule_buffers,
                 "BAD" if self.unrouted else "ok"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(v).rjust(w) if isinstance(v, int) else str(v).ljust(w)
                       for v, w in zip(row, widths)) for row in rows]
    details = []
    for part, r in self.reports.items():
      if not r.loaded and self.disallowed_missing.get(part):
        details.append(f"{part}: absent ({len(r.missing)} keys missing); pass --allow-missing "
                       f"{part_prefix(part)} to convert without it")
        continue
      for kind, keys in (("missing", self.disallowed_missing.get(part, [])),
                         ("unexpected", r.unexpected), ("mismatched", r.mismatched)):
        if keys:
          shown = "\n    ".join(keys[:limit])
          more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
          details.append(f"{part}: {len(keys)} {kind}:\n    {shown}{more}")
    if self.unrouted:
      details.append(f"{len(self.unrouted)} keys under no known prefix:\n    "
                     + "\n    ".join(self.unrouted[:limit]))
    for part in self.incomplete:
      details.append(f"{part}: loaded in part ({len(self.reports[part].missing)} keys allowed "
                     "missing); configure the model without them to convert it")
    return "\n".join(lines + details)


def check_state(state: Mapping[str, np.ndarray], config: Any, allow_missing: Sequence[str] = ()
                ) -> ConversionResult:
  """Routes every key of an original CoDi state dict to its part and checks each part's keys and
  shapes against `config.model`, reading no tensor. `result.parts` are the parts that would load
  completely, `result.ok` whether the files may be converted."""
  routed: dict[str, list[str]] = {p: [] for p in PARTS}
  unrouted, schedule = [], 0
  for key in state:
    part = route(key)
    if part is not None:
      routed[part].append(key)
    elif key in SCHEDULE_BUFFERS:
      schedule += 1
    else:
      unrouted.append(key)
  shapes = keymap.state_shapes(state)
  reports = {p: _part_report(config.model, p, {k: shapes[k] for k in routed[p]}) for p in PARTS}
  allowed = tuple(allow_missing)
  disallowed = {p: [k for k in r.missing if not k.startswith(allowed)]
                for p, r in reports.items()}
  incomplete = [p for p, r in reports.items() if r.loaded and r.missing]
  parts = [p for p, r in reports.items() if r.loaded and not r.missing]
  return ConversionResult(reports, sorted(unrouted), schedule, disallowed, incomplete, parts,
                          routed)


def convert_files(paths: Sequence[str | os.PathLike], config: Any, out: str | os.PathLike, *,
                  allow_missing: Sequence[str] = (), overwrite: bool = False
                  ) -> ConversionResult:
  """Converts weight files into a checkpoint at `out`; raises ConversionError (with the table)
  when they do not match `config`'s model, before reading any tensor.

  Streams: each part is converted (one tensor read at a time) and written as soon as it is
  complete, then dropped, so the peak memory is about the largest part in float32. The
  checkpoint is assembled beside `out` and renamed into place; a failure leaves nothing there.
  """
  state = torch_io.open_states(paths)
  result = _checked(state, config, allow_missing)
  with _staged(out, overwrite) as tmp:
    for part, tree in _converted_parts(state, config, result):
      _save_part(tmp, part, tree)
      del tree
      logging.info("converted %s", part)
    (tmp / CONFIG_FILE).write_text(_config_json(config))
  logging.info("wrote %s with parts %s", out, result.parts)
  return result


def convert_state(state: Mapping[str, np.ndarray], config: Any, *,
                  allow_missing: Sequence[str] = ()) -> tuple[ConversionResult, dict[str, PyTree]]:
  """`convert_files` in memory: an original CoDi state dict (original keys, torch layouts, any
  float dtype) -> (result, {part: tree}) for `config`'s model, with the same checks (raises
  ConversionError with the table when the keys do not match)."""
  result = _checked(state, config, allow_missing)
  return result, dict(_converted_parts(state, config, result))


def _checked(state: Mapping[str, np.ndarray], config: Any, allow_missing: Sequence[str]
             ) -> ConversionResult:
  result = check_state(state, config, allow_missing)
  if not result.ok:
    raise ConversionError("weight files do not match the model:\n" + result.table())
  if not result.parts:
    raise ConversionError("no part was loaded:\n" + result.table())
  return result


def _converted_parts(state: Mapping[str, np.ndarray], config: Any, result: ConversionResult
                     ) -> Iterator[tuple[str, PyTree]]:
  """(part, tree) of every complete part, one at a time (one tensor read at a time)."""
  for part in result.parts:
    tree, report = part_from_state(config.model, part, _Subset(state, result.routed[part]))
    if not report.ok:  # the files changed since they were checked
      raise ConversionError(f"{part}: weight files changed while converting:\n"
                            + report.summary())
    yield part, tree


def _part_trees(tree: PyTree) -> list[PyTree]:
  """A part's trees in key-map order: its one tree, or CLAP's params and batch_stats."""
  tree = nn.meta.unbox(tree)
  if isinstance(tree, Mapping) and set(tree) == {"params", "batch_stats"}:
    return [tree["params"], tree["batch_stats"]]
  return [tree]


def original_buffers(config: Any, part: str, *, lazy: bool = False) -> dict[str, buffers.Buffer]:
  """{full key: Buffer} of what the original's state dict holds for `part` beyond parameters
  (with the diffusers, the DDPM schedule of `config.diffusion`). `lazy` adds the tensors the
  original creates at its first forward call (CLAP's torchlibrosa front-end)."""
  c = components.component(part)
  out = {c.prefix + k: b for k, b in c.buffers(c.config(config.model)).items()
         if lazy or not b.lazy}
  if part == components.DIFFUSERS.name:
    if config.get("diffusion") is None:
      raise ValueError("the config has no `diffusion` schedule, needed for the diffusers' DDPM "
                       "buffers")
    out.update(buffers.schedule_buffers(ScheduleConfig(**config.diffusion)))
  return out


def params_to_state(params: Mapping[str, PyTree], config: Any = None, *,
                    lazy_buffers: bool = False) -> dict[str, np.ndarray]:
  """{part: tree} -> {original key: array in the original layout}.

  Parameters and CLAP's running statistics; with the run `config` also every buffer and tied
  copy the original keeps for those parts (`original_buffers`), i.e. the original's whole state
  dict of the parts present, as a freshly built PyTorch CoDi holds it (`lazy_buffers`: also the
  tensors it creates at its first forward call).
  """
  out = {}
  for part, tree in params.items():
    km, prefix = part_keymap(part), part_prefix(part)
    state = {}
    for sub in _part_trees(tree):
      state.update(km.to_state(sub, prefix=prefix))
    if config is not None:
      own = {k[len(prefix):]: v for k, v in state.items()}
      for key, buffer in original_buffers(config, part, lazy=lazy_buffers).items():
        try:
          state[key] = buffer.value(own)
        except (KeyError, ValueError) as e:
          raise ValueError(f"{part}: cannot make buffer {key}: {e}") from e
    out.update(state)
  return out


def state_shapes(config: Any, parts: Sequence[str] | None = None, *,
                 lazy_buffers: bool = False) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{original key: (shape, dtype)} of what `params_to_state(params, config)` gives for `parts`
  (default all) of `config.model`, from shapes alone (nothing allocated)."""
  out = {}
  for part in _check_parts(PARTS if parts is None else parts):
    km, prefix = part_keymap(part), part_prefix(part)
    for sub in _part_trees(part_shapes(config.model, part)):
      for path, leaf in flax.traverse_util.flatten_dict(sub).items():
        out[km.torch_key(path, prefix)] = (km.torch_shape(path, tuple(leaf.shape)),
                                           np.dtype(leaf.dtype))
    out.update({k: (b.shape, b.dtype)
                for k, b in original_buffers(config, part, lazy=lazy_buffers).items()})
  return out


def params_to_flax_names(params: Mapping[str, PyTree]) -> dict[str, np.ndarray]:
  """{part: tree} -> {"<part>/<path joined by '/'>": array} in our layouts."""
  out = {}
  for part, tree in params.items():
    flat = flax.traverse_util.flatten_dict(nn.meta.unbox(tree))
    out.update({"/".join((part,) + path): np.asarray(v) for path, v in flat.items()})
  return out


def export_file(ckpt: str | os.PathLike, out: str | os.PathLike, *, names: str = "torch",
                parts: Sequence[str] | None = None, lazy_buffers: bool = False) -> int:
  """Writes the checkpoint's `parts` to a safetensors file; returns the number of tensors.

  names="torch": the original's keys, layouts and buffers (`params_to_state`), loadable with
  `load_state_dict(strict=True)` into a PyTorch CoDi of the parts present; "flax": our paths.
  """
  if names not in ("torch", "flax"):
    raise ValueError(f"names must be 'torch' or 'flax', got {names!r}")
  config, params = load_model(ckpt, parts)
  tensors = (params_to_state(params, config, lazy_buffers=lazy_buffers) if names == "torch"
             else params_to_flax_names(params))
  metadata = {"format": "pt" if names == "torch" else "flax", "names": names,
              "parts": json.dumps(sorted(params)), "config": config.to_json_best_effort()}
  torch_io.write_safetensors(out, tensors, metadata)
  return len(tensors)
