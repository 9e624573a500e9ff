"""LoRA adapters <-> Hugging Face PEFT's format (adapter_config.json + adapter_model.safetensors).

PEFT keeps per module `lora_A.weight` [rank, in] and `lora_B.weight` [out, rank] under the HF
module's name ("base_model.model.<module>.lora_A.weight") and computes
y = base(x) + scaling * B(A(dropout(x))) with scaling = alpha / rank per module
(`rank_pattern` / `alpha_pattern` override the global r / lora_alpha for matching modules).
llmjax keeps A [*in, rank] and B [rank, *out] per targeted layer, stacked over layers.

Module names:
  GPT-2: query/key/value -> one fused `attn.c_attn` (a Conv1D, hence `fan_in_fan_out: true`),
         out -> `attn.c_proj`, up -> `mlp.c_fc`, down -> `mlp.c_proj`.
         Separate q/k/v adapters become one c_attn adapter of rank (number of them) x rank: A is
         the adapters' A stacked and B block-diagonal, so the product is exact; its alpha is
         scaled alike (alpha_pattern) so that the scaling stays alpha/rank.
  Llama: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
  Both: lm_head (untied heads only).
Rotary models need no permutation: llmjax's q/k layout is HF's rotate_half layout (see
convert/weights.py), for adapters exactly as for full weights.

Import accepts what PEFT writes for these models: per-module ranks and alphas, rsLoRA scaling,
adapters on some layers only. Every module becomes an llmjax adapter of the largest rank (zero
padding) with its own scaling folded into B, so the imported adapter computes the same function.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

from llmjax.convert.hf_config import GPT2, ConversionError
from llmjax.model import TransformerConfig
from llmjax.model import lora as loralib

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

# llmjax target -> HF module path inside layer i (None: a top-level module).
_LLAMA = {"query": "model.layers.{i}.self_attn.q_proj", "key": "model.layers.{i}.self_attn.k_proj",
          "value": "model.layers.{i}.self_attn.v_proj", "out": "model.layers.{i}.self_attn.o_proj",
          "gate": "model.layers.{i}.mlp.gate_proj", "up": "model.layers.{i}.mlp.up_proj",
          "down": "model.layers.{i}.mlp.down_proj"}
_GPT2 = {"out": "transformer.h.{i}.attn.c_proj", "up": "transformer.h.{i}.mlp.c_fc",
         "down": "transformer.h.{i}.mlp.c_proj"}
_GPT2_QKV = "transformer.h.{i}.attn.c_attn"
_QKV = ("query", "key", "value")
# The names written to target_modules (PEFT matches a module whose name ends in ".<entry>").
_TARGET_NAMES = {
    GPT2: {"out": "attn.c_proj", "up": "c_fc", "down": "mlp.c_proj", "lm_head": "lm_head"},
    "llama": {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "o_proj",
              "gate": "gate_proj", "up": "up_proj", "down": "down_proj", "lm_head": "lm_head"},
}
_SITES = {"query": ("attn", "query"), "key": ("attn", "key"), "value": ("attn", "value"),
          "out": ("attn", "out"), "gate": ("mlp", "gate"), "down": ("mlp", "proj")}


def _site(cfg: TransformerConfig, target: str) -> tuple[str, str]:
  """(parent, module) of a target in llmjax's layer params."""
  if target == "up":
    return ("mlp", "up" if cfg.mlp == "swiglu" else "fc")
  return _SITES[target]


def _layer_entry(adapter: dict, cfg: TransformerConfig, target: str):
  if target == "lm_head":
    return adapter.get("lm_head")
  parent, name = _site(cfg, target)
  return adapter.get("layers", {}).get(parent, {}).get(name)


# ----------------------------------------------------------------------------------- export
def adapter_to_peft(kind: str, adapter: dict, spec: loralib.LoraSpec, cfg: TransformerConfig,
                    base_name: str = "") -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config dict, {PEFT key: array}) for llmjax adapter params (numpy, stacked)."""
  if "embedding" in spec.targets:
    # PEFT adapts an embedding layer's lookups only, while llmjax's adapted table also feeds a
    # tied output head, so a PEFT model would compute something else; not exported (yet)
    raise ConversionError("the run has a LoRA adapter on the token embedding (lora.targets "
                          "includes 'embedding'), which llmjax does not export in the PEFT "
                          "format; export merged weights with --merge instead")
  r = spec.rank
  tensors: dict[str, np.ndarray] = {}
  rank_pattern, alpha_pattern, target_modules = {}, {}, []

  def put(module: str, a: np.ndarray, b: np.ndarray) -> None:
    tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a, np.float32)
    tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b, np.float32)

  def flat(entry, i):
    a, b = np.asarray(entry["lora_a"]), np.asarray(entry["lora_b"])
    if i is not None:
      a, b = a[i], b[i]
    return a.reshape(-1, r).T, b.reshape(r, -1).T     # [r, in], [out, r]

  names = _TARGET_NAMES[GPT2 if kind == GPT2 else "llama"]
  qkv = [t for t in _QKV if t in spec.targets] if kind == GPT2 else []
  for target in spec.targets:
    if target in qkv:
      continue
    target_modules.append(names[target])
    if target == "lm_head":
      put("lm_head", *flat(adapter["lm_head"], None))
      continue
    path = (_GPT2 if kind == GPT2 else _LLAMA)[target]
    for i in range(cfg.num_layers):
      put(path.format(i=i), *flat(_layer_entry(adapter, cfg, target), i))
  if qkv:
    d = cfg.embed_dim
    target_modules.insert(0, "c_attn")
    n = len(qkv)
    if n > 1:  # one fused adapter of rank n*r; same scaling alpha/r
      rank_pattern["c_attn"] = n * r
      alpha_pattern["c_attn"] = n * spec.alpha
    for i in range(cfg.num_layers):
      a_f = np.zeros((n * r, d), np.float32)
      b_f = np.zeros((3 * d, n * r), np.float32)
      for j, target in enumerate(qkv):
        a, b = flat(_layer_entry(adapter, cfg, target), i)
        block = _QKV.index(target)
        a_f[j * r:(j + 1) * r] = a
        b_f[block * d:(block + 1) * d, j * r:(j + 1) * r] = b
      put(_GPT2_QKV.format(i=i), a_f, b_f)
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
      "r": r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
      "target_modules": target_modules, "fan_in_fan_out": kind == GPT2, "bias": "none",
      "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_rslora": False,
      "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
      "inference_mode": True, "layers_to_transform": None,
  }
  return config, tensors


def save_adapter(kind: str, adapter: dict, spec: loralib.LoraSpec, cfg: TransformerConfig,
                 out_dir: str | os.PathLike, base_name: str = "") -> list[str]:
  """Writes adapter_config.json + adapter_model.safetensors (atomically, file by file)."""
  from safetensors.numpy import save_file
  config, tensors = adapter_to_peft(kind, adapter, spec, cfg, base_name)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tmp = out / (WEIGHTS_FILE + ".tmp")
  save_file(tensors, str(tmp), metadata={"format": "pt"})
  tmp.replace(out / WEIGHTS_FILE)
  tmp = out / (CONFIG_FILE + ".tmp")
  tmp.write_text(json.dumps(config, indent=2))
  tmp.replace(out / CONFIG_FILE)
  return [CONFIG_FILE, WEIGHTS_FILE]


# ----------------------------------------------------------------------------------- import
def _pattern_value(patterns: dict, module: str, default):
  """PEFT's rule: the first pattern key k with module matching '(.*\\.)?(k)$'."""
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def _hf_modules(kind: str, cfg: TransformerConfig):
  """(HF module name, llmjax targets it feeds, layer index or None, row slices of B per target)."""
  if kind == GPT2:
    d = cfg.embed_dim
    for i in range(cfg.num_layers):
      yield _GPT2_QKV.format(i=i), _QKV, i, [slice(j * d, (j + 1) * d) for j in range(3)]
      for target, path in _GPT2.items():
        yield path.format(i=i), (target,), i, [slice(None)]
  else:
    for i in range(cfg.num_layers):
      for target, path in _LLAMA.items():
        if target == "gate" and cfg.mlp != "swiglu":
          continue
        yield path.format(i=i), (target,), i, [slice(None)]
  if not cfg.tie_embeddings:
    yield "lm_head", ("lm_head",), None, [slice(None)]


def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
  directory = Path(directory)
  path = directory / CONFIG_FILE
  if not path.exists() or not (directory / WEIGHTS_FILE).exists():
    raise ConversionError(f"{directory} is not a PEFT adapter directory (needs {CONFIG_FILE} and "
                          f"{WEIGHTS_FILE}); pass the directory save_pretrained wrote")
  from safetensors import safe_open
  config = json.loads(path.read_text())
  with safe_open(str(directory / WEIGHTS_FILE), framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  return config, tensors


def peft_to_adapter(kind: str, config: dict, tensors: dict[str, np.ndarray],
                    cfg: TransformerConfig) -> tuple[loralib.LoraSpec, dict]:
  """(LoraSpec, llmjax adapter params as numpy) computing exactly what the PEFT adapter does."""
  if config.get("peft_type", "LORA") != "LORA":
    raise ConversionError(f"peft_type {config.get('peft_type')!r} is not LoRA; llmjax imports "
                          "LoRA adapters only")
  problems = [("DoRA", "use_dora", config.get("use_dora")),
              ("modules_to_save", "modules_to_save", config.get("modules_to_save")),
              ("trained biases", "bias", config.get("bias", "none") != "none" and config["bias"])]
  for why, key, value in problems:
    if value:
      raise ConversionError(f"the adapter uses {why} ({key}={config.get(key)!r}), which llmjax's "
                            "LoRA cannot represent; merge it in PEFT and import the full weights")
  rslora = bool(config.get("use_rslora", False))
  # Per module: (targets, layer, A [r, in], B [out, r] already multiplied by its scaling).
  found, used = [], set()
  for module, targets, layer, rows in _hf_modules(kind, cfg):
    key_a, key_b = f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"
    if key_a not in tensors and key_b not in tensors:
      continue
    if key_a not in tensors or key_b not in tensors:
      raise ConversionError(f"the adapter has only one of {key_a}, {key_b}")
    used.update((key_a, key_b))
    a, b = np.asarray(tensors[key_a], np.float32), np.asarray(tensors[key_b], np.float32)
    r = _pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    fan_in, fan_out = _hf_dims(kind, cfg, targets)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != fan_in or b.shape[0] != fan_out or \
        a.shape[0] != b.shape[1]:
      raise ConversionError(
          f"adapter weights for {module} have shapes A {a.shape}, B {b.shape} but this base model's "
          f"layer is {fan_in} -> {fan_out}; the adapter was trained on a base of another shape")
    for target, row in zip(targets, rows):
      a_t, b_t = a, b[row] * scaling
      if len(targets) > 1:
        # a fused module (GPT-2's c_attn): keep the rank components that reach this block, so
        # an llmjax export (block-diagonal B) comes back with its own rank
        cols = np.flatnonzero(np.any(b_t != 0, axis=0))
        if 0 < len(cols) < b_t.shape[1]:
          a_t, b_t = a_t[cols], b_t[:, cols]
      found.append((target, layer, a_t, b_t))
  unused = sorted(k for k in tensors if k not in used)
  if unused:
    raise ConversionError(f"adapter weights {', '.join(unused[:3])} name no layer of this "
                          f"{kind} model; the adapter was trained on a base of another shape")
  if not found:
    raise ConversionError("the adapter holds no LoRA weights for this model")
  rank = max(a.shape[0] for _, _, a, _ in found)
  targets = tuple(t for t in loralib.TARGETS if any(f[0] == t for f in found))
  spec = loralib.LoraSpec(rank=rank, alpha=float(rank), targets=targets,  # scaling 1: folded in B
                          dropout=float(config.get("lora_dropout", 0.0)))
  adapter: dict = {}
  for target in targets:
    fan_in_shape, fan_out_shape = _shapes(cfg, target)
    stacked = target != "lm_head"
    lead = (cfg.num_layers,) if stacked else ()
    a_all = np.zeros(lead + (math.prod(fan_in_shape), rank), np.float32)
    b_all = np.zeros(lead + (rank, math.prod(fan_out_shape)), np.float32)
    for t, layer, a, b in found:
      if t != target:
        continue
      idx = (layer,) if stacked else ()
      a_all[idx + (slice(None), slice(0, a.shape[0]))] = a.T
      b_all[idx + (slice(0, a.shape[0]), slice(None))] = b.T
    entry = {"lora_a": a_all.reshape(lead + fan_in_shape + (rank,)),
             "lora_b": b_all.reshape(lead + (rank,) + fan_out_shape)}
    if target == "lm_head":
      adapter["lm_head"] = entry
    else:
      parent, name = _site(cfg, target)
      adapter.setdefault("layers", {}).setdefault(parent, {})[name] = entry
  return spec, adapter


def _shapes(cfg: TransformerConfig, target: str) -> tuple[tuple, tuple]:
  """llmjax kernel (in shape, out shape) of a target layer."""
  d, h, kv, hd, f = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head, cfg.hidden_dim
  return {"query": ((d,), (h, hd)), "key": ((d,), (kv, hd)), "value": ((d,), (kv, hd)),
          "out": ((h, hd), (d,)), "gate": ((d,), (f,)), "up": ((d,), (f,)), "down": ((f,), (d,)),
          "lm_head": ((d,), (cfg.vocab_size,))}[target]


def _hf_dims(kind: str, cfg: TransformerConfig, targets) -> tuple[int, int]:
  if kind == GPT2 and tuple(targets) == _QKV:
    return cfg.embed_dim, 3 * cfg.embed_dim
  return loralib.layer_dims(cfg, targets[0])
