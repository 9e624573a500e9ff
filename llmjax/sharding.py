"""Device meshes, logical-axis rules, and helpers that place pytrees on a mesh.

The model names its axes logically ('embed', 'heads', 'mlp', ...). One table of rules maps those
names onto mesh axes ('data', 'fsdp', 'tensor'); changing the parallelism changes only the config.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llmjax.config import mesh_shape

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis (or axes). FSDP shards every weight along its embedding dimension,
# tensor parallelism shards heads / MLP / vocab, and the batch is split over data and fsdp.
DEFAULT_RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


def make_mesh(config, devices=None) -> Mesh:
  """The mesh named by config.mesh over `devices` (all devices by default).

  Axis types are Auto (GSPMD-style): shardings are given on jit inputs/outputs and as constraints
  on activations, and XLA propagates the rest. Explicit axes (the `jax.make_mesh` default in current
  JAX) would make sharding part of every array's type, which Flax linen's logical constraints do
  not need and which would make the same program fail to trace on a 1-device CPU mesh.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # noqa: BLE001 - unusual topologies: fall back to plain device order
    grid = np.asarray(devices).reshape(shape)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return Mesh(grid, MESH_AXES, axis_types=auto)


def logical_rules(config=None):
  return DEFAULT_RULES


def logical_to_sharding(logical_specs, mesh: Mesh, rules):
  """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Assembles global arrays from this process's rows (works on one host and on many)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
          for k, v in batch.items()}
