"""codi-jax inspect: parameter counts of a configuration, without allocating parameters.

  codi-jax inspect --config configs/codi.py:full --params [--json counts.json]
      [--manifest tests/fixtures/codi_reference/manifest_full.json]

Counts come from `jax.eval_shape` of the real initialiser. The JSON has the structure of the
original's `manifest_full.json` (`total_parameters`, `parameter_counts_per_component`,
`unet_parameter_counts_main_vs_cross_modal`). With --manifest, every count is compared.
"""

from __future__ import annotations

import json

from absl import flags

from codi_jax import param_report
from codi_jax.commands import common
from codi_jax.io_utils import atomic_write_json

PARAMS = flags.DEFINE_bool("params", True, "Report parameter counts per component.")
MANIFEST = flags.DEFINE_string("manifest", None, "Compare with this manifest_full.json.")


def main(argv: list[str]) -> int:
  del argv
  if not PARAMS.value:
    raise SystemExit("codi-jax inspect: nothing to report (pass --params)")
  config = common.CONFIG.value
  report = param_report.model_report(config.model)
  manifest = json.load(open(MANIFEST.value)) if MANIFEST.value else {}
  mismatches = 0
  print(f"preset {config.get('preset', '?')}: {report['total_parameters']:,} parameters")
  for name, ours, theirs in param_report.compare_with_manifest(report, manifest):
    mark = ""
    if manifest:
      ok = ours == theirs
      mismatches += not ok
      mark = "  = manifest" if ok else f"  != manifest {theirs if theirs is not None else 'n/a'}"
    print(f"  {name:58s} {ours:>15,}{mark}")
  if common.JSON.value:
    atomic_write_json(common.JSON.value, report)
  return 1 if mismatches else 0
