"""Weight layout conversion between Hugging Face state dicts and llmjax's parameter tree.

llmjax stacks every per-layer parameter along a leading layer axis (params['layers'][...][layer])
and keeps attention heads as their own axes: q/k/v kernels [embed, heads, head_dim], the output
kernel [heads, head_dim, embed]. HF stores torch Linear weights as [out, in] (Llama) or GPT-2's
Conv1D as [in, out], with heads flattened into one axis. RoPE needs no permutation: llmjax rotates
pairs (i, i + d/2) exactly like HF's rotate_half (the tests prove it numerically).

All functions work on numpy arrays, so conversion needs neither torch nor a device.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from llmjax.convert.hf_config import GPT2, ConversionError
from llmjax.model import TransformerConfig

# Buffers some HF checkpoints carry that are not weights (causal masks, cached frequencies).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


class _Reader:
  """Hands out HF tensors by name and remembers which ones were used."""

  def __init__(self, tensors: Mapping[str, np.ndarray], prefix: str):
    self.tensors, self.prefix, self.used = tensors, prefix, set()

  def has(self, name: str) -> bool:
    return self.prefix + name in self.tensors

  def get(self, name: str, shape: tuple | None = None) -> np.ndarray:
    key = self.prefix + name
    if key not in self.tensors:
      raise ConversionError(f"weight {key!r} is missing from the checkpoint")
    self.used.add(key)
    value = np.asarray(self.tensors[key])
    if shape is not None and value.shape != tuple(shape):
      raise ConversionError(f"weight {key!r} has shape {value.shape}, config.json implies "
                            f"{tuple(shape)}")
    return value

  def check_all_used(self) -> None:
    unused = sorted(k for k in self.tensors if k not in self.used and not k.endswith(IGNORED_SUFFIXES))
    if unused:
      more = f" (and {len(unused) - 5} more)" if len(unused) > 5 else ""
      raise ConversionError(f"checkpoint weights not understood by the converter: "
                            f"{', '.join(unused[:5])}{more}; refusing to drop them silently")


def _stack(per_layer: list[dict]) -> dict:
  """[{name: array}] per layer -> {name: array with a leading layer axis} (nested dicts)."""
  first = per_layer[0]
  out = {}
  for key, value in first.items():
    if isinstance(value, dict):
      out[key] = _stack([layer[key] for layer in per_layer])
    else:
      out[key] = np.stack([layer[key] for layer in per_layer])
  return out


def _unstack(tree: dict, i: int) -> dict:
  return {k: _unstack(v, i) if isinstance(v, dict) else v[i] for k, v in tree.items()}


def _all_zero(arrays) -> bool:
  return all(not np.any(a) for a in arrays)


# ------------------------------------------------------------------------------------- GPT-2
def _gpt2_import(r: _Reader, cfg: TransformerConfig) -> dict:
  d, h, hd, f = cfg.embed_dim, cfg.num_heads, cfg.dim_per_head, cfg.hidden_dim
  layers = []
  for i in range(cfg.num_layers):
    p = f"h.{i}."
    qkv_w = r.get(p + "attn.c_attn.weight", (d, 3 * d))   # Conv1D: [in, out]
    qkv_b = r.get(p + "attn.c_attn.bias", (3 * d,))
    attn = {}
    for j, name in enumerate(("query", "key", "value")):
      attn[name] = {"kernel": qkv_w[:, j * d:(j + 1) * d].reshape(d, h, hd),
                    "bias": qkv_b[j * d:(j + 1) * d].reshape(h, hd)}
    attn["out"] = {"kernel": r.get(p + "attn.c_proj.weight", (d, d)).reshape(h, hd, d),
                   "bias": r.get(p + "attn.c_proj.bias", (d,))}
    layers.append({
        "attn": attn,
        "attn_norm": {"scale": r.get(p + "ln_1.weight", (d,)), "bias": r.get(p + "ln_1.bias", (d,))},
        "mlp_norm": {"scale": r.get(p + "ln_2.weight", (d,)), "bias": r.get(p + "ln_2.bias", (d,))},
        "mlp": {"fc": {"kernel": r.get(p + "mlp.c_fc.weight", (d, f)),
                       "bias": r.get(p + "mlp.c_fc.bias", (f,))},
                "proj": {"kernel": r.get(p + "mlp.c_proj.weight", (f, d)),
                         "bias": r.get(p + "mlp.c_proj.bias", (d,))}},
    })
  params = {
      "token_embedding": r.get("wte.weight", (cfg.vocab_size, d)),
      "position_embedding": r.get("wpe.weight", (cfg.max_seq_len, d)),
      "layers": _stack(layers),
      "final_norm": {"scale": r.get("ln_f.weight", (d,)), "bias": r.get("ln_f.bias", (d,))},
  }
  return params


def _gpt2_export(params: dict, cfg: TransformerConfig) -> dict:
  d, f = cfg.embed_dim, cfg.hidden_dim
  zeros = lambda n: np.zeros((n,), params["token_embedding"].dtype)  # noqa: E731
  bias = lambda tree, n: tree["bias"] if "bias" in tree else zeros(n)  # noqa: E731
  out = {"wte.weight": params["token_embedding"], "wpe.weight": params["position_embedding"],
         "ln_f.weight": params["final_norm"]["scale"], "ln_f.bias": bias(params["final_norm"], d)}
  for i in range(cfg.num_layers):
    L = _unstack(params["layers"], i)
    a, m, p = L["attn"], L["mlp"], f"h.{i}."
    out[p + "attn.c_attn.weight"] = np.concatenate(
        [a[n]["kernel"].reshape(d, d) for n in ("query", "key", "value")], axis=1)
    out[p + "attn.c_attn.bias"] = np.concatenate(
        [bias(a[n], d).reshape(d) for n in ("query", "key", "value")])
    out[p + "attn.c_proj.weight"] = a["out"]["kernel"].reshape(d, d)
    out[p + "attn.c_proj.bias"] = bias(a["out"], d)
    out[p + "ln_1.weight"], out[p + "ln_1.bias"] = L["attn_norm"]["scale"], bias(L["attn_norm"], d)
    out[p + "ln_2.weight"], out[p + "ln_2.bias"] = L["mlp_norm"]["scale"], bias(L["mlp_norm"], d)
    out[p + "mlp.c_fc.weight"], out[p + "mlp.c_fc.bias"] = m["fc"]["kernel"], bias(m["fc"], f)
    out[p + "mlp.c_proj.weight"], out[p + "mlp.c_proj.bias"] = m["proj"]["kernel"], bias(m["proj"], d)
  out = {"transformer." + k: v for k, v in out.items()}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = params["lm_head"]["kernel"].T
  return out


def _drop_biases(tree: dict) -> dict:
  return {k: _drop_biases(v) if isinstance(v, dict) else v for k, v in tree.items() if k != "bias"}


def _collect_biases(tree: dict) -> list:
  out = []
  for k, v in tree.items():
    if isinstance(v, dict):
      out += _collect_biases(v)
    elif k == "bias":
      out.append(v)
  return out


# ------------------------------------------------------------------------------------- Llama
def _llama_import(r: _Reader, cfg: TransformerConfig) -> dict:
  d, h, kv, hd, f = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head, cfg.hidden_dim

  def bias(name, shape):
    # An HF model with only attention (or only MLP) biases: the others are exact zeros in llmjax.
    return r.get(name, (int(np.prod(shape)),)).reshape(shape) if r.has(name) else np.zeros(shape, np.float32)

  layers = []
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    attn = {}
    for name, hf, heads in (("query", "q_proj", h), ("key", "k_proj", kv), ("value", "v_proj", kv)):
      w = r.get(p + f"self_attn.{hf}.weight", (heads * hd, d))       # Linear: [out, in]
      attn[name] = {"kernel": w.T.reshape(d, heads, hd)}
      if cfg.use_bias:
        attn[name]["bias"] = bias(p + f"self_attn.{hf}.bias", (heads, hd))
    attn["out"] = {"kernel": r.get(p + "self_attn.o_proj.weight", (d, h * hd)).T.reshape(h, hd, d)}
    mlp = {name: {"kernel": r.get(p + f"mlp.{hf}.weight", shape).T}
           for name, hf, shape in (("gate", "gate_proj", (f, d)), ("up", "up_proj", (f, d)),
                                   ("proj", "down_proj", (d, f)))}
    if cfg.use_bias:
      attn["out"]["bias"] = bias(p + "self_attn.o_proj.bias", (d,))
      for name, hf, n in (("gate", "gate_proj", f), ("up", "up_proj", f), ("proj", "down_proj", d)):
        mlp[name]["bias"] = bias(p + f"mlp.{hf}.bias", (n,))
    layers.append({
        "attn": attn, "mlp": mlp,
        "attn_norm": {"scale": r.get(p + "input_layernorm.weight", (d,))},
        "mlp_norm": {"scale": r.get(p + "post_attention_layernorm.weight", (d,))},
    })
  params = {"token_embedding": r.get("model.embed_tokens.weight", (cfg.vocab_size, d)),
            "layers": _stack(layers),
            "final_norm": {"scale": r.get("model.norm.weight", (d,))}}
  return params


def _llama_export(params: dict, cfg: TransformerConfig) -> dict:
  d, h, kv, hd = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
  out = {"model.embed_tokens.weight": params["token_embedding"],
         "model.norm.weight": params["final_norm"]["scale"]}
  for i in range(cfg.num_layers):
    L = _unstack(params["layers"], i)
    a, m, p = L["attn"], L["mlp"], f"model.layers.{i}."
    for name, hf, heads in (("query", "q_proj", h), ("key", "k_proj", kv), ("value", "v_proj", kv)):
      out[p + f"self_attn.{hf}.weight"] = a[name]["kernel"].reshape(d, heads * hd).T
      if cfg.use_bias:
        out[p + f"self_attn.{hf}.bias"] = a[name]["bias"].reshape(heads * hd)
    out[p + "self_attn.o_proj.weight"] = a["out"]["kernel"].reshape(h * hd, d).T
    for name, hf in (("gate", "gate_proj"), ("up", "up_proj"), ("proj", "down_proj")):
      out[p + f"mlp.{hf}.weight"] = m[name]["kernel"].T
      if cfg.use_bias:
        out[p + f"mlp.{hf}.bias"] = m[name]["bias"]
    if cfg.use_bias:
      out[p + "self_attn.o_proj.bias"] = a["out"]["bias"]
    out[p + "input_layernorm.weight"] = L["attn_norm"]["scale"]
    out[p + "post_attention_layernorm.weight"] = L["mlp_norm"]["scale"]
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = params["lm_head"]["kernel"].T
  return out


# ------------------------------------------------------------------------------------- API
def hf_to_params(kind: str, tensors: Mapping[str, np.ndarray], cfg: TransformerConfig,
                 dtype=np.float32) -> tuple[dict, TransformerConfig]:
  """llmjax params (numpy, `dtype`) from an HF state dict; also returns the config, which may
  switch use_bias off for a GPT-2 whose biases are all exactly zero (an llmjax bias-free export)."""
  tensors = dict(tensors)
  prefix = ""
  if kind == GPT2 and "transformer.wte.weight" in tensors:
    prefix = "transformer."  # saved from GPT2LMHeadModel; the hub's gpt2 has bare GPT2Model names
  r = _Reader(tensors, prefix)
  params = _gpt2_import(r, cfg) if kind == GPT2 else _llama_import(r, cfg)
  if not cfg.tie_embeddings:
    r.prefix = ""
    params["lm_head"] = {"kernel": r.get("lm_head.weight", (cfg.vocab_size, cfg.embed_dim)).T}
  elif "lm_head.weight" in tensors:
    # Tied models may still store the (identical) head; accept it only if it really is identical.
    r.prefix = ""
    if not np.array_equal(r.get("lm_head.weight"), params["token_embedding"]):
      raise ConversionError("tie_word_embeddings=true but lm_head.weight differs from the embedding")
  r.check_all_used()
  if kind == GPT2 and _all_zero(_collect_biases(params)):
    params = _drop_biases(params)
    cfg = dataclasses.replace(cfg, use_bias=False)
  params = _cast(params, dtype)
  return params, cfg


def params_to_hf(kind: str, params: dict, cfg: TransformerConfig) -> dict[str, np.ndarray]:
  """An HF state dict (numpy, contiguous) for llmjax params."""
  params = _cast(params, None)
  out = _gpt2_export(params, cfg) if kind == GPT2 else _llama_export(params, cfg)
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _cast(tree, dtype):
  if isinstance(tree, dict):
    return {k: _cast(v, dtype) for k, v in tree.items()}
  array = np.asarray(tree)
  return array if dtype is None else array.astype(dtype, copy=False)
