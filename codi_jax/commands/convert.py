"""codi-jax convert: the released PyTorch CoDi weights -> a codi-jax checkpoint.

  codi-jax convert --config configs/codi.py:full --out checkpoints/codi \
      --torch CoDi_encoders.pth CoDi_text_diffuser.pth CoDi_audio_diffuser_m.pth \
              CoDi_video_diffuser_8frames.pth
  codi-jax convert --torch CoDi_encoders.pth --allow-missing model.diffusion_model. --out enc

Reads .pth/.pt (fp32 or fp16; `torch.load(weights_only=True, mmap=True)`, so no pickled code
runs) or .safetensors files; a key in a later file wins, as in the original's loader. Every key
is routed to its part by prefix (`checkpoint.route`: `model.diffusion_model.` -> diffusers,
`autokl.`, `audioldm.`, `audioldm.vocoder.`, `optimus.`, `clip.model.`, `clap.model.`) and
checked against the config from the files' indices, before any tensor is read. Prints a table of
loaded / missing / unexpected / mismatched keys per part and fails unless every missing key lies
under an --allow-missing prefix and nothing is unexpected or mismatched; a part loaded only in
part is an error (configure the model without the missing branch instead). Then each complete
part is converted one tensor at a time to float32 in our layout and written at once, so memory
peaks at about the largest part in float32 (`benchmarks/convert_memory.py`). The checkpoint
(`checkpoint.load_model` format) is assembled beside --out and renamed into place: a failed run
leaves nothing there.
"""

from __future__ import annotations

from absl import flags

from codi_jax import checkpoint
from codi_jax.commands import common

TORCH = flags.DEFINE_list("torch", None, "Weight files (.pth/.pt/.ckpt/.bin or .safetensors), "
                          "comma- or space-separated; later files win on duplicate keys.")
OUT = flags.DEFINE_string("out", None, "Checkpoint directory to write (required).")
ALLOW_MISSING = flags.DEFINE_list("allow-missing", [],
                                  "Original-key prefixes whose keys may be absent (their parts "
                                  "are then not written).")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out checkpoint.")


def main(argv: list[str]) -> int:
  # `--torch a.pth b.pth`: absl takes a comma-separated list, the rest arrive as arguments.
  files = list(TORCH.value or []) + list(argv[1:])
  if not files or not OUT.value:
    raise SystemExit("codi-jax convert: --torch and --out are required")
  try:
    result = checkpoint.convert_files(files, common.CONFIG.value, OUT.value,
                           allow_missing=ALLOW_MISSING.value, overwrite=OVERWRITE.value)
  except ValueError as e:  # ConversionError, WeightFileError, an existing --out
    print(f"codi-jax convert: {e}")
    return 1
  print(result.table())
  print(f"wrote {OUT.value}: {', '.join(result.parts)}")
  return 0
