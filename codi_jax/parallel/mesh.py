"""Device meshes with axes ('data', 'fsdp', 'context', 'tensor').

Sizes come from the config: `ici` within a slice, `dcn` across slices (multi-slice TPU pods).
One size may be -1 and takes the remaining devices. Axes are explicitly `AxisType.Auto`
(JAX >= 0.10 `make_mesh` defaults to Explicit); sharding is driven by logical-axis rules.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "context", "tensor")


def resolve_sizes(sizes: Mapping[str, int], total: int, what: str = "mesh") -> tuple[int, ...]:
  """Per-axis sizes in AXES order with a single -1 filled so the product is `total`."""
  unknown = set(sizes) - set(AXES)
  if unknown:
    raise ValueError(f"{what}: unknown axes {sorted(unknown)}; axes are {AXES}")
  values = [int(sizes.get(a, 1)) for a in AXES]
  if values.count(-1) > 1:
    raise ValueError(f"{what}: at most one axis may be -1, got {dict(zip(AXES, values))}")
  if any(v == 0 or v < -1 for v in values):
    raise ValueError(f"{what}: sizes must be positive or -1, got {dict(zip(AXES, values))}")
  known = math.prod(v for v in values if v != -1)
  if -1 in values:
    if total % known:
      raise ValueError(f"{what}: {total} devices do not divide by {known}")
    values[values.index(-1)] = total // known
  if math.prod(values) != total:
    raise ValueError(f"{what}: sizes {dict(zip(AXES, values))} use {math.prod(values)} devices, "
                     f"have {total}")
  return tuple(values)


def create_mesh(ici: Mapping[str, int], dcn: Mapping[str, int] | None = None,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all); multi-slice when `dcn` has any size above 1."""
  devices = list(jax.devices() if devices is None else devices)
  dcn = dict(dcn or {})
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  dcn_sizes = resolve_sizes(dcn, num_slices, "mesh.dcn") if dcn else (1,) * len(AXES)
  per_slice = len(devices) // math.prod(dcn_sizes)
  ici_sizes = resolve_sizes(ici, per_slice, "mesh.ici")
  if math.prod(dcn_sizes) > 1:
    array = mesh_utils.create_hybrid_device_mesh(ici_sizes, dcn_sizes, devices)
  else:
    try:
      array = mesh_utils.create_device_mesh(ici_sizes, devices)
    except (NotImplementedError, ValueError):  # topologies the optimiser does not know
      array = np.asarray(devices).reshape(ici_sizes)
  return Mesh(array, AXES, axis_types=(AxisType.Auto,) * len(AXES))
