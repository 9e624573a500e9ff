"""Hugging Face T5ForConditionalGeneration <-> llmjax's encoder-decoder (family 'encoder_decoder').

T5 in llmjax terms: pre-norm RMS norms without mean subtraction or bias, no biases anywhere, one
shared token table, relative-position bias (a table per stack, held by HF in block 0 and shared by
all blocks; bidirectional buckets in the encoder, causal in the decoder), no 1/sqrt(d) on the
attention scores (scale_attention=False), and an MLP that is ReLU (T5 v1.0, feed_forward_proj
'relu') or gated GELU with the tanh approximation (v1.1 / flan, 'gated-gelu' -> mlp='geglu').
When T5 scales the decoder output by d_model**-0.5 before the head (v1.0's tied head;
config `scale_decoder_outputs`, or in transformers v4 files `tie_word_embeddings` not false),
llmjax does the same (scale_decoder_outputs=True). The head is tied unless the checkpoint
carries its own `lm_head.weight` that differs from `shared.weight`.

Anything else (mT5/UMT5 model types, other activations, T5EncoderModel checkpoints) is refused by
name. The tokenizer is T5's sentencepiece model as transformers saves it (tokenizer.json with
the sentinel <extra_id_N> tokens and a post-processor that appends </s>), or a bare spiece.model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from llmjax.convert.hf_config import ConversionError
from llmjax.convert.weights import _Reader, _stack
from llmjax.model import TransformerConfig

MODEL_TYPE = "t5"
ARCHITECTURE = "T5ForConditionalGeneration"
ACTIVATIONS = {"relu": "relu", "gated-gelu": "geglu"}
SPIECE = "spiece.model"


def _refuse(cond: bool, message: str) -> None:
  if cond:
    raise ConversionError(message)


def to_llmjax(hf: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
              param_dtype: str = "float32") -> TransformerConfig:
  """The llmjax config of a T5 config.json (and its weights, which decide tied vs untied)."""
  archs = hf.get("architectures") or [ARCHITECTURE]
  _refuse(ARCHITECTURE not in archs,
          f"T5 architecture {', '.join(archs)} is not supported; llmjax converts "
          f"{ARCHITECTURE} (encoder and decoder with the LM head)")
  proj = hf.get("feed_forward_proj", "relu")
  _refuse(proj not in ACTIVATIONS,
          f"T5 feed_forward_proj={proj!r} is not supported (llmjax has 'relu' = T5 v1.0 and "
          "'gated-gelu' = T5 v1.1)")
  act = hf.get("dense_act_fn")
  _refuse(act is not None and act != {"relu": "relu", "gated-gelu": "gelu_new"}[proj],
          f"T5 dense_act_fn={act!r} with feed_forward_proj={proj!r} is not supported")
  _refuse(bool(hf.get("is_decoder", False)), "a T5 config with is_decoder=true (a decoder-only "
          "T5 stack) is not supported; convert a T5ForConditionalGeneration")
  d, heads, d_kv = int(hf.get("d_model", 512)), int(hf.get("num_heads", 8)), int(hf.get("d_kv", 64))
  layers = int(hf.get("num_layers", 6))
  dec_layers = int(hf.get("num_decoder_layers") or layers)
  if "scale_decoder_outputs" in hf:  # transformers v5 spells it out
    scale = bool(hf["scale_decoder_outputs"])
  else:                              # v4: only a tied head (the default) is scaled
    scale = hf.get("tie_word_embeddings", True) is not False
  head = tensors.get("lm_head.weight")
  tied = head is None or np.array_equal(np.asarray(head), np.asarray(tensors["shared.weight"]))
  return TransformerConfig(
      family="encoder_decoder", vocab_size=int(hf.get("vocab_size", 32128)),
      num_layers=dec_layers, encoder_layers=0 if dec_layers == layers else layers,
      num_heads=heads, embed_dim=d, head_dim=0 if heads * d_kv == d else d_kv,
      mlp_dim=int(hf.get("d_ff", 2048)), max_seq_len=int(hf.get("n_positions", 512)),
      position="relative", relative_buckets=int(hf.get("relative_attention_num_buckets", 32)),
      relative_max_distance=int(hf.get("relative_attention_max_distance", 128)),
      norm="rmsnorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
      mlp=ACTIVATIONS[proj], gelu_approximate=True, use_bias=False, tie_embeddings=tied,
      share_embeddings=True, scale_attention=False, scale_decoder_outputs=scale, dropout=0.0,
      causal=True, dtype="float32", param_dtype=param_dtype,
      decoder_start_id=int(hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)) or 0))


def _check(cfg: TransformerConfig) -> None:
  """Refuses llmjax configs that T5's architecture cannot represent."""
  wanted = dict(family="encoder_decoder", position="relative", norm="rmsnorm", use_bias=False,
                share_embeddings=True, scale_attention=False, num_kv_heads=0)
  wrong = [f"{k}={getattr(cfg, k)!r} (T5 needs {v!r})" for k, v in wanted.items()
           if getattr(cfg, k) != v]
  if cfg.mlp not in ("relu", "geglu") or (cfg.mlp == "geglu" and not cfg.gelu_approximate):
    wrong.append(f"mlp={cfg.mlp!r} (T5 has relu or tanh-approximate geglu)")
  _refuse(bool(wrong), "this model has no Hugging Face T5 equivalent: " + "; ".join(wrong))


def _linear_in(w: np.ndarray, shape) -> np.ndarray:
  """torch Linear [out, in] -> llmjax kernel [in, *out_shape]."""
  return w.T.reshape(w.shape[1], *shape)


def _attention(r: _Reader, name: str, cfg: TransformerConfig) -> dict:
  h, hd, d = cfg.num_heads, cfg.dim_per_head, cfg.embed_dim
  out = {p: {"kernel": _linear_in(r.get(f"{name}.{hf}.weight", (h * hd, d)), (h, hd))}
         for p, hf in (("query", "q"), ("key", "k"), ("value", "v"))}
  out["out"] = {"kernel": r.get(f"{name}.o.weight", (d, h * hd)).T.reshape(h, hd, d)}
  return out


def _mlp(r: _Reader, name: str, cfg: TransformerConfig) -> dict:
  d, f = cfg.embed_dim, cfg.hidden_dim
  out = {"proj": {"kernel": r.get(f"{name}.wo.weight", (d, f)).T}}
  if cfg.mlp == "geglu":
    out["gate"] = {"kernel": r.get(f"{name}.wi_0.weight", (f, d)).T}
    out["up"] = {"kernel": r.get(f"{name}.wi_1.weight", (f, d)).T}
  else:
    out["fc"] = {"kernel": r.get(f"{name}.wi.weight", (f, d)).T}
  return out


def _norm(r: _Reader, name: str, cfg: TransformerConfig) -> dict:
  return {"scale": r.get(f"{name}.weight", (cfg.embed_dim,))}


def hf_to_params(tensors: Mapping[str, np.ndarray], cfg: TransformerConfig, dtype) -> dict:
  """HF T5 state dict -> llmjax params (layers stacked)."""
  # transformers keeps tied copies under these names in some files; they equal shared.weight.
  tensors = {k: v for k, v in tensors.items()
             if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
             and not (cfg.tie_embeddings and k == "lm_head.weight")}
  r = _Reader(tensors, "")
  v, d = cfg.vocab_size, cfg.embed_dim
  params: dict = {"token_embedding": r.get("shared.weight", (v, d))}
  enc_layers = []
  for i in range(cfg.num_encoder_layers):
    p = f"encoder.block.{i}.layer"
    enc_layers.append({"attn_norm": _norm(r, f"{p}.0.layer_norm", cfg),
                       "attn": _attention(r, f"{p}.0.SelfAttention", cfg),
                       "mlp_norm": _norm(r, f"{p}.1.layer_norm", cfg),
                       "mlp": _mlp(r, f"{p}.1.DenseReluDense", cfg)})
  dec_layers = []
  for i in range(cfg.num_layers):
    p = f"decoder.block.{i}.layer"
    dec_layers.append({"attn_norm": _norm(r, f"{p}.0.layer_norm", cfg),
                       "attn": _attention(r, f"{p}.0.SelfAttention", cfg),
                       "cross_norm": _norm(r, f"{p}.1.layer_norm", cfg),
                       "cross_attn": _attention(r, f"{p}.1.EncDecAttention", cfg),
                       "mlp_norm": _norm(r, f"{p}.2.layer_norm", cfg),
                       "mlp": _mlp(r, f"{p}.2.DenseReluDense", cfg)})
  rel_shape = (cfg.relative_buckets, cfg.num_heads)
  for stack, layers in (("encoder", enc_layers), ("decoder", dec_layers)):
    params[stack] = {
        "layers": _stack(layers),
        "relative_bias": r.get(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias"
                               ".weight", rel_shape),
        "final_norm": _norm(r, f"{stack}.final_layer_norm", cfg)}
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": r.get("lm_head.weight", (v, d)).T}
  r.check_all_used()
  return _cast(params, dtype)


def _cast(tree, dtype):
  if isinstance(tree, dict):
    return {k: _cast(v, dtype) for k, v in tree.items()}
  return np.ascontiguousarray(np.asarray(tree, dtype=np.float32).astype(dtype))


def params_to_hf(params, cfg: TransformerConfig) -> dict[str, np.ndarray]:
  """llmjax params (stacked or per-layer decoder) -> HF T5 state dict (float32/bf16 numpy)."""
  _check(cfg)
  h, hd, d = cfg.num_heads, cfg.dim_per_head, cfg.embed_dim
  out = {"shared.weight": params["token_embedding"]}

  def layer(stack, i):
    sub = params[stack]
    if "layers" in sub:
      import jax
      return jax.tree.map(lambda w: w[i], sub["layers"])
    return sub[f"layer_{i}"]

  def attention(prefix, p):
    for name, hf in (("query", "q"), ("key", "k"), ("value", "v")):
      out[f"{prefix}.{hf}.weight"] = p[name]["kernel"].reshape(d, h * hd).T
    out[f"{prefix}.o.weight"] = p["out"]["kernel"].reshape(h * hd, d).T

  def mlp(prefix, p):
    out[f"{prefix}.wo.weight"] = p["proj"]["kernel"].T
    if cfg.mlp == "geglu":
      out[f"{prefix}.wi_0.weight"] = p["gate"]["kernel"].T
      out[f"{prefix}.wi_1.weight"] = p["up"]["kernel"].T
    else:
      out[f"{prefix}.wi.weight"] = p["fc"]["kernel"].T

  for i in range(cfg.num_encoder_layers):
    p, pre = layer("encoder", i), f"encoder.block.{i}.layer"
    out[f"{pre}.0.layer_norm.weight"] = p["attn_norm"]["scale"]
    attention(f"{pre}.0.SelfAttention", p["attn"])
    out[f"{pre}.1.layer_norm.weight"] = p["mlp_norm"]["scale"]
    mlp(f"{pre}.1.DenseReluDense", p["mlp"])
  for i in range(cfg.num_layers):
    p, pre = layer("decoder", i), f"decoder.block.{i}.layer"
    out[f"{pre}.0.layer_norm.weight"] = p["attn_norm"]["scale"]
    attention(f"{pre}.0.SelfAttention", p["attn"])
    out[f"{pre}.1.layer_norm.weight"] = p["cross_norm"]["scale"]
    attention(f"{pre}.1.EncDecAttention", p["cross_attn"])
    out[f"{pre}.2.layer_norm.weight"] = p["mlp_norm"]["scale"]
    mlp(f"{pre}.2.DenseReluDense", p["mlp"])
  for stack in ("encoder", "decoder"):
    out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
        params[stack]["relative_bias"])
    out[f"{stack}.final_layer_norm.weight"] = params[stack]["final_norm"]["scale"]
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = params["lm_head"]["kernel"].T
  return {k: np.ascontiguousarray(np.asarray(v)) for k, v in out.items()}


def to_hf(cfg: TransformerConfig, eos_id: int | None = None, pad_id: int | None = None) -> dict:
  """config.json for T5ForConditionalGeneration (keys transformers v4 and v5 both read)."""
  _check(cfg)
  pad = 0 if pad_id is None else pad_id
  return {
      "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "vocab_size": cfg.vocab_size,
      "d_model": cfg.embed_dim, "d_kv": cfg.dim_per_head, "d_ff": cfg.hidden_dim,
      "num_layers": cfg.num_encoder_layers, "num_decoder_layers": cfg.num_layers,
      "num_heads": cfg.num_heads, "relative_attention_num_buckets": cfg.relative_buckets,
      "relative_attention_max_distance": cfg.relative_max_distance,
      "layer_norm_epsilon": cfg.norm_eps, "dropout_rate": cfg.dropout,
      "feed_forward_proj": "gated-gelu" if cfg.mlp == "geglu" else "relu",
      "tie_word_embeddings": cfg.tie_embeddings,
      "scale_decoder_outputs": cfg.scale_decoder_outputs,
      "n_positions": cfg.max_seq_len, "is_encoder_decoder": True, "use_cache": True,
      "pad_token_id": pad, "decoder_start_token_id": cfg.decoder_start_id,
      "eos_token_id": 1 if eos_id is None else eos_id, "torch_dtype": cfg.param_dtype,
  }


def load_tokenizer(directory: Path, hf: Mapping[str, Any]):
  """T5's tokenizer: tokenizer.json (with sentinels, appends </s>) or a bare spiece.model."""
  from llmjax.data.hf_tokenizer import HFTokenizer
  tok = HFTokenizer.from_hf_dir(directory, hf)
  if tok is None and (directory / SPIECE).exists():
    import json
    config_path = directory / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text()) if config_path.exists() else {}
    tok_config.setdefault("add_eos_token", True)   # T5 ends every input with </s>
    tok = HFTokenizer(directory / SPIECE, tok_config, eos_id=hf.get("eos_token_id", 1))
  return tok
