"""codi-jax parity: compare our modules with the original CoDi's reference fixtures.

  codi-jax parity --fixtures tests/fixtures/codi_reference [--only unet_codi,ddim_sampler]
      [--json parity.json] [--tokenizers DIR]
  codi-jax parity --fixtures tests/fixtures/codi_e2e

Every `.npz` fixture in the folder (or those named by --only) is rebuilt from its own config,
loaded through the key map and run; one row per stored output is printed. Exit status 0 only if
every output of every selected file passes; a file or output that cannot be handled fails.
`tests/fixtures/codi_reference` in a checkout of the repository is the development set (the
fixtures are not installed with the package); `tests/fixtures/codi_e2e` holds end-to-end runs of
the original's inference, checked through the whole pipeline (`codi_jax.parity.e2e`). The
CLIP/Optimus fixtures also check our tokenizers on the real vocabularies: --tokenizers, else
$CODI_TOKENIZERS, else the bundled ones.
"""

from __future__ import annotations

import os
import pathlib
import sys

from absl import flags, logging

from codi_jax import parity
from codi_jax.commands import common
from codi_jax.io_utils import atomic_write_json

FIXTURES = flags.DEFINE_string("fixtures", None, "Folder of reference fixture .npz files.")
ONLY = flags.DEFINE_list("only", None, "Only these fixtures (names with or without .npz).")
TOKENIZERS = flags.DEFINE_string("tokenizers", None, common.TOKENIZERS_HELP)


def _print_file(name: str, rows: dict[str, parity.Row]) -> None:
  for key, row in rows.items():
    status = "pass" if row.passed else "FAIL"
    note = "".join(f"  ({text})" for text in (row.note, row.error) if text)
    print(f"{status}  {name:24s} {key:56s} max_abs={row.max_abs:.3e}  tol={row.tol:.3e}{note}")
  sys.stdout.flush()


def main(argv: list[str]) -> int:
  del argv
  if not FIXTURES.value:
    raise SystemExit("codi-jax parity: --fixtures DIR is required")
  logging.set_verbosity(logging.WARNING)
  if TOKENIZERS.value:
    os.environ["CODI_TOKENIZERS"] = TOKENIZERS.value
  try:
    results = parity.run(pathlib.Path(FIXTURES.value), ONLY.value, on_file=_print_file)
  except FileNotFoundError as e:
    raise SystemExit(f"codi-jax parity: {e}") from None
  rows = [r for file_rows in results.values() for r in file_rows.values()]
  failed = sum(not r.passed for r in rows)
  if common.JSON.value:
    atomic_write_json(common.JSON.value, {f: {k: r.as_json() for k, r in fr.items()}
                                          for f, fr in results.items()})
  print(f"parity: {len(rows) - failed} of {len(rows)} outputs within tolerance "
        f"in {len(results)} files" + (f"; {failed} FAILED" if failed else ""))
  return 1 if failed else 0
