"""LoRA: low-rank adapters on chosen dense layers of a frozen model.

A targeted layer computes y = x W (+ b) + (alpha / rank) * dropout(x) A B, with A [in, rank]
initialized like PEFT (uniform, bound 1/sqrt(fan_in)) and B [rank, out] at zero, so an untrained
adapter gives exactly the base model. A and B are ordinary parameters named `lora_a` / `lora_b`
next to the layer's `kernel` (params['layers']['attn']['query']['lora_a'], stacked along the same
'layers' axis as the kernel), with logical axis names taken from the kernel's plus 'lora_rank'
(replicated), so adapters shard, scan, unroll, checkpoint and decode like every other weight.

How it attaches: `with_lora(model, spec)` returns the same model class with a flax method
interceptor around its `__call__`. The interceptor sees every `DenseGeneral` call, and for the
targeted ones creates/reads A and B in that layer's own scope and adds the low-rank term after
the base matmul. The base matmul is untouched, so an int8 (QLoRA) base still goes through
`layers.dense_weight`, and no shared model file knows about adapters. (Why not qwix: its linen
LoRA intercepts jax dot primitives by module-path regex and names/initializes the adapter
parameters itself; here the adapter must carry this model's logical axis names, keep the
per-head kernel layout the PEFT converter maps, and sit on top of the existing int8 weights.
Flax's own interceptor, which qwix also builds on, does all of that in a page.)

The token table ("embedding" target) has no DenseGeneral to intercept: the LoRA model class
offers `adapted_table(table)`, which `transformer.embed_tokens` calls on the table it looked up,
so the table becomes E + (alpha / rank) A B with A [vocab, rank] at zero and B [rank, embed]
random (PEFT's initialization for embeddings, where the vocabulary side starts at zero), in a
param dict "token_embedding_lora". With tied embeddings the output head reads the same adapted
table, so input and output change together. (Why: a base pretrained on prose has nearly
interchangeable digit embeddings, and frozen embeddings were what kept rank-8 LoRA on the
attention matrices from learning three-digit addition: benchmarks/RESULTS.md, issue 10.)

`adapters=False` in a call switches every adapter off (DPO's reference policy is the base model,
with no second copy of the weights).

Parameter-tree helpers (`split`, `combine`, `merge`, `trainable_mask`) work on plain dicts.
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llmjax.model.config import TransformerConfig
from llmjax.model.layers import DenseGeneral

ADAPTER_LEAVES = ("lora_a", "lora_b")
# User-facing target names. 'down' is the MLP output projection (llmjax names it 'proj'); 'up' is
# GPT-2's single MLP input projection ('fc') or Llama's up projection.
TARGETS = ("query", "key", "value", "out", "gate", "up", "down", "lm_head", "embedding")
EMBEDDING_ADAPTER = "token_embedding_lora"  # param dict of the token table's adapter
ADAPTER_KEYS = (*ADAPTER_LEAVES, EMBEDDING_ADAPTER)  # every param key that only adapters have
GROUPS = {"attn": ("query", "key", "value", "out"), "mlp": ("gate", "up", "down"),
          "all": ("query", "key", "value", "out", "gate", "up", "down")}
_MLP_SITES = {"gate": "gate", "up": "up", "fc": "up", "proj": "down"}
_ATTN_SITES = ("query", "key", "value", "out")


class LoraError(ValueError):
  """A LoRA setting that does not fit the model (reported as one line, exit status 2)."""


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  rank: int
  alpha: float
  targets: tuple[str, ...]   # canonical target names (see TARGETS)
  dropout: float = 0.0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def available_targets(cfg: TransformerConfig) -> tuple[str, ...]:
  """The target names this model has dense layers for."""
  names = ["query", "key", "value", "out", "up", "down"]
  if cfg.mlp == "swiglu":
    names.insert(4, "gate")
  if not cfg.tie_embeddings:
    names.append("lm_head")
  if cfg.family in ("decoder", "encoder"):  # the families whose table transformer.embed_tokens makes
    names.append("embedding")
  return tuple(names)


def layer_dims(cfg: TransformerConfig, target: str) -> tuple[int, int]:
  """(fan_in, fan_out) of a target layer: the bound on a useful rank."""
  d, hd, f = cfg.embed_dim, cfg.dim_per_head, cfg.hidden_dim
  return {"query": (d, cfg.num_heads * hd), "key": (d, cfg.kv_heads * hd),
          "value": (d, cfg.kv_heads * hd), "out": (cfg.num_heads * hd, d),
          "gate": (d, f), "up": (d, f), "down": (f, d), "lm_head": (d, cfg.vocab_size),
          "embedding": (cfg.vocab_size, d)}[target]


def make_spec(cfg: TransformerConfig, rank: int, alpha: float, targets: str | tuple,
              dropout: float = 0.0) -> LoraSpec:
  """Validated LoraSpec for this model; raises LoraError with a one-line fix."""
  names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
  names = [t for t in names if t]
  have = available_targets(cfg)
  if rank <= 0:
    raise LoraError(f"lora.rank={rank} must be positive (e.g. --config.lora.rank=8)")
  if not names:
    raise LoraError(f"lora.targets is empty; name some of {', '.join(have)} (or attn, mlp, all)")
  if not 0.0 <= dropout < 1.0:
    raise LoraError(f"lora.dropout={dropout} must be in [0, 1)")
  if alpha <= 0:
    raise LoraError(f"lora.alpha={alpha} must be positive (the adapter scale is alpha/rank)")
  chosen = []
  for name in names:
    if name in GROUPS:
      chosen += [t for t in GROUPS[name] if t in have]
    elif name not in have:
      why = {"gate": f"model.mlp={cfg.mlp!r} has no gate projection",
             "embedding": f"model.family={cfg.family!r} keeps its own token tables",
             "lm_head": "the output head is tied to the token embedding (model.tie_embeddings)"}
      reason = why.get(name, "it is not a LoRA target")
      raise LoraError(f"lora.targets names {name!r}, which names no layer of this model "
                      f"({reason}); choose from {', '.join(have)} or the groups attn, mlp, all")
    else:
      chosen.append(name)
  chosen = tuple(t for t in TARGETS if t in chosen)  # canonical order, no repeats
  for name in chosen:
    fan_in, fan_out = layer_dims(cfg, name)
    if rank > min(fan_in, fan_out):
      raise LoraError(f"lora.rank={rank} is larger than the {name} layer ({fan_in} x {fan_out}); "
                      f"use a rank of at most {min(fan_in, fan_out)}")
  return LoraSpec(rank=int(rank), alpha=float(alpha), targets=chosen, dropout=float(dropout))


def site_of(module: nn.Module) -> str | None:
  """The LoRA target name of a DenseGeneral module, from its name and its parent's."""
  parent = getattr(module.parent, "name", None)
  if parent == "attn" and module.name in _ATTN_SITES:
    return module.name
  if parent == "mlp" and module.name in _MLP_SITES:
    return _MLP_SITES[module.name]
  if module.name == "lm_head":
    return "lm_head"
  return None


def _adapter_delta(module: DenseGeneral, x, spec: LoraSpec, deterministic: bool, enabled: bool):
  """Creates (at init) or reads this layer's A and B; returns scale * dropout(x) A B or None."""
  in_axes = module.in_axes
  in_shape, out_shape = x.shape[-in_axes:], tuple(module.out_shape)
  names_in, names_out = module.kernel_axes[:in_axes], module.kernel_axes[in_axes:]
  init_a = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform",
                                            in_axis=tuple(range(in_axes)), out_axis=-1)
  a = module.param("lora_a", nn.with_logical_partitioning(init_a, (*names_in, "lora_rank")),
                   (*in_shape, spec.rank), jnp.float32)
  b = module.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                          ("lora_rank", *names_out)),
                   (spec.rank, *out_shape), jnp.float32)
  if not enabled:
    return None
  dtype = module.cfg.compute_dtype
  if spec.dropout > 0 and not deterministic:
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - spec.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - spec.dropout), 0)
  lead = x.shape[: x.ndim - in_axes]
  flat = x.astype(dtype).reshape(math.prod(lead), math.prod(in_shape))
  h = jnp.dot(flat, a.astype(dtype).reshape(math.prod(in_shape), spec.rank))
  delta = jnp.dot(h, b.astype(dtype).reshape(spec.rank, -1)) * jnp.asarray(spec.scale, dtype)
  return delta.reshape(*lead, *out_shape)


class EmbeddingAdapter(nn.Module):
  """The token table's adapter: table + scale * A B (A [vocab, rank] zero, B [rank, embed]
  normal, as PEFT initializes embedding adapters); no dropout (its input is a token id)."""
  spec: LoraSpec

  @nn.compact
  def __call__(self, table, enabled: bool):
    vocab, dim = table.shape
    a = self.param("lora_a", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                          ("vocab", "lora_rank")),
                   (vocab, self.spec.rank), jnp.float32)
    b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                          ("lora_rank", "embed")),
                   (self.spec.rank, dim), jnp.float32)
    if not enabled:
      return table
    table = _float(table)  # an int8 (QLoRA) table is dequantized, then adapted
    return (table.astype(jnp.float32) + self.spec.scale * (a @ b)).astype(table.dtype)


# whether the adapters of the call being traced are on (the token table is adapted outside the
# DenseGeneral interceptor, so it reads the flag here)
_ENABLED = contextvars.ContextVar("lora_adapters_enabled", default=True)


def _interceptor(spec: LoraSpec, deterministic: bool, enabled: bool):
  def intercept(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, DenseGeneral):
      return y
    if site_of(module) not in spec.targets:
      return y
    delta = _adapter_delta(module, args[0], spec, deterministic, enabled)
    return y if delta is None else y + delta.astype(y.dtype)
  return intercept


@functools.cache
def _lora_class(base_cls):
  signature = inspect.signature(base_cls.__call__)

  def __call__(self, *args, adapters: bool = True, **kwargs):
    bound = signature.bind(self, *args, **kwargs)
    bound.apply_defaults()
    deterministic = bool(bound.arguments.get("deterministic", True))
    flag = _ENABLED.set(adapters)
    try:
      with nn.intercept_methods(_interceptor(self.lora, deterministic, adapters)):
        return base_cls.__call__(self, *args, **kwargs)
    finally:
      _ENABLED.reset(flag)

  @nn.nowrap  # runs inside __call__'s compact scope (transformer.embed_tokens)
  def adapted_table(self, table):
    if "embedding" not in self.lora.targets:
      return table
    return EmbeddingAdapter(self.lora, name=EMBEDDING_ADAPTER)(table, _ENABLED.get())

  __call__.__doc__ = (f"{base_cls.__name__}.__call__ with LoRA adapters; adapters=False runs "
                      "the base model alone.")
  return type(f"Lora{base_cls.__name__}", (base_cls,),
              {"__annotations__": {"lora": LoraSpec}, "lora": None, "__call__": __call__,
               "adapted_table": adapted_table, "__module__": __name__})


def with_lora(model: nn.Module, spec: LoraSpec | None) -> nn.Module:
  """`model` with adapters on `spec.targets` (the model itself when spec is None)."""
  if spec is None:
    return model
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.init and f.name not in ("parent", "name")}
  return _lora_class(type(model))(**fields, lora=spec)


def spec_of(model) -> LoraSpec | None:
  return getattr(model, "lora", None)


# ------------------------------------------------------------------------------ parameter trees
def _is_adapter_key(key) -> bool:
  return getattr(key, "key", key) in ADAPTER_LEAVES


def trainable_mask(params):
  """True on adapter leaves (lora_a, lora_b), False on every base weight."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: bool(path) and _is_adapter_key(path[-1]), params,
      is_leaf=lambda x: not isinstance(x, dict))


def split(params) -> tuple[dict, dict]:
  """(adapter, base): two nested dicts sharing the arrays of `params`."""
  adapter, base = {}, {}
  for key, value in params.items():
    if isinstance(value, dict):
      a, b = split(value)
      if a:
        adapter[key] = a
      if b:
        base[key] = b
    elif key in ADAPTER_LEAVES:
      adapter[key] = value
    else:
      base[key] = value
  return adapter, base


def combine(base, adapter) -> dict:
  """The base tree with the adapter leaves added (no array is copied): swapping adapters on one
  loaded base is just combine(base, other_adapter)."""
  out = dict(base)
  for key, value in adapter.items():
    if key == EMBEDDING_ADAPTER and key not in out:  # the token table's adapter: all adapter
      out[key] = value
    elif isinstance(value, dict):
      if key not in out:
        raise LoraError(f"the adapter has weights for {key!r}, which the base model lacks")
      out[key] = combine(out[key], value)
    else:
      out[key] = value
  return out


def has_adapters(params) -> bool:
  return bool(split(params)[0])


def _float(w):
  return w.dequantize() if hasattr(w, "dequantize") else w


def merge(params, spec: LoraSpec, dtype=None) -> dict:
  """Base params with every adapter folded in: W + (alpha/rank) A B, computed in float32 (an int8
  base is dequantized first); adapter leaves removed. The merged kernel is cast to `dtype`
  (default: float32)."""
  def walk(tree):
    out = {}
    for key, value in tree.items():
      if key == EMBEDDING_ADAPTER:  # the token table's adapter: folded into the table below
        continue
      if isinstance(value, dict):
        out[key] = walk(value)
      elif key not in ADAPTER_LEAVES:
        out[key] = value
    if EMBEDDING_ADAPTER in tree:
      e = tree[EMBEDDING_ADAPTER]
      table = jnp.asarray(_float(tree["token_embedding"]), jnp.float32)
      delta = jnp.asarray(e["lora_a"], jnp.float32) @ jnp.asarray(e["lora_b"], jnp.float32)
      out["token_embedding"] = (table + spec.scale * delta).astype(dtype or jnp.float32)
    if "lora_a" in tree:
      a = jnp.asarray(tree["lora_a"], jnp.float32)
      b = jnp.asarray(tree["lora_b"], jnp.float32)
      w = jnp.asarray(_float(tree["kernel"]), jnp.float32)
      stacked = a.ndim + b.ndim - 2 == w.ndim + 1  # a leading 'layers' axis on all three
      lead = a.shape[:1] if stacked else ()
      a2 = a.reshape(*lead, -1, spec.rank)
      b2 = b.reshape(*lead, spec.rank, -1)
      delta = jnp.einsum("...ir,...ro->...io", a2, b2).reshape(w.shape) * spec.scale
      out["kernel"] = (w + delta).astype(dtype or jnp.float32)
    return out
  return walk(params)


def num_adapter_params(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(split(params)[0]))
