"""Device meshes, logical-axis rules, and helpers that place pytrees on a mesh.

The model names its axes logically ('embed', 'heads', 'mlp', ...). One table of rules in the config
(`mesh.rules`) maps those names onto mesh axes ('data', 'fsdp', 'sequence', 'tensor'); changing the
parallelism changes only the config, never the code.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llmjax.config import MESH_AXES, mesh_layout

BATCH_AXES = ("data", "fsdp")

# Rules are applied in this order. The order matters where two dimensions of one array ask for the
# same mesh axis: flax gives it to the first rule and leaves the later dimension unsharded. 'batch'
# comes first so activations [batch, length, embed] are split over (data, fsdp) on the batch axis
# and stay whole along 'embed' (whose weights FSDP shards over the same 'fsdp' axis).
RULE_ORDER = ("batch", "length", "layers", "vocab", "heads", "kv_heads", "mlp", "embed", "kv",
              "lora_rank")


def _slice_ids(devices) -> set:
  return {getattr(d, "slice_index", 0) for d in devices}


def num_slices(config, devices) -> int:
  """How many slices the devices span: TPU slices where devices carry distinct slice indices;
  otherwise processes when the config asks for DCN parallelism (multi-host GPU/CPU: each host is
  a 'slice'; CPU and GPU devices report slice_index 0 everywhere)."""
  slices = len(_slice_ids(devices))
  if slices > 1:
    return slices
  wants_dcn = any(int(config.mesh.dcn[a]) != 1 for a in MESH_AXES)
  return len({d.process_index for d in devices}) if wants_dcn else 1


def make_mesh(config, devices=None) -> Mesh:
  """The mesh named by config.mesh over `devices` (all devices by default).

  Axis types are Auto (GSPMD-style): shardings are given on jit inputs/outputs and as logical
  constraints on activations, and XLA's partitioner propagates the rest and inserts collectives.
  Explicit axes (the `jax.make_mesh` default in current JAX) would make sharding part of every
  array's type, so every op whose output sharding is ambiguous (e.g. an einsum contracting an
  fsdp-sharded dimension) would need an explicit out_sharding in model code; the model is meant to
  know nothing about meshes, and flax linen's logical constraints are built for Auto meshes.
  """
  devices = list(jax.devices() if devices is None else devices)
  slices = num_slices(config, devices)
  ici, dcn = mesh_layout(config, len(devices), slices)
  ici_shape = tuple(ici[a] for a in MESH_AXES)
  dcn_shape = tuple(dcn[a] for a in MESH_AXES)
  if slices > 1:
    # Inner (ICI) axes stay within a slice; DCN axes step across slices/hosts.
    grid = mesh_utils.create_hybrid_device_mesh(
        ici_shape, dcn_shape, devices, process_is_granule=len(_slice_ids(devices)) == 1)
  else:
    try:  # TPU: lay the axes out along the physical torus
      grid = mesh_utils.create_device_mesh(ici_shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
      grid = np.asarray(devices).reshape(ici_shape)  # unusual topologies: plain device order
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return Mesh(grid, MESH_AXES, axis_types=auto)


def use_mesh(mesh: Mesh):
  """Context that makes `mesh` current for tracing. It must be `jax.set_mesh` (not the legacy
  `with mesh:`): flax's logical activation constraints look for the abstract mesh that only
  `set_mesh` installs, and silently do nothing without it."""
  return jax.set_mesh(mesh)


def logical_rules(config) -> tuple:
  """The config's mesh.rules as flax logical-axis rules: ((logical name, mesh axes|None), ...)."""
  table = config.mesh.rules.to_dict()
  names = [n for n in RULE_ORDER if n in table] + sorted(n for n in table if n not in RULE_ORDER)
  rules = []
  for name in names:
    axes = tuple(a.strip() for a in table[name].split(",") if a.strip())
    rules.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
  return tuple(rules)


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def fit_spec(spec: P, shape, sizes) -> P:
  """Drops mesh axes that do not divide their dimension (e.g. 2 kv heads on tensor=4, or an odd
  vocabulary on tensor=2): that dimension is then replicated over those axes instead of failing.
  sizes: mesh axis -> size (e.g. `mesh.shape`)."""
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    kept, size = [], 1
    for axis in _axes(entry):
      if dim % (size * sizes[axis]) == 0:
        kept.append(axis)
        size *= sizes[axis]
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


def logical_to_spec(names, rules) -> P:
  return nn.logical_to_mesh_axes(names, rules)


def tree_shardings(boxed_abstract, mesh: Mesh, rules):
  """NamedShardings for every leaf of a boxed (nn.Partitioned) abstract pytree, fitted to shapes."""
  logical = nn.get_partition_spec(boxed_abstract)
  shapes = nn.meta.unbox(boxed_abstract)
  is_spec = lambda x: isinstance(x, P)
  def sharding(names, leaf):
    if not hasattr(leaf, "shape"):  # an empty node, e.g. optax's MaskedNode (Muon's Adam part)
      return leaf
    return NamedSharding(mesh, fit_spec(logical_to_spec(names, rules), leaf.shape, mesh.shape))
  return jax.tree.map(sharding, logical, shapes, is_leaf=is_spec)


def logical_to_sharding(logical_specs, mesh: Mesh, rules):
  """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh` (no shape fitting)."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Assembles global arrays from this process's rows (works on one host and on many)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
          for k, v in batch.items()}


def bytes_per_device(tree) -> int:
  """Bytes one device holds for a pytree of arrays or sharded ShapeDtypeStructs (largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) else leaf.shape
    total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
  return total
