"""Parameter counts per component from `jax.eval_shape` (no memory), in the manifest's structure.

`manifest_full.json` (the original's full state dict) names components `unet_image_video`,
`unet_text`, `unet_audio`, `autokl`, `audioldm_vae`, `hifigan_vocoder`, `optimus`, `clip`, `clap`
and splits each UNet into `main` and `cross_modal/<subtree>`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.core.meta
import flax.traverse_util

from codi_jax import components
from codi_jax.models.codi import CoDiConfig, codi_config_from_dict, param_shapes

CROSS_MODAL = ("connecters_out", "input_block_connecters_in", "output_block_connecters_in")
COMPONENT_NAMES = {"unet_image": "unet_image_video", "unet_text": "unet_text",
                   "unet_audio": "unet_audio"}


def count(tree: Any) -> int:
  leaves = flax.traverse_util.flatten_dict(flax.core.meta.unbox(tree)).values()
  return sum(math.prod(leaf.shape) for leaf in leaves)


def diffuser_report(config: CoDiConfig) -> dict[str, Any]:
  """{'total_parameters', 'parameter_counts_per_component',
  'unet_parameter_counts_main_vs_cross_modal'} for the diffusers of `config`."""
  params = flax.core.meta.unbox(param_shapes(config))
  per_component, split = {}, {}
  for branch, tree in params.items():
    name = COMPONENT_NAMES[branch]
    per_component[name] = count(tree)
    split[f"{name}/main"] = count({k: v for k, v in tree.items() if k not in CROSS_MODAL})
    for sub in CROSS_MODAL:
      split[f"{name}/cross_modal/{sub}"] = count(tree.get(sub, {}))
  return {
      "total_parameters": sum(per_component.values()),
      "parameter_counts_per_component": per_component,
      "unet_parameter_counts_main_vs_cross_modal": split,
  }


def model_report(model: Mapping[str, Any]) -> dict[str, Any]:
  """The diffusers' report plus every other component of `config.model` (the whole CoDi)."""
  report = diffuser_report(codi_config_from_dict(model))
  for c in components.COMPONENTS:
    report["parameter_counts_per_component"][c.name] = count(c.shapes(model))
  report["total_parameters"] = sum(report["parameter_counts_per_component"].values())
  return report


def compare_with_manifest(report: Mapping[str, Any], manifest: Mapping[str, Any]
                          ) -> list[tuple[str, int, int | None]]:
  """(name, ours, manifest's) for every count we report."""
  rows = []
  for section in ("parameter_counts_per_component", "unet_parameter_counts_main_vs_cross_modal"):
    for name, ours in report[section].items():
      rows.append((name, ours, manifest.get(section, {}).get(name)))
  return rows
