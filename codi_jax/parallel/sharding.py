"""Logical axis names -> shardings, sharded parameter creation, and batch placement.

Rules are data: an ordered sequence of (logical name, mesh axes or None). For each array, rules
are tried in order; a dim with that logical name takes the rule's mesh axes when they are not yet
used by another dim of the same array and divide the dim's size. Otherwise the next rule is tried
and, failing all, the dim is replicated. So a 1706-wide dim on an 8-way axis is replicated rather
than an error, and a kernel whose output width does not divide falls back to its input width.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | Sequence[str] | None]]
PyTree = Any


def _axes(value) -> tuple[str, ...]:
  if value is None:
    return ()
  return (value,) if isinstance(value, str) else tuple(value)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], rules: Rules,
                    mesh: Mesh) -> PartitionSpec:
  """PartitionSpec for an array with logical axis `names` and `shape` on `mesh`."""
  if len(names) != len(shape):
    raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
  assigned: list[tuple[str, ...] | None] = [None] * len(names)
  used: set[str] = set()
  for logical, mesh_axes in rules:
    axes = tuple(a for a in _axes(mesh_axes) if mesh.shape[a] > 1)
    for i, name in enumerate(names):
      if name != logical or assigned[i] is not None:
        continue
      if not axes:
        assigned[i] = ()
        continue
      size = math.prod(mesh.shape[a] for a in axes)
      if used.isdisjoint(axes) and shape[i] % size == 0:
        assigned[i] = axes
        used.update(axes)
  spec = [None if not a else (a[0] if len(a) == 1 else a) for a in assigned]
  return PartitionSpec(*spec)


def logical_shardings(abstract: PyTree, mesh: Mesh, rules: Rules) -> PyTree:
  """NamedShardings for a tree of `nn.LogicallyPartitioned` (e.g. from `jax.eval_shape(init)`)."""

  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, logical_to_spec(leaf.names, leaf.value.shape, rules, mesh))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree_util.tree_map(one, abstract,
                                is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def sharded_init(init_fn: Callable[[], PyTree], mesh: Mesh, rules: Rules
                 ) -> tuple[PyTree, PyTree]:
  """Creates params directly in their shards: eval_shape -> shardings -> jit(out_shardings).

  Returns (plain params, their shardings); nothing full-size is ever materialised on one device.
  """
  with nn.logical_axis_rules(()):  # flax's own per-parameter constraints know no divisibility
    abstract = jax.eval_shape(init_fn)
    shardings = logical_shardings(abstract, mesh, rules)
    params = jax.jit(lambda: unbox(init_fn()), out_shardings=shardings)()
  return params, shardings


def unbox(tree: PyTree) -> PyTree:
  """Plain arrays from `nn.LogicallyPartitioned` boxes, adding no sharding constraint (the
  caller's out_shardings decide, with this module's divisibility-aware rules)."""
  return jax.tree_util.tree_map(
      lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x, tree,
      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def place_batch(batch: PyTree, mesh: Mesh, rules: Rules, batch_axis_name: str = "batch"
                ) -> PyTree:
  """Global arrays from each process's local shard, split over the mesh's batch axes."""

  def one(x):
    x = np.asarray(x)
    names = (batch_axis_name,) + (None,) * (x.ndim - 1)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    sharding = NamedSharding(mesh, logical_to_spec(names, global_shape, rules, mesh))
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree_util.tree_map(one, batch)
