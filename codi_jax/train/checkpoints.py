"""Train checkpoints: per step, the train state, the data iterator and the run config (orbax).

Layout of `<workdir>/checkpoints/<step>/`, as orbax 0.12 writes it:

  _CHECKPOINT_METADATA   JSON: the items saved (`item_handlers`), init and commit times
  commit_success.txt     written after every item, just before the step is committed
  state/                 the train state: `_METADATA` (tree, JSON), `_sharding`, OCDBT database
                         (`manifest.ocdbt`, B-tree nodes in `d/`, array chunks in
                         `ocdbt.process_<i>/d/`, one folder per JAX process)
  data/                  grain iterator states, `process_<i>-of-<n>.json`, one per JAX process
  config/metadata        the run config as JSON

A save is written to `<step>.orbax-checkpoint-tmp/` and renamed to `<step>/` once complete (on
GCS, where renames are not atomic, the commit marker alone marks it complete); leftover tmp
folders are ignored and deleted when a store opens. On local disks orbax lists every `<step>/`
as saved, marker or not (a copied or hand-made folder, a disk that lost writes), hence `check`.
Async saves copy the arrays to host memory and take the iterator state before `save` returns,
so the caller may donate the state and advance the iterator at once. Only the `keep` newest
steps are kept; old steps are deleted after the new one is committed, never before.

A step counts as usable (`check`) when its commit marker is present, every saved item is there,
the JSON files parse, and the OCDBT B-tree of `state/` is readable with every array chunk it
points to present in full (each data file is at least as long as the byte ranges it should
hold). That reads only B-tree nodes and file sizes, never the arrays (orbax's own restore of a
truncated or missing chunk file fails with a bare `Exception` naming an array index, not a
file). `latest_valid_step` skips unusable steps with a warning that names them. A save of step
s first moves unusable steps >= s (what a crash leaves behind) to
`<workdir>/rejected_checkpoints/`, since orbax would refuse to save a step not newer than the
newest step folder.

Multi-process: every process calls `save`, `restore` and `latest_valid_step` (orbax saves are
collective); in `latest_valid_step` and `save` process 0 decides which steps are usable and the
others follow it, `restore` checks on every process (each reads its own iterator state).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import time
from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

STATE, DATA, CONFIG = "state", "data", "config"
_COMMIT_MARKER = "commit_success.txt"
_STEP_METADATA = "_CHECKPOINT_METADATA"


class CheckpointStore:
  """Train checkpoints in `<workdir>/checkpoints/<step>/` (see the module docstring).

  keep: how many of the newest steps to keep. async_save: write in a background thread
  (`save` returns once the arrays are on the host).
  """

  def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
      raise ValueError(f"keep must be a positive integer, got {keep!r}")
    self.workdir = pathlib.Path(workdir).absolute()
    self.directory = self.workdir / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True, create=True)
    handlers = {STATE: ocp.StandardCheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler(),
                DATA: grain.checkpoint.CheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=handlers)

  def __enter__(self) -> CheckpointStore:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def step_dir(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  def all_steps(self) -> list[int]:
    """Every committed-looking step folder, oldest first, usable or not."""
    return sorted(self._manager.all_steps())

  def check(self, step: int) -> str | None:
    """Why checkpoint `step` is not usable, or None when it is (see the module docstring)."""
    return _step_problem(self.step_dir(step))

  def latest_valid_step(self) -> int | None:
    """The newest usable step; newer unusable ones are skipped with a logged warning."""
    self.wait()
    self._manager.reload()
    found = None
    if jax.process_index() == 0:
      for step in reversed(self.all_steps()):
        problem = self.check(step)
        if problem is None:
          found = step
          break
        logging.warning("checkpoint step %d in %s is not usable, skipping it: %s", step,
                        self.directory, problem)
    return _from_process_0(found)

  def save(self, step: int, state: PyTree, *, iterator: grain.DatasetIterator | None = None,
           config: Any = None, force: bool = False) -> bool:
    """Starts saving `state` (a pytree of arrays), the iterator's state and `config` (a
    ConfigDict or a JSON-able mapping) as `step`; returns whether a save was started.

    An existing usable step is never overwritten (returns False). Without `force`, a step not
    newer than the newest saved one is skipped too; `force` saves it anyway.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"step must be a non-negative integer, got {step!r}")
    step = int(step)
    items = {STATE: ocp.args.StandardSave(state)}
    if config is not None:
      items[CONFIG] = ocp.args.JsonSave(_config_json(config))
    if iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(iterator)
    if any(s >= step for s in self.all_steps()):
      self._set_aside_unusable(from_step=step)
      if step in self.all_steps():
        logging.warning("checkpoint step %d already exists in %s; not saving it again", step,
                        self.directory)
        return False
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, target: PyTree, *,
              iterator: grain.DatasetIterator | None = None) -> tuple[PyTree, dict | None]:
    """(state, config) of checkpoint `step`; config is None when none was saved.

    target: the state's structure with a `jax.ShapeDtypeStruct` (or array) per leaf that has
    the wanted `.sharding`; arrays are read straight into those shardings, whatever mesh wrote
    them. Shapes and dtypes must match the saved ones. iterator: a `DatasetIterator` of the same
    pipeline; its state is set in place to the saved one.
    """
    self.wait()
    problem = self.check(step)
    if problem is not None:
      raise ValueError(f"checkpoint step {step} in {self.directory} is not usable: {problem}")
    saved_items = _read_step_metadata(self.step_dir(step))
    _check_target(self._manager.item_metadata(step)[STATE].tree, target, step)
    items = {STATE: ocp.args.StandardRestore(target)}
    if CONFIG in saved_items:
      items[CONFIG] = ocp.args.JsonRestore()
    if iterator is not None:
      _check_iterator_state(self.step_dir(step), saved_items, step)
      items[DATA] = grain.checkpoint.CheckpointRestore(iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored[STATE], (restored[CONFIG] if CONFIG in saved_items else None)

  def wait(self) -> None:
    """Blocks until the async saves are committed; raises if one failed."""
    self._manager.wait_until_finished()
    self._manager.check_for_errors()

  def close(self) -> None:
    """Waits for the saves, then releases orbax's threads (needed before the process exits)."""
    self._manager.close()

  def _set_aside_unusable(self, *, from_step: int) -> None:
    """Moves unusable steps >= from_step out of the way, to `<workdir>/rejected_checkpoints/`.

    Only process 0 lists and moves; the others wait for its word before they list the folder
    again (orbax fails on a step folder that vanishes while it lists)."""
    self.wait()
    if jax.process_index() == 0:
      self._manager.reload()
      for step in (s for s in self.all_steps() if s >= from_step):
        problem = self.check(step)
        if problem is None:
          continue
        dest = self.workdir / "rejected_checkpoints" / f"{step}.{time.time_ns()}"
        logging.warning("checkpoint step %d in %s is not usable (%s); moving it to %s", step,
                        self.directory, problem, dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(self.step_dir(step), dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("codi_jax.train.checkpoints: unusable steps moved")
    self._manager.reload()


def _from_process_0(value: int | None) -> int | None:
  """Process 0's `value` on every process (a no-op in single-process runs)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  agreed = int(multihost_utils.broadcast_one_to_all(np.int64(-1 if value is None else value)))
  return None if agreed == -1 else agreed


def _config_json(config: Any) -> dict:
  """The run config as a JSON dict; fails now, not later in the background save thread."""
  if hasattr(config, "to_json_best_effort"):  # ml_collections.ConfigDict
    return json.loads(config.to_json_best_effort())
  if not isinstance(config, Mapping):
    raise TypeError(f"config must be a ConfigDict or a mapping, got {type(config).__name__}")
  try:
    return json.loads(json.dumps(dict(config)))
  except (TypeError, ValueError) as e:
    raise ValueError(f"config is not JSON-serialisable: {e}") from e


# Checking a step folder without reading the arrays.


def _read_step_metadata(step_dir: pathlib.Path) -> set[str]:
  """The item names recorded in the step's orbax metadata."""
  metadata = json.loads((step_dir / _STEP_METADATA).read_text())
  return set(metadata["item_handlers"])


def _step_problem(step_dir: pathlib.Path) -> str | None:
  if not step_dir.is_dir():
    return f"{step_dir} is missing"
  if not (step_dir / _COMMIT_MARKER).is_file():
    return f"no commit marker {_COMMIT_MARKER} (the save did not finish)"
  try:
    items = _read_step_metadata(step_dir)
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"unreadable {_STEP_METADATA}: {e}"
  if STATE not in items:
    return f"no {STATE!r} item recorded in {_STEP_METADATA} (items: {sorted(items)})"
  for item in sorted(items):
    if not (step_dir / item).is_dir():
      return f"item folder {item}/ is missing"
  try:
    if CONFIG in items:
      _read_json(step_dir / CONFIG / "metadata")
    if DATA in items:
      _iterator_files(step_dir / DATA)
    _read_json(step_dir / STATE / "_METADATA")
    return _ocdbt_problem(step_dir / STATE)
  except (OSError, ValueError) as e:
    return f"unreadable: {e}"


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"{path.parent.name}/{path.name} is not valid JSON ({e})") from e


def _iterator_files(data_dir: pathlib.Path) -> int:
  """Checks that `data_dir` holds one iterator state per process (and that this process's one
  parses); returns the number of processes that wrote it."""
  names = sorted(p.name for p in data_dir.glob("process_*-of-*.json"))
  if not names:
    raise ValueError(f"no iterator state files in {data_dir}")
  count = int(names[0].rsplit("-of-", 1)[1].removesuffix(".json"))
  expected = sorted(f"process_{i}-of-{count}.json" for i in range(count))
  if names != expected:
    raise ValueError(f"iterator state files in {data_dir} are {names}, expected {expected}")
  own = data_dir / f"process_{jax.process_index()}-of-{count}.json"
  if own.exists():
    _read_json(own)
  return count


def _ocdbt_problem(item_dir: pathlib.Path) -> str | None:
  """Walks the OCDBT B-tree of an orbax array item: every node must read, every value it points
  to must lie inside its data file, and the key count must match the manifest's."""
  import tensorstore as ts

  if not (item_dir / "manifest.ocdbt").is_file():
    return f"{item_dir.name}/manifest.ocdbt is missing"
  base = ts.KvStore.open(f"file://{item_dir}/").result()
  try:
    manifest = ts.ocdbt.dump(base).result()
  except ValueError as e:
    return f"{item_dir.name}/ OCDBT manifest is unreadable: {e}"
  root = manifest["versions"][-1]["root"]
  if "location" not in root:
    return None  # an empty tree: a state without arrays
  sizes: dict[pathlib.Path, int] = {}
  keys, pending = 0, [root["location"]]
  while pending:
    node = ts.ocdbt.dump(base, pending.pop()).result()
    for entry in node["entries"]:
      keys += "inline_value" in entry or "indirect_value" in entry
      for location in entry.values():
        if isinstance(location, str) and location.startswith("btreenode:"):
          pending.append(location)
        elif isinstance(location, str) and location.startswith("value:"):
          problem = _value_problem(item_dir, location, sizes)
          if problem:
            return problem
  expected = root["statistics"]["num_keys"]
  if keys != expected:
    return f"{item_dir.name}/ B-tree has {keys} keys, its manifest says {expected}"
  return None


def _value_problem(item_dir: pathlib.Path, location: str,
                   sizes: dict[pathlib.Path, int]) -> str | None:
  """location: `value:<base>:<file>:<offset>:<length>` as `tensorstore.ocdbt.dump` writes it."""
  paths, offset, length = location.split(":", 1)[1].rsplit(":", 2)
  path = item_dir.joinpath(*paths.split(":", 1))
  if path not in sizes:
    sizes[path] = path.stat().st_size if path.is_file() else -1
  name = path.relative_to(item_dir.parent)
  if sizes[path] < 0:
    return f"array data file {name} is missing"
  if sizes[path] < int(offset) + int(length):
    return (f"array data file {name} is truncated: {sizes[path]} bytes, needs "
            f"{int(offset) + int(length)}")
  return None


# Restoring.


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_by_name(tree: PyTree) -> dict[tuple[str, ...], Any]:
  """Leaves by path names, so that a dataclass field and the dict key orbax stores match."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(_key_name(k) for k in path): leaf for path, leaf in flat}


def _check_target(saved: PyTree, target: PyTree, step: int) -> None:
  """Every target leaf has a sharding and the saved shape and dtype (orbax would cast dtypes
  silently); a differing tree structure is left to orbax, which names the mismatching keys."""
  saved = _flat_by_name(saved)
  bad = []
  for path, leaf in _flat_by_name(target).items():
    name, have = "/".join(path), saved.get(path)
    if getattr(leaf, "sharding", None) is None:
      bad.append(f"{name}: no sharding in the target")
    elif hasattr(have, "dtype") and (tuple(have.shape) != tuple(leaf.shape)
                                     or np.dtype(have.dtype) != np.dtype(leaf.dtype)):
      bad.append(f"{name}: saved {np.dtype(have.dtype).name}{list(have.shape)}, "
                 f"target {np.dtype(leaf.dtype).name}{list(leaf.shape)}")
  if bad:
    raise ValueError(f"restore target does not fit checkpoint step {step}: " + "; ".join(bad))


def _check_iterator_state(step_dir: pathlib.Path, saved_items: set[str], step: int) -> None:
  if DATA not in saved_items:
    raise ValueError(f"checkpoint step {step} has no data iterator state (saved without an "
                     "iterator); restore without `iterator`")
  count = _iterator_files(step_dir / DATA)
  if count != jax.process_count():
    raise ValueError(f"checkpoint step {step} holds iterator states of {count} processes, this "
                     f"run has {jax.process_count()}")
