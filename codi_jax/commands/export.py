"""codi-jax export: a codi-jax checkpoint -> one safetensors file.

  codi-jax export --ckpt checkpoints/codi --format safetensors --names torch --out codi.safetensors
  codi-jax export --ckpt checkpoints/codi --names flax --out codi_flax.safetensors

--names torch: the original CoDi keys and tensor layouts (`checkpoint.params_to_state`), so the
file loads into PyTorch CoDi (`load_state_dict(safetensors.torch.load_file(...), strict=False)`)
for the parts present; the deterministic buffers the original registers (DDPM schedule, STFT
bases, position ids, attention masks) are not exported. --names flax: our parameter paths,
"<part>/<path joined by '/'>", in our layouts. float32; written atomically.
"""

from __future__ import annotations

from absl import flags

from codi_jax import checkpoint

CKPT = flags.DEFINE_string("ckpt", None, "Checkpoint directory (from `codi-jax convert` or "
                           "training) (required).")
FORMAT = flags.DEFINE_enum("format", "safetensors", ["safetensors"], "Output file format.")
NAMES = flags.DEFINE_enum("names", "torch", ["torch", "flax"],
                          "Original CoDi keys and layouts, or our Flax paths.")
OUT = flags.DEFINE_string("out", None, "Output file (required).")
PARTS = flags.DEFINE_list("parts", None, "Parts to export (default: all in the checkpoint).")


def main(argv: list[str]) -> int:
  del argv
  if not CKPT.value or not OUT.value:
    raise SystemExit("codi-jax export: --ckpt and --out are required")
  try:
    count = checkpoint.export_file(CKPT.value, OUT.value, names=NAMES.value, parts=PARTS.value)
  except ValueError as e:
    print(f"codi-jax export: {e}")
    return 1
  print(f"wrote {OUT.value}: {count} tensors ({NAMES.value} names)")
  return 0
