"""Hugging Face BERT (BertForMaskedLM, BertForPreTraining) <-> llmjax encoders.

Layouts. HF stores torch Linear weights as [out, in] with heads flattened; llmjax keeps the
decoder's layout (q/k/v kernels [embed, heads, head_dim], out [heads, head_dim, embed]) stacked
along a leading layer axis. BERT is post-norm: attention.output.LayerNorm is llmjax's attn_norm,
output.LayerNorm its mlp_norm; the embedding LayerNorm is embed_norm; cls.predictions is the
masked-LM head (its decoder is tied to the word embeddings; cls.predictions.bias is the output
bias); bert.pooler and cls.seq_relationship (BertForPreTraining) are the pooler and NSP head.

Anything BERT can do that llmjax does not (relative position embeddings, a decoder BERT with
cross-attention, other activations) is refused by name.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from llmjax.convert.families import Family
from llmjax.convert.hf_config import ConversionError
from llmjax.model import TransformerConfig

# transformers' BertConfig defaults: a key missing from config.json means exactly this value.
DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512,
                type_vocab_size=2, layer_norm_eps=1e-12, position_embedding_type="absolute",
                is_decoder=False, add_cross_attention=False, tie_word_embeddings=True,
                pad_token_id=0)
ACTIVATIONS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}  # -> gelu_approximate
# Buffers, not weights; and old TF-era checkpoints spell LayerNorm weight/bias as gamma/beta.
IGNORED = (".position_ids", ".token_type_ids")
OLD_NAMES = {".weight": ".gamma", ".bias": ".beta"}


def _refuse(cond: bool, message: str) -> None:
  if cond:
    raise ConversionError(message)


def to_llmjax(hf: Mapping[str, Any], param_dtype: str = "float32") -> TransformerConfig:
  hf = {**DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
  pos = hf["position_embedding_type"]
  _refuse(pos != "absolute", f"BERT position_embedding_type={pos!r} is not supported (llmjax "
          "implements BERT's absolute learned positions only); this variant cannot convert exactly")
  _refuse(bool(hf["is_decoder"]) or bool(hf["add_cross_attention"]),
          "BERT with is_decoder=true or add_cross_attention=true is not supported (llmjax's BERT is "
          "a bidirectional encoder)")
  act = hf["hidden_act"]
  _refuse(act not in ACTIVATIONS, f"BERT hidden_act={act!r} is not supported (llmjax has gelu "
          "and the tanh approximations gelu_new / gelu_pytorch_tanh)")
  d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  _refuse(d % heads != 0, f"BERT hidden_size={d} is not divisible by num_attention_heads={heads}")
  f = int(hf["intermediate_size"])
  return TransformerConfig(
      family="encoder", causal=False, norm_position="post", vocab_size=int(hf["vocab_size"]),
      num_layers=int(hf["num_hidden_layers"]), num_heads=heads, embed_dim=d,
      mlp_dim=0 if f == 4 * d else f, max_seq_len=int(hf["max_position_embeddings"]),
      type_vocab_size=int(hf["type_vocab_size"]), position="learned", norm="layernorm",
      norm_eps=float(hf["layer_norm_eps"]), mlp="gelu", gelu_approximate=ACTIVATIONS[act],
      use_bias=True, tie_embeddings=bool(hf["tie_word_embeddings"]), dropout=0.0,
      dtype="float32", param_dtype=param_dtype)


class _Reader:
  """HF tensors by name (either LayerNorm spelling), remembering which were used."""

  def __init__(self, tensors: Mapping[str, np.ndarray]):
    self.tensors, self.used = tensors, set()

  def key(self, name: str) -> str | None:
    if name in self.tensors:
      return name
    for new, old in OLD_NAMES.items():
      if "LayerNorm" in name and name.endswith(new) and name[:-len(new)] + old in self.tensors:
        return name[:-len(new)] + old
    return None

  def has(self, name: str) -> bool:
    return self.key(name) is not None

  def get(self, name: str, shape: tuple) -> np.ndarray:
    key = self.key(name)
    if key is None:
      raise ConversionError(f"weight {name!r} is missing from the checkpoint")
    self.used.add(key)
    value = np.asarray(self.tensors[key])
    if value.shape != tuple(shape):
      raise ConversionError(f"weight {key!r} has shape {value.shape}, config.json implies "
                            f"{tuple(shape)}")
    return value

  def linear(self, name: str, d_in: int, d_out: int) -> dict:
    """A torch Linear as an llmjax {kernel [in, out], bias [out]}."""
    return {"kernel": self.get(name + ".weight", (d_out, d_in)).T,
            "bias": self.get(name + ".bias", (d_out,))}

  def norm(self, name: str, d: int) -> dict:
    return {"scale": self.get(name + ".weight", (d,)), "bias": self.get(name + ".bias", (d,))}

  def check_all_used(self) -> None:
    unused = sorted(k for k in self.tensors if k not in self.used and not k.endswith(IGNORED))
    if unused:
      more = f" (and {len(unused) - 5} more)" if len(unused) > 5 else ""
      raise ConversionError(f"checkpoint weights not understood by the BERT converter: "
                            f"{', '.join(unused[:5])}{more}; refusing to drop them silently "
                            "(llmjax converts BertForMaskedLM and BertForPreTraining)")


def _stack(per_layer: list) -> dict:
  first = per_layer[0]
  return {k: _stack([p[k] for p in per_layer]) if isinstance(v, dict)
          else np.stack([p[k] for p in per_layer]) for k, v in first.items()}


def _unstack(tree: dict, i: int) -> dict:
  return {k: _unstack(v, i) if isinstance(v, dict) else v[i] for k, v in tree.items()}


def import_params(tensors: Mapping[str, np.ndarray], cfg: TransformerConfig,
                  dtype=np.float32) -> tuple[dict, TransformerConfig]:
  r = _Reader(tensors)
  _refuse(not r.has("cls.predictions.transform.dense.weight"),
          "this BERT checkpoint has no masked-LM head (cls.predictions.*): llmjax imports "
          "BertForMaskedLM and BertForPreTraining, not a bare BertModel or a task model")
  d, h, hd, f, v = cfg.embed_dim, cfg.num_heads, cfg.dim_per_head, cfg.hidden_dim, cfg.vocab_size
  e = "bert.embeddings."
  params = {
      "token_embedding": r.get(e + "word_embeddings.weight", (v, d)),
      "position_embedding": r.get(e + "position_embeddings.weight", (cfg.max_seq_len, d)),
      "embed_norm": r.norm(e + "LayerNorm", d),
  }
  if cfg.type_vocab_size:
    params["type_embedding"] = r.get(e + "token_type_embeddings.weight", (cfg.type_vocab_size, d))
  layers = []
  for i in range(cfg.num_layers):
    p = f"bert.encoder.layer.{i}."
    attn = {}
    for name in ("query", "key", "value"):
      lin = r.linear(p + f"attention.self.{name}", d, h * hd)
      attn[name] = {"kernel": lin["kernel"].reshape(d, h, hd), "bias": lin["bias"].reshape(h, hd)}
    out = r.linear(p + "attention.output.dense", h * hd, d)
    attn["out"] = {"kernel": out["kernel"].reshape(h, hd, d), "bias": out["bias"]}
    layers.append({
        "attn": attn, "attn_norm": r.norm(p + "attention.output.LayerNorm", d),
        "mlp": {"fc": r.linear(p + "intermediate.dense", d, f),
                "proj": r.linear(p + "output.dense", f, d)},
        "mlp_norm": r.norm(p + "output.LayerNorm", d)})
  params["layers"] = _stack(layers)
  c = "cls.predictions."
  head = {"transform": r.linear(c + "transform.dense", d, d),
          "norm": r.norm(c + "transform.LayerNorm", d),
          "bias": r.get(c + "bias", (v,))}
  if r.has(c + "decoder.bias"):  # older checkpoints store the tied copy of the output bias
    if not np.array_equal(r.get(c + "decoder.bias", (v,)), head["bias"]):
      raise ConversionError("cls.predictions.decoder.bias differs from cls.predictions.bias")
  if cfg.tie_embeddings:
    if r.has(c + "decoder.weight") and not np.array_equal(
        r.get(c + "decoder.weight", (v, d)), params["token_embedding"]):
      raise ConversionError("tie_word_embeddings=true but cls.predictions.decoder.weight differs "
                            "from the word embeddings")
  else:
    head["decoder"] = {"kernel": r.get(c + "decoder.weight", (v, d)).T}
  params["mlm_head"] = head
  pooler = r.has("bert.pooler.dense.weight")
  nsp = r.has("cls.seq_relationship.weight")
  if pooler:
    params["pooler"] = {"dense": r.linear("bert.pooler.dense", d, d)}
  if nsp:
    _refuse(not pooler, "cls.seq_relationship (NSP head) without bert.pooler is not a BERT layout")
    params["nsp"] = r.linear("cls.seq_relationship", d, 2)
  r.check_all_used()
  cfg = dataclasses.replace(cfg, pooler=pooler, nsp_head=nsp)
  return _cast(params, dtype), cfg


def exports(cfg: TransformerConfig) -> bool:
  return cfg.family == "encoder"


def _check_exportable(cfg: TransformerConfig) -> None:
  want = dict(norm_position="post", position="learned", norm="layernorm", mlp="gelu",
              use_bias=True)
  for field, value in want.items():
    _refuse(getattr(cfg, field) != value,
            f"this encoder has model.{field}={getattr(cfg, field)!r}; Hugging Face BERT needs "
            f"{value!r}, so it has no exact BERT twin")
  _refuse(cfg.kv_heads != cfg.num_heads, "BERT has no grouped-query attention (num_kv_heads)")
  _refuse(cfg.dim_per_head * cfg.num_heads != cfg.embed_dim,
          "BERT needs head_dim * num_heads == embed_dim")
  _refuse(cfg.pooler != cfg.nsp_head,
          "export writes BertForMaskedLM (no pooler, no NSP head) or BertForPreTraining (both); "
          f"this encoder has pooler={cfg.pooler}, nsp_head={cfg.nsp_head}")
  _refuse(getattr(cfg, "num_labels", 0) > 0,
          "a fine-tuned classifier (model.num_labels > 0) has no BertForMaskedLM twin")


def special_id(tokenizer, name: str):
  specials = getattr(tokenizer, "special_ids", None) or {}
  return specials.get(name)


def to_hf(cfg: TransformerConfig, tokenizer=None) -> dict:
  _check_exportable(cfg)
  pad = special_id(tokenizer, "pad")
  return {
      "architectures": ["BertForPreTraining" if cfg.nsp_head else "BertForMaskedLM"],
      "model_type": "bert", "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "intermediate_size": cfg.hidden_dim,
      "hidden_act": "gelu_new" if cfg.gelu_approximate else "gelu",
      "max_position_embeddings": cfg.max_seq_len,
      # BERT always adds a token-type row; a model without token types gets one zero row
      "type_vocab_size": max(cfg.type_vocab_size, 1), "layer_norm_eps": cfg.norm_eps,
      "position_embedding_type": "absolute", "tie_word_embeddings": cfg.tie_embeddings,
      "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
      "is_decoder": False, "add_cross_attention": False, "initializer_range": cfg.init_std,
      "pad_token_id": 0 if pad is None else int(pad), "torch_dtype": cfg.param_dtype,
  }


def export_params(params: dict, cfg: TransformerConfig) -> dict[str, np.ndarray]:
  _check_exportable(cfg)
  d, h, hd = cfg.embed_dim, cfg.num_heads, cfg.dim_per_head
  e = "bert.embeddings."
  lin = lambda t: {".weight": t["kernel"].T, ".bias": t["bias"]}  # noqa: E731
  norm = lambda t: {".weight": t["scale"], ".bias": t["bias"]}  # noqa: E731
  out = {e + "word_embeddings.weight": params["token_embedding"],
         e + "position_embeddings.weight": params["position_embedding"]}
  types = params.get("type_embedding")
  if types is None:
    types = np.zeros((1, d), params["token_embedding"].dtype)
  out[e + "token_type_embeddings.weight"] = types

  def put(prefix, parts):
    out.update({prefix + k: v for k, v in parts.items()})

  put(e + "LayerNorm", norm(params["embed_norm"]))
  for i in range(cfg.num_layers):
    L, p = _unstack(params["layers"], i), f"bert.encoder.layer.{i}."
    a = L["attn"]
    for name in ("query", "key", "value"):
      put(p + f"attention.self.{name}", lin({"kernel": a[name]["kernel"].reshape(d, h * hd),
                                             "bias": a[name]["bias"].reshape(h * hd)}))
    put(p + "attention.output.dense", lin({"kernel": a["out"]["kernel"].reshape(h * hd, d),
                                           "bias": a["out"]["bias"]}))
    put(p + "attention.output.LayerNorm", norm(L["attn_norm"]))
    put(p + "intermediate.dense", lin(L["mlp"]["fc"]))
    put(p + "output.dense", lin(L["mlp"]["proj"]))
    put(p + "output.LayerNorm", norm(L["mlp_norm"]))
  head, c = params["mlm_head"], "cls.predictions."
  put(c + "transform.dense", lin(head["transform"]))
  put(c + "transform.LayerNorm", norm(head["norm"]))
  out[c + "bias"] = head["bias"]
  if not cfg.tie_embeddings:
    out[c + "decoder.weight"] = head["decoder"]["kernel"].T
  if cfg.pooler:
    put("bert.pooler.dense", lin(params["pooler"]["dense"]))
    put("cls.seq_relationship", lin(params["nsp"]))
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def run_config(config) -> None:
  """An imported BERT keeps pretraining with the masked-LM objective unless told otherwise."""
  config.train.objective = "masked_lm"


def _cast(tree, dtype):
  if isinstance(tree, dict):
    return {k: _cast(v, dtype) for k, v in tree.items()}
  return np.asarray(tree).astype(dtype, copy=False)


FAMILY = Family(name="bert", model_types=("bert",), to_llmjax=to_llmjax,
                import_params=import_params, exports=exports, to_hf=to_hf,
                export_params=export_params, run_config=run_config)
