"""Hugging Face config.json <-> llmjax TransformerConfig, for the GPT-2 and Llama/Mistral families.

Every HF feature either maps exactly onto an llmjax field or is refused by name: a converter that
silently approximates (an unknown RoPE scaling, a sliding window, another activation) produces a
model that looks fine and is wrong.
"""
from __future__ import annotations

from typing import Any, Mapping

from llmjax.model import TransformerConfig

GPT2 = "gpt2"
LLAMA = "llama"            # Llama 1/2/3 and Mistral share one weight layout
SUPPORTED = {"gpt2": GPT2, "llama": LLAMA, "mistral": LLAMA}
ARCHITECTURES = {GPT2: "GPT2LMHeadModel", LLAMA: "LlamaForCausalLM"}
# transformers' class defaults: save_pretrained in transformers v4 writes only the keys that
# differ from them, so a missing key means exactly this value.
DEFAULTS = {
    "gpt2": dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                 layer_norm_epsilon=1e-5, activation_function="gelu_new",
                 tie_word_embeddings=True),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048,
                  rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  hidden_act="silu"),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, rope_theta=10000.0,
                    sliding_window=4096, tie_word_embeddings=False, hidden_act="silu"),
}


class ConversionError(ValueError):
  """A model or directory that cannot be converted exactly: reported as one line."""


def family(hf: Mapping[str, Any]) -> str:
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED:
    arch = ", ".join(hf.get("architectures") or []) or "unknown architecture"
    code = " (it ships custom code; llmjax never runs remote code)" if hf.get("auto_map") else ""
    raise ConversionError(
        f"unsupported Hugging Face model_type {model_type!r} ({arch}){code}; llmjax converts "
        f"{', '.join(sorted(SUPPORTED))} models")
  return SUPPORTED[model_type]


def _refuse(cond: bool, message: str) -> None:
  if cond:
    raise ConversionError(message)


def _rope(hf: Mapping[str, Any]) -> dict:
  """RoPE theta and scaling from either transformers v4 keys (rope_theta, rope_scaling) or v5's
  rope_parameters."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  merged = {**scaling, **params}
  kind = merged.get("rope_type", merged.get("type", "default")) or "default"
  out = {"rope_theta": float(theta)}
  if kind == "default":
    return out
  if kind == "linear":
    return {**out, "rope_scaling": "linear", "rope_scaling_factor": float(merged["factor"])}
  if kind == "llama3":
    return {**out, "rope_scaling": "llama3", "rope_scaling_factor": float(merged["factor"]),
            "rope_low_freq_factor": float(merged["low_freq_factor"]),
            "rope_high_freq_factor": float(merged["high_freq_factor"]),
            "rope_original_max_len": int(merged["original_max_position_embeddings"])}
  raise ConversionError(f"RoPE scaling type {kind!r} is not implemented in llmjax (supported: "
                        "default, linear, llama3); converting it would change the model")


def _mlp_dim(hidden: int | None, d: int) -> int:
  """llmjax spells the default 4 * embed as 0, so configs survive a round trip unchanged."""
  return 0 if not hidden or int(hidden) == 4 * d else int(hidden)


def to_llmjax(hf: Mapping[str, Any], param_dtype: str = "float32") -> TransformerConfig:
  """The llmjax model config for an HF config.json (already parsed)."""
  kind = family(hf)
  hf = {**DEFAULTS[hf["model_type"]], **hf}
  common = dict(vocab_size=int(hf["vocab_size"]), causal=True, dropout=0.0,
                param_dtype=param_dtype, dtype="float32")
  if kind == GPT2:
    act = hf.get("activation_function", "gelu_new")
    _refuse(act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"),
            f"GPT-2 activation_function={act!r} is not supported (llmjax has tanh-GELU = gelu_new "
            "and exact GELU = gelu)")
    _refuse(not hf.get("scale_attn_weights", True),
            "GPT-2 scale_attn_weights=false (unscaled attention) is not supported")
    _refuse(hf.get("scale_attn_by_inverse_layer_idx", False),
            "GPT-2 scale_attn_by_inverse_layer_idx=true is not supported")
    _refuse(hf.get("add_cross_attention", False), "GPT-2 with cross-attention is not supported")
    d = int(hf["n_embd"])
    return TransformerConfig(
        **common, num_layers=int(hf["n_layer"]), num_heads=int(hf["n_head"]), embed_dim=d,
        mlp_dim=_mlp_dim(hf.get("n_inner"), d), max_seq_len=int(hf["n_positions"]),
        position="learned", norm="layernorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        mlp="gelu", gelu_approximate=act != "gelu", use_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)))

  act = hf.get("hidden_act", "silu")
  _refuse(act != "silu", f"{hf['model_type']} hidden_act={act!r} is not supported (SwiGLU uses silu)")
  max_len = int(hf.get("max_position_embeddings", 2048))
  window = hf.get("sliding_window")
  _refuse(window is not None and int(window) < max_len and hf.get("use_sliding_window", True),
          f"sliding_window={window} < max_position_embeddings={max_len}: sliding-window attention "
          "is not implemented in llmjax")
  heads = int(hf["num_attention_heads"])
  kv_heads = int(hf.get("num_key_value_heads") or heads)
  d = int(hf["hidden_size"])
  head_dim = int(hf.get("head_dim") or d // heads)
  # llmjax has one bias switch; an HF model with only attention (or only MLP) biases is represented
  # exactly by zero biases elsewhere (and exported back with both switches on).
  use_bias = bool(hf.get("attention_bias", False) or hf.get("mlp_bias", False))
  return TransformerConfig(
      **common, num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
      # 0 is llmjax's spelling of "as many as heads" (round trips compare configs exactly)
      num_kv_heads=0 if kv_heads == heads else kv_heads, embed_dim=d,
      head_dim=0 if head_dim * heads == d else head_dim, mlp_dim=_mlp_dim(hf["intermediate_size"], d),
      max_seq_len=max_len, position="rotary", norm="rmsnorm",
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp="swiglu", use_bias=use_bias,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **_rope(hf))


def export_family(cfg: TransformerConfig) -> str:
  """Which HF architecture represents `cfg` exactly; refuses combinations HF has no class for."""
  _refuse(not cfg.causal, "a bidirectional (causal=False) model has no GPT-2/Llama equivalent")
  _refuse(cfg.num_labels > 0,
          "a classification model (model.num_labels > 0) has no GPT2LMHeadModel/LlamaForCausalLM "
          "twin (its classifier head would be lost); export the base run it was fine-tuned from")
  if (cfg.position, cfg.norm, cfg.mlp) == ("learned", "layernorm", "gelu"):
    _refuse(cfg.kv_heads != cfg.num_heads,
            "GPT-2 has no grouped-query attention; this model has num_kv_heads != num_heads")
    _refuse(cfg.dim_per_head * cfg.num_heads != cfg.embed_dim,
            "GPT-2 needs head_dim * num_heads == embed_dim")
    return GPT2
  if (cfg.position, cfg.norm, cfg.mlp) == ("rotary", "rmsnorm", "swiglu"):
    return LLAMA
  raise ConversionError(
      f"no Hugging Face architecture matches position={cfg.position}, norm={cfg.norm}, "
      f"mlp={cfg.mlp}; export supports GPT-2 (learned, layernorm, gelu) and Llama "
      "(rotary, rmsnorm, swiglu)")


def to_hf(cfg: TransformerConfig, eos_id: int | None = None, bos_id: int | None = None) -> dict:
  """An HF config.json dict for `cfg` (keys that both transformers v4 and v5 read)."""
  kind = export_family(cfg)
  dtype = cfg.param_dtype
  if kind == GPT2:
    return {
        "architectures": [ARCHITECTURES[kind]], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_embd": cfg.embed_dim, "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads, "n_inner": cfg.hidden_dim, "n_positions": cfg.max_seq_len,
        "n_ctx": cfg.max_seq_len,
        "activation_function": "gelu_new" if cfg.gelu_approximate else "gelu",
        "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": dtype, "use_cache": True,
    }
  rope_scaling = None
  if cfg.rope_scaling == "linear":
    rope_scaling = {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
  elif cfg.rope_scaling == "llama3":
    rope_scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                    "low_freq_factor": cfg.rope_low_freq_factor,
                    "high_freq_factor": cfg.rope_high_freq_factor,
                    "original_max_position_embeddings": cfg.rope_original_max_len}
  return {
      "architectures": [ARCHITECTURES[kind]], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim,
      "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads,
      "head_dim": cfg.dim_per_head, "max_position_embeddings": cfg.max_seq_len,
      "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
      "rope_scaling": rope_scaling, "attention_bias": cfg.use_bias, "mlp_bias": cfg.use_bias,
      "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
      "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": dtype, "use_cache": True,
  }
