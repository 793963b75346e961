r"""codi-jax sample: a sharded, resumable sampling job over a JSONL manifest of requests.

  codi-jax sample --ckpt CKPT --manifest items.jsonl --out outputs/job \
      [--per_device_batch 4] [--mesh data=-1,fsdp=1] [--tokenizers DIR]

One request per manifest line (`codi_jax.sample.manifest`):
  {"id": "dog", "inputs": {"text": "a dog barks", "image": "dog.png"}, "outputs": ["image"],
   "seed": 3, "ddim_steps": 50}
Runs on every device of every process (multi-host: start the same command on each host, see
`codi_jax.parallel.distributed`), batching items by compiled program. Writes `<out>/items/<id>/`
per item (as `codi-jax generate` does), `failures.jsonl`, `summary.json` and an `index.html`
gallery; a rerun skips the items already complete and regenerates those whose line changed
(--on_changed). Options a line leaves out come from the
checkpoint config's `sample` section (seed: --seed or the config's; one sample per item).
"""

from __future__ import annotations

import pathlib

import jax
from absl import flags

from codi_jax import checkpoint
from codi_jax.commands import common
from codi_jax.parallel.mesh import create_mesh
from codi_jax.sample import job as job_lib
from codi_jax.sample.job import SamplingJob, load_pipeline
from codi_jax.sample.manifest import default_options, read_manifest


CKPT = flags.DEFINE_string("ckpt", None, "Model checkpoint folder (`codi_jax.checkpoint`).")
MANIFEST = flags.DEFINE_string("manifest", None, "JSONL file, one request per line.")
OUT = flags.DEFINE_string("out", None, "Job folder: items/<id>/, failures.jsonl, summary.json.")
PER_DEVICE_BATCH = flags.DEFINE_integer("per_device_batch", 1,
                                        "Items per batch shard (device) in each step.")
MESH = flags.DEFINE_list("mesh", None,
                         "Mesh sizes within a slice, e.g. data=-1,fsdp=2 (default: the config's "
                         "mesh.ici); fsdp > 1 shards the parameters.")
TOKENIZERS = flags.DEFINE_string("tokenizers", None, common.TOKENIZERS_HELP)
QUIET = flags.DEFINE_bool("quiet", False, "No progress bar.")
ALLOW_OUTSIDE_MEDIA = flags.DEFINE_bool(
    "allow_outside_media", False,
    "Let manifest lines name media outside the manifest's folder (absolute paths, `..`).")
ON_CHANGED = flags.DEFINE_enum(
    "on_changed", "regenerate", job_lib.ON_CHANGED,
    "A rerun into the same --out meets items whose outputs were made from other settings or "
    "inputs than their manifest lines now ask for (their fingerprints differ): regenerate them "
    "(and count them in summary.json), or refuse to run.")


def parse_mesh(entries: list[str]) -> dict[str, int]:
  """["data=-1", "fsdp=2"] -> {"data": -1, "fsdp": 2}."""
  sizes = {}
  for entry in entries:
    name, sep, value = entry.partition("=")
    try:
      if not sep:
        raise ValueError
      sizes[name.strip()] = int(value)
    except ValueError:
      raise ValueError(f"--mesh entry {entry!r} is not axis=size (e.g. data=-1)") from None
  return sizes


def run() -> dict:
  for flag in (CKPT, MANIFEST, OUT):
    if not flag.value:
      raise ValueError(f"--{flag.name} is required")
  config = checkpoint.load_config(CKPT.value)
  ici = parse_mesh(MESH.value) if MESH.value else dict(config.mesh.ici)
  mesh = create_mesh(ici, dict(config.mesh.dcn))
  rules = tuple(tuple(r) for r in config.sharding_rules)
  pipe = load_pipeline(CKPT.value, TOKENIZERS.value, mesh, rules)
  items, failures = read_manifest(MANIFEST.value, pipe.plan,
                                  default_options(pipe.config, common.SEED.value),
                                  allow_outside=ALLOW_OUTSIDE_MEDIA.value)
  job = SamplingJob(pipe, mesh, rules, OUT.value, per_device_batch=PER_DEVICE_BATCH.value,
                    progress=not QUIET.value, on_changed=ON_CHANGED.value,
                    extra=dict(checkpoint=str(pathlib.Path(CKPT.value).resolve()),
                               manifest=str(pathlib.Path(MANIFEST.value).resolve()),
                               preset=pipe.config.get("preset")))
  return job.run(items, failures)


def main(argv: list[str]) -> int:
  del argv
  try:
    s = run()
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"codi-jax sample: error: {e}") from None
  if jax.process_index() == 0:
    print(f"{s['done']} done, {s['skipped']} skipped (already complete), {s['failed']} failed "
          f"of {s['lines']} lines; wall {s['wall_s']:.1f} s (compile {s['compile_s']:.1f} s, "
          f"sampling {s['sample_s']:.1f} s): {s['items_per_s']:.3f} items/s, "
          f"{s['items_per_s_per_device']:.3f} items/s/device on {s['devices']} device(s)")
    print(f"Wrote {pathlib.Path(OUT.value).resolve()}: summary.json, index.html, items/"
          + (", failures.jsonl (see why)" if s["failed"] else ""))
  return 0
