"""codi-jax export: a codi-jax checkpoint -> one safetensors file.

  codi-jax export --ckpt checkpoints/codi --format safetensors --names torch --out codi.safetensors
  codi-jax export --ckpt checkpoints/codi --names flax --out codi_flax.safetensors

--names torch: the original CoDi's state dict for the parts present (`checkpoint.params_to_state`):
its keys and tensor layouts, float32 parameters, and every buffer it registers, regenerated with
its values and dtypes (`convert.buffers`: CLIP position ids and CLAP index tables as int64, GPT-2
causal masks, the tied `lm_head.weight`, CLAP's shifted-window masks, AudioLDM's STFT bases and
mel filters, and with the diffusers the DDPM schedule), so a freshly built PyTorch CoDi takes it
with `load_state_dict(safetensors.torch.load_file(...), strict=True)` (for some parts only:
strict=False). --lazy_buffers adds CLAP's torchlibrosa STFT/mel constants, which the original
creates at its first forward call. --names flax: our parameter paths, "<part>/<path joined by
'/'>", in our layouts, float32. Written atomically.
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
LAZY_BUFFERS = flags.DEFINE_bool(
    "lazy_buffers", False, "With --names torch, also write the tensors the original creates at "
    "its first forward call (CLAP's torchlibrosa front-end), for a CoDi that has already run.")


def main(argv: list[str]) -> int:
  del argv
  if not CKPT.value or not OUT.value:
    raise SystemExit("codi-jax export: --ckpt and --out are required")
  try:
    count = checkpoint.export_file(CKPT.value, OUT.value, names=NAMES.value, parts=PARTS.value,
                                   lazy_buffers=LAZY_BUFFERS.value)
  except ValueError as e:
    print(f"codi-jax export: {e}")
    return 1
  print(f"wrote {OUT.value}: {count} tensors ({NAMES.value} names)")
  return 0
