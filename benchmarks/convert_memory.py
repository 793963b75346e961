r"""Peak memory of `codi-jax convert`: does conversion stream (about one model copy at most)?

  .venv/bin/python benchmarks/convert_memory.py [--dtype float16|float32]
      [--format safetensors|torch] [--vae_channels 128] [--workdir /tmp/x] [--json out.json]

Writes a synthetic weight file holding an image VAE (the `full` preset's, 83.7 M parameters, by
default; `--vae_channels` scales it) under the released key names, in a child process, then
converts it in another child process (the other parts of the model are the `tiny` preset's and
are left out with --allow-missing). That child resets its peak-RSS counter just before
`convert_files` and reads it just after, so the peak over baseline is what conversion itself
needed (start-up costs that do not depend on the model come before the baseline: JAX's backends,
~200 MiB when libtpu is installed, and for a .pth input torch, ~180 MiB); it is reported
against the float32 size of the model.

Measured (2-core CPU VM, 319 MiB float32 model, safetensors input): before streaming +883 MiB
(fp32) / +924 MiB (fp16), 2.8-2.9x: every converted part held at once, the input's mapped pages
and orbax's defensive copy while saving. Now +345 to +356 MiB (1.08-1.12x) for fp16 or fp32,
.safetensors or .pth input: one part at a time, read pages released, no copy on save.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
OTHERS = ("model.diffusion_model.", "audioldm.", "optimus.", "clip.model.", "clap.model.")


def _config(vae_channels: int):
  from configs.codi import get_config

  config = get_config("tiny")
  with config.unlocked():
    config.model.image_vae = get_config("full").model.image_vae
    config.model.image_vae.ch = vae_channels
  return config


def make(path: str, dtype: str, vae_channels: int) -> dict:
  import numpy as np

  from codi_jax import checkpoint
  from codi_jax.convert import torch_io

  params = checkpoint.random_params(_config(vae_channels).model, 0, ["autokl"])
  state = {k: v.astype(dtype) for k, v in checkpoint.params_to_state(params).items()}
  if path.endswith(".safetensors"):
    torch_io.write_safetensors(path, state)
  else:
    import torch

    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)
  return {"elements": int(sum(v.size for v in state.values()))}


def _rss(field: str) -> int:
  """VmRSS / VmHWM of this process in bytes."""
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1]) * 1024
  raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
  """Sets the peak RSS (VmHWM) to the current RSS (Linux `clear_refs` 5); False if refused."""
  try:
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    return True
  except OSError:
    return False


def convert(path: str, out: str, vae_channels: int) -> dict:
  import gc

  import jax

  from codi_jax import checkpoint

  config = _config(vae_channels)
  for part in checkpoint.PARTS:  # tracing the shapes happens before the baseline
    checkpoint.part_shapes(config.model, part)
  jax.devices()  # so is starting JAX's backends (probing for a TPU maps libtpu: ~200 MiB)
  if not path.endswith(".safetensors"):
    import torch  # noqa: F401  (not counted: see the module docstring)
  gc.collect()
  base = _rss("VmRSS")
  if _reset_peak():
    checkpoint.convert_files([path], config, out, allow_missing=OTHERS)
    peak = _rss("VmHWM")
  else:  # the lifetime peak: an upper bound if anything before the baseline used more
    checkpoint.convert_files([path], config, out, allow_missing=OTHERS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return {"baseline_rss": base, "peak_rss": peak}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
  parser.add_argument("--format", default="safetensors", choices=["safetensors", "torch"])
  parser.add_argument("--vae_channels", type=int, default=128,
                      help="image VAE base width (128: the released 83.7 M-parameter VAE)")
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--json", default=None, help="also write the numbers to this file")
  parser.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._child:
    role, a, b, ch = args._child
    got = make(a, b, int(ch)) if role == "make" else convert(a, b, int(ch))
    print(json.dumps(got))
    return
  work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="convert_memory."))
  work.mkdir(parents=True, exist_ok=True)
  src = work / ("autokl.safetensors" if args.format == "safetensors" else "autokl.pth")
  out = work / "ckpt"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  child = lambda *a: json.loads(subprocess.run(
      [sys.executable, __file__, "--_child", *a, str(args.vae_channels)], cwd=REPO, env=env,
      check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
  made = child("make", str(src), args.dtype)
  got = child("convert", str(src), str(out))
  model = made["elements"] * 4
  delta = got["peak_rss"] - got["baseline_rss"]
  result = dict(input_bytes=src.stat().st_size, input_dtype=args.dtype, format=args.format,
                model_float32_bytes=model, **got, peak_minus_baseline=delta, ratio=delta / model)
  mb = lambda n: f"{n / 2**20:.0f} MiB"
  print(f"input {mb(result['input_bytes'])} ({args.format}, {args.dtype}); float32 model "
        f"{mb(model)}; baseline RSS {mb(got['baseline_rss'])}; peak RSS {mb(got['peak_rss'])}; "
        f"peak - baseline {mb(delta)} = {delta / model:.2f}x the model")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
