"""The sharded sampling job: many requests, batched by compiled program, over every device.

Every process reads the same manifest and computes the same work list: the items not yet
complete, grouped by `Program` (output set, latent shapes, samples per item, DDIM steps, eta,
alignment; first appearance first) and cut into global batches of `per_device_batch` items per
batch shard (the mesh's 'batch' axes, ('data', 'fsdp') by default), the last one padded. Each
group's program is compiled once ahead of time (`jit(...).lower(...).compile()`, timed apart) with
its rows split over the batch axes and the parameters laid out by the config's logical-axis rules
(replicated, or FSDP-sharded when the mesh has fsdp > 1). A process prepares (decodes media,
encodes conditions, draws noise for) only the items whose rows land on its devices, and writes
only the items it owns, each to `<out>/items/<id>/` at once (`codi_jax.outputs`), with the item's
fingerprint (`Item.fingerprint`: its settings and the bytes of its inputs) in `result.json`. An
item is complete iff that fingerprint is its own, so a restarted job skips it, a killed job loses
at most its in-flight batches, and a rerun after a line changed regenerates that item (or, with
`on_changed="refuse"`, stops). A batch that cannot be compiled or run fails its items, not the
job. Every row's randomness comes from its item's seed and sample index
(`CoDiPipeline.prepare`), so an item's outputs do not depend on its batch or the device count.

Also written: `failures.jsonl` (one line per failed item, flushed as it happens; describes the
latest run), `summary.json` and an `index.html` gallery (process 0, atomically).
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import os
import pathlib
import shutil
import time
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from codi_jax import components
from codi_jax.io_utils import atomic_write_json, atomic_write_text
from codi_jax.outputs import write_outputs
from codi_jax.parallel.sharding import Rules, logical_shardings, logical_to_spec
from codi_jax.pipeline import CoDiPipeline, Program, Rows, load_model, load_tokenizers
from codi_jax.sample.manifest import Failure, Item, load_inputs

# Parts that run inside the sharded program (the prompt encoders run per item on the host's
# default device, in `CoDiPipeline.prepare`).
SHARDED_PARTS = ("diffusers", "autokl", "audioldm_vae", "hifigan_vocoder", "optimus")
RESULT = "result.json"
ON_CHANGED = ("regenerate", "refuse")  # what a rerun does with items whose line changed


def load_pipeline(ckpt: str | os.PathLike, tokenizers: str | os.PathLike | None, mesh: Mesh,
                  rules: Rules) -> CoDiPipeline:
  """A pipeline whose sampled parts are laid out on `mesh` by the logical-axis `rules`, from
  their boxed abstract shapes (each process reads the checkpoint and keeps its own shards)."""
  config, params = load_model(ckpt)
  shardings = {p: logical_shardings(components.component(p).shapes(config.model), mesh, rules)
               for p in SHARDED_PARTS if p in params}
  return CoDiPipeline(config, params, load_tokenizers(tokenizers), shardings)


def batch_shards(mesh: Mesh, rules: Rules) -> int:
  """How many ways the 'batch' rule splits rows on `mesh` (the data-parallel width)."""
  for name, axes in rules:
    if name == "batch":
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      return int(np.prod([mesh.shape[a] for a in axes]))
  return 1


@dataclasses.dataclass(frozen=True)
class Batch:
  program: Program
  items: tuple[Item, ...]  # the real items, in slot order; the remaining slots are padding


def plan_batches(items: Sequence[Item], slots: int) -> list[Batch]:
  """Items grouped by program (first appearance first, manifest order within), `slots` a batch."""
  groups: dict[Program, list[Item]] = {}
  for item in items:
    groups.setdefault(item.program, []).append(item)
  return [Batch(program, tuple(group[i:i + slots]))
          for program, group in groups.items() for i in range(0, len(group), slots)]


def is_complete(folder: pathlib.Path, fingerprint: str) -> bool:
  """Whether `folder` holds the finished outputs of the item whose fingerprint is given."""
  return _recorded_fingerprint(folder) == fingerprint


def _recorded_fingerprint(folder: pathlib.Path) -> str | None:
  """The fingerprint in the folder's result.json; "" for a result without a readable one;
  None where there is no result."""
  path = folder / RESULT
  if not path.is_file():
    return None
  try:
    return str(json.loads(path.read_text(encoding="utf-8")).get("fingerprint", ""))
  except (OSError, ValueError, AttributeError):
    return ""


@dataclasses.dataclass
class _Compiled:
  fn: Any  # jax.stages.Compiled
  seconds: float
  abstract: Rows  # ShapeDtypeStructs of one global batch of rows


@dataclasses.dataclass(frozen=True)
class _InFlight:
  """A dispatched batch whose outputs are not yet written."""

  layout: _Layout
  outputs: dict[str, jax.Array]
  prepared: dict[int, tuple[Item, list[str]]]  # this process's slots -> (item, notes)
  items: Sequence[Item]  # every real item of the batch (all processes)


class _Layout:
  """Where a batch's rows live: slot k holds rows [k N, (k + 1) N), all on one device block."""

  def __init__(self, mesh: Mesh, rules: Rules, slots: int, rows_per_item: int):
    self.slots, self.n = slots, rows_per_item
    rows = slots * rows_per_item
    self.sharding = NamedSharding(mesh, logical_to_spec(("batch",), (rows,), rules, mesh))
    index = self.sharding.devices_indices_map((rows,))
    pid = jax.process_index()
    self.owner: list[int] = []
    self.local: set[int] = set()
    for slot in range(slots):
      row = slot * rows_per_item
      holders = [d for d in mesh.devices.flat if _contains(index[d][0], row, rows)]
      self.owner.append(holders[0].process_index)
      if any(d.process_index == pid for d in holders):
        self.local.add(slot)

  def rows(self, slot: int) -> slice:
    return slice(slot * self.n, (slot + 1) * self.n)


def _contains(s: slice, row: int, size: int) -> bool:
  start, stop, _ = s.indices(size)
  return start <= row < stop


def _local_blocks(array: jax.Array) -> list[tuple[int, np.ndarray]]:
  """(first row, host rows) of each distinct row block this process holds."""
  blocks = {}
  for shard in array.addressable_shards:
    start, _, _ = shard.index[0].indices(array.shape[0])
    if start not in blocks:  # a block replicated on several local devices is read once
      blocks[start] = np.asarray(shard.data)
  return sorted(blocks.items())


def _take(blocks: list[tuple[int, np.ndarray]], rows: slice) -> np.ndarray:
  for start, block in blocks:
    if start <= rows.start and rows.stop <= start + len(block):
      return block[rows.start - start:rows.stop - start]
  raise AssertionError(f"rows {rows} are not on this process")  # the layout said they were


class _FailureLog:
  """failures.jsonl, appended and flushed one line at a time."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.count = 0

  def add(self, failure: Failure) -> None:
    logging.warning("item %s (line %d) failed: %s: %s", failure.id, failure.line, failure.error,
                    failure.message)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(failure.as_json(), sort_keys=True) + "\n")
      f.flush()
    self.count += 1


def _any_process(mask: np.ndarray) -> np.ndarray:
  """Elementwise OR over processes (also a barrier): every process then has the same list."""
  if jax.process_count() == 1:
    return mask
  return np.asarray(multihost_utils.process_allgather(mask.astype(np.int32))).any(axis=0)


def _sum_processes(counts: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return counts
  return np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)


def _clean_staging(items_dir: pathlib.Path) -> None:
  """Half-written item folders of a killed run (`write_outputs` stages under hidden names)."""
  for path in items_dir.glob(".*"):
    if path.is_dir() and path.name.endswith((".tmp", ".old")):
      shutil.rmtree(path, ignore_errors=True)


class SamplingJob:
  """Runs `items` with `pipe` on `mesh`, writing to `out` (see the module docstring)."""

  def __init__(self, pipe: CoDiPipeline, mesh: Mesh, rules: Rules, out: str | os.PathLike, *,
               per_device_batch: int = 1, extra: Mapping[str, Any] | None = None,
               progress: bool = True, on_changed: str = "regenerate"):
    if on_changed not in ON_CHANGED:
      raise ValueError(f"on_changed must be one of {ON_CHANGED}, got {on_changed!r}")
    if isinstance(per_device_batch, bool) or not isinstance(per_device_batch, int) \
       or per_device_batch < 1:
      raise ValueError(f"per_device_batch must be a positive integer, got {per_device_batch!r}")
    self.pipe, self.mesh, self.rules = pipe, mesh, tuple(tuple(r) for r in rules)
    self.out = pathlib.Path(out)
    self.items_dir = self.out / "items"
    self.slots = per_device_batch * batch_shards(mesh, self.rules)
    self.per_device_batch = per_device_batch
    self.extra = dict(extra or {})
    self.progress = progress
    self.on_changed = on_changed
    self._compiled: dict[Program, _Compiled] = {}
    self._layouts: dict[int, _Layout] = {}  # by rows per item
    self._fingerprints: dict[str, str] = {}  # by item id

  # --- compilation -----------------------------------------------------------------------------

  def _compile(self, program: Program, layout: _Layout) -> _Compiled:
    if program in self._compiled:
      return self._compiled[program]
    rows = layout.slots * layout.n
    sds = lambda shape, dtype: jax.ShapeDtypeStruct((rows,) + tuple(shape), dtype,
                                                    sharding=layout.sharding)
    token = (1, self.pipe.codi_config.context_dim)
    key_width = jax.random.key_data(jax.random.key(0)).shape
    abstract = Rows(x_T={m: sds(shape, np.float32) for m, shape in program.row_shapes},
                    cond=sds(token, np.float32), uncond=sds(token, np.float32),
                    guidance=sds((), np.float32), eta_keys=sds(key_width, np.uint32),
                    text_keys=sds(key_width, np.uint32))
    start = time.perf_counter()
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      fn = jax.jit(self.pipe.program_fn(program), out_shardings=layout.sharding)
      compiled = fn.lower(self.pipe.program_params(program), abstract).compile()
    seconds = time.perf_counter() - start
    logging.info("compiled %s in %.1f s", _describe(program), seconds)
    self._compiled[program] = _Compiled(compiled, seconds, abstract)
    return self._compiled[program]

  # --- one batch ---------------------------------------------------------------------------------

  def _prepare(self, batch: Batch, layout: _Layout, compiled: _Compiled, failures: _FailureLog
               ) -> tuple[Rows, dict[int, tuple[Item, list[str]]]]:
    """This process's rows of `batch` (zeros elsewhere and in padding) as global arrays."""
    host = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), compiled.abstract)
    prepared = {}
    for slot, item in enumerate(batch.items):
      if slot not in layout.local:
        continue
      try:
        inputs, notes = load_inputs(item)
        rows = self.pipe.prepare(item.settings, inputs)
      except (ValueError, OSError) as e:  # corrupt media, unreadable files
        if layout.owner[slot] == jax.process_index():
          failures.add(Failure.of(item.id, item.line, e))
        continue
      span = layout.rows(slot)
      jax.tree_util.tree_map(lambda dst, src: dst.__setitem__(span, src), host, rows)
      prepared[slot] = (item, notes)
    place = lambda a: jax.make_array_from_callback(a.shape, layout.sharding, lambda i: a[i])
    return jax.tree_util.tree_map(place, host), prepared

  def _write(self, batch: _InFlight, failures: _FailureLog) -> int:
    """Writes the items of `batch` this process owns (waiting for its outputs); returns how many
    it wrote."""
    blocks = {k: _local_blocks(v) for k, v in batch.outputs.items()}
    written = 0
    for slot, (item, notes) in sorted(batch.prepared.items()):
      if batch.layout.owner[slot] != jax.process_index():
        continue
      try:
        raw = {k: _take(b, batch.layout.rows(slot)) for k, b in blocks.items()}
        generated = self.pipe.finish(item.settings, raw)
        write_outputs(self.items_dir / item.id, generated, item.files, item.text,
                      extra=dict(self.extra, id=item.id, line=item.line, notes=notes,
                                 process=jax.process_index(),
                                 fingerprint=self._fingerprints[item.id]))
        written += 1
      except (ValueError, OSError) as e:
        failures.add(Failure.of(item.id, item.line, e))
    return written

  def _write_or_fail(self, batch: _InFlight, failures: _FailureLog) -> int:
    try:
      return self._write(batch, failures)
    except Exception as e:  # noqa: BLE001 -- the batch's program failed while it ran
      self._fail_batch(batch.items, e, failures)
      return 0

  def _fingerprint(self, items: Sequence[Item]) -> None:
    """Fingerprints every item (`Item.fingerprint`). An item whose input files cannot be read
    gets none (so it is not complete) and fails when it is prepared, naming the file."""
    for item in items:
      try:
        self._fingerprints[item.id] = item.fingerprint()
      except OSError:
        self._fingerprints[item.id] = "unreadable inputs"

  @staticmethod
  def _fail_batch(items: Sequence[Item], error: Exception, failures: _FailureLog) -> None:
    """Every item of a batch that could not be compiled or run goes to failures.jsonl (written
    by process 0: such errors are the same on every process)."""
    logging.error("a batch of %d item(s) failed: %s: %s", len(items), type(error).__name__,
                  error)
    if jax.process_index() == 0:
      for item in items:
        failures.add(Failure.of(item.id, item.line, error))

  # --- the job ---------------------------------------------------------------------------------

  def run(self, items: Sequence[Item], failures: Sequence[Failure] = ()) -> dict[str, Any]:
    """Samples every item not yet complete; returns the summary (also `summary.json`)."""
    start = time.perf_counter()
    pid = jax.process_index()
    log = _FailureLog(self.out / "failures.jsonl")
    if pid == 0:
      self.items_dir.mkdir(parents=True, exist_ok=True)
      _clean_staging(self.items_dir)
      atomic_write_text(log.path, "".join(json.dumps(f.as_json(), sort_keys=True) + "\n"
                                          for f in failures))
    for f in failures:
      logging.warning("line %d skipped: %s: %s", f.line, f.error, f.message)
    self._fingerprint(items)
    recorded = [_recorded_fingerprint(self.items_dir / it.id) for it in items]
    complete = np.asarray([r == self._fingerprints[it.id] for it, r in zip(items, recorded)],
                          bool)
    complete = _any_process(complete)  # every process agrees on the work list
    changed = sum(r is not None and not c for r, c in zip(recorded, complete))
    if changed:
      if self.on_changed == "refuse":
        raise ValueError(f"{changed} item(s) in {self.items_dir} were made from other settings "
                         "or inputs than their manifest lines now ask for; rerun with "
                         "--on_changed=regenerate to make them again, or use another --out")
      logging.warning("%d item(s) changed since their outputs were written: regenerating them",
                      changed)
    todo = [it for it, c in zip(items, complete) if not c]
    batches = plan_batches(todo, self.slots)
    bar = tqdm(total=len(todo), desc="sample", unit="item",
               disable=not self.progress or pid != 0)
    loop_start = time.perf_counter()
    written, samples, pending = 0, 0, None
    for batch in batches:
      try:
        n = batch.program.num_samples
        if n not in self._layouts:
          self._layouts[n] = _Layout(self.mesh, self.rules, self.slots, n)
        layout = self._layouts[n]
        compiled = self._compile(batch.program, layout)
        rows, prepared = self._prepare(batch, layout, compiled, log)
        outputs = compiled.fn(self.pipe.program_params(batch.program), rows)  # dispatched, async
      except Exception as e:  # noqa: BLE001 -- a batch that cannot run fails its items, not the job
        self._fail_batch(batch.items, e, log)
        bar.update(len(batch.items))
        continue
      if pending is not None:  # write the previous batch while this one runs
        items_written = self._write_or_fail(pending, log)
        written, samples = written + items_written, samples + items_written * pending.layout.n
        bar.update(len(pending.items))
      pending = _InFlight(layout, outputs, prepared, batch.items)
    if pending is not None:
      items_written = self._write_or_fail(pending, log)
      written, samples = written + items_written, samples + items_written * pending.layout.n
      bar.update(len(pending.items))
    bar.close()
    end = time.perf_counter()
    done, samples, runtime_failed = _sum_processes(
        np.asarray([written, samples, log.count], np.int64)).tolist()
    compile_s = sum(c.seconds for c in self._compiled.values())
    run_s = max(end - loop_start - compile_s, 1e-9)
    devices = self.mesh.devices.size
    summary = dict(
        lines=len(items) + len(failures), done=done, skipped=len(items) - len(todo),
        regenerated=changed,
        failed=len(failures) + runtime_failed, wall_s=round(end - start, 3),
        compile_s=round(compile_s, 3), sample_s=round(run_s, 3),
        items_per_s=done / run_s, items_per_s_per_device=done / run_s / devices,
        samples_per_s=samples / run_s,  # written samples only
        devices=devices, processes=jax.process_count(), mesh=dict(self.mesh.shape),
        per_device_batch=self.per_device_batch, batch_items=self.slots, batches=len(batches),
        programs=[dict(program=_describe(p), compile_s=round(c.seconds, 3))
                  for p, c in self._compiled.items()],
        **self.extra)
    if pid == 0:
      atomic_write_json(self.out / "summary.json", summary)
      atomic_write_text(self.out / "index.html",
                        _gallery(self.out, items, failures, summary, self._fingerprints))
    return summary


def _describe(program: Program) -> str:
  shapes = ", ".join(f"{m.value} {list(s)}" for m, s in program.row_shapes)
  return (f"{'+'.join(m.value for m in program.outputs)} ({shapes}; {program.num_samples} "
          f"sample(s), {program.ddim_steps} steps, eta {program.eta}, {program.alignment.value})")


def _gallery(out: pathlib.Path, items: Sequence[Item], failures: Sequence[Failure],
             summary: Mapping[str, Any], fingerprints: Mapping[str, str]) -> str:
  """index.html: one row per manifest line, linking each item's own page."""
  rows = []
  failed = {f.line: f for f in failures}
  runtime = out / "failures.jsonl"
  if runtime.is_file():
    for line in runtime.read_text(encoding="utf-8").splitlines():
      f = Failure(**json.loads(line))
      failed.setdefault(f.line, f)
  for item in items:
    folder = out / "items" / item.id
    if not is_complete(folder, fingerprints[item.id]):
      f = failed.get(item.line)
      why = f"{f.error}: {f.message}" if f else "not done"
      rows.append(f"<tr><td>{html.escape(item.id)}</td><td colspan=2>{html.escape(why)}</td></tr>")
      continue
    result = json.loads((folder / RESULT).read_text())
    link = f"items/{html.escape(item.id)}/index.html"
    cells = []
    for modality, names in result["output_files"].items():
      src = f"items/{html.escape(item.id)}/{html.escape(names[0])}"
      if modality == "image":
        cells.append(f'<img src="{src}" alt="{src}">')
      elif modality == "text":
        text = (folder / names[0]).read_text(encoding="utf-8").strip()
        cells.append(f"<q>{html.escape(text)}</q>")
      else:
        cells.append(f'<a href="{src}">{html.escape(modality)}</a>')
    prompt = html.escape(str(result["inputs"].get("text", "")))
    rows.append(f'<tr><td><a href="{link}">{html.escape(item.id)}</a></td><td>{prompt}</td>'
                f"<td>{' '.join(cells)}</td></tr>")
  for f in failures:
    rows.append(f"<tr><td>line {f.line}{' ' + html.escape(f.id) if f.id else ''}</td>"
                f"<td colspan=2>{html.escape(f.error)}: {html.escape(f.message)}</td></tr>")
  head = html.escape(f"{summary['done']} done, {summary['skipped']} skipped, "
                     f"{summary['failed']} failed")
  return ("<!doctype html><meta charset=utf-8><title>codi-jax sample</title>"
          "<style>body{font-family:sans-serif}td{padding:4px 8px;vertical-align:top}"
          "img{max-width:128px}</style>"
          f"<h1>codi-jax sample</h1><p>{head}</p><table>{''.join(rows)}</table>\n")
