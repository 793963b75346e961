r"""Peak memory of `codi-jax convert`: does conversion stream (about one model copy)?

  .venv/bin/python benchmarks/convert_memory.py [--dtype float16|float32] [--workdir /tmp/x]

Writes a synthetic weight file holding the `full` preset's image VAE (83.7 M parameters; the other
parts of the model are the `tiny` preset's and are left out with --allow-missing) under the
released key names, in a child process, then converts it in another child process and reports
that process's peak RSS above its RSS just before conversion, against the float32 model size.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
OTHERS = ("model.diffusion_model.", "audioldm.", "optimus.", "clip.model.", "clap.model.")


def _config():
  from configs.codi import get_config

  config = get_config("tiny")
  with config.unlocked():
    config.model.image_vae = get_config("full").model.image_vae
  return config


def make(path: str, dtype: str) -> None:

  from codi_jax import checkpoint
  from codi_jax.convert import torch_io

  params = checkpoint.random_params(_config().model, 0, ["autokl"])
  state = {k: v.astype(dtype) for k, v in checkpoint.params_to_state(params).items()}
  torch_io.write_safetensors(path, state)
  print(json.dumps({"elements": int(sum(v.size for v in state.values()))}))


def convert(path: str, out: str) -> None:
  import os

  from codi_jax import checkpoint

  config = _config()
  checkpoint.part_shapes(config.model, "autokl")  # tracing happens before the baseline
  for part in checkpoint.PARTS:
    checkpoint.part_shapes(config.model, part)
  rss = lambda: int(open(f"/proc/{os.getpid()}/statm").read().split()[1]) * os.sysconf(
      "SC_PAGE_SIZE")
  base = rss()
  checkpoint.convert_files([path], config, out, allow_missing=OTHERS)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps({"baseline_rss": base, "peak_rss": peak}))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._child:
    role, a, b = args._child
    make(a, b) if role == "make" else convert(a, b)
    return
  work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="convert_memory."))
  src, out = work / "autokl.safetensors", work / "ckpt"
  child = lambda *a: json.loads(subprocess.run(
      [sys.executable, __file__, "--_child", *a], cwd=REPO, check=True, capture_output=True,
      text=True).stdout.strip().splitlines()[-1])
  made = child("make", str(src), args.dtype)
  got = child("convert", str(src), str(out))
  model = made["elements"] * 4
  delta = got["peak_rss"] - got["baseline_rss"]
  mb = lambda n: f"{n / 2**20:.0f} MiB"
  print(f"input {src.stat().st_size / 2**20:.0f} MiB ({args.dtype}); float32 model {mb(model)}; "
        f"RSS before conversion {mb(got['baseline_rss'])}, peak {mb(got['peak_rss'])}: "
        f"+{mb(delta)} = {delta / model:.2f}x the model")


if __name__ == "__main__":
  main()
