"""The model's own configuration: a frozen dataclass, so the model never depends on ml_collections."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Every architectural choice of the GPT-2 and Llama families, as plain data."""
  family: str = "decoder"      # the module llmjax.model.build_model builds (FAMILIES there)
  vocab_size: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 0        # 0 -> num_heads (multi-head); 1 -> multi-query; else grouped-query
  embed_dim: int = 128
  head_dim: int = 0            # 0 -> embed_dim // num_heads
  mlp_dim: int = 0             # 0 -> 4 * embed_dim
  max_seq_len: int = 256
  position: str = "learned"    # 'learned' | 'rotary' | 'sinusoidal' (the original Transformer's) | 'relative' (T5 bias) | 'none'
  rope_theta: float = 10000.0
  # RoPE frequency scaling for long context (as in Hugging Face's rope_scaling / rope_parameters):
  # 'none'; 'linear' (every frequency / factor); 'llama3' (Llama 3.1: low frequencies / factor,
  # high ones kept, a smooth ramp between, set by the two freq factors and the original context).
  rope_scaling: str = "none"
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  norm: str = "layernorm"      # 'layernorm' | 'rmsnorm'
  norm_eps: float = 1e-5
  mlp: str = "gelu"            # 'gelu' | 'swiglu' | 'relu' (T5 v1.0) | 'geglu' (T5 v1.1 gated GELU)
                               # | 'relu2' (squared ReLU, as in the modded-nanogpt speedrun)
  gelu_approximate: bool = True  # tanh GELU (GPT-2's "gelu_new"); False: exact erf GELU (nanoGPT)
  use_bias: bool = True
  tie_embeddings: bool = True
  dropout: float = 0.0
  causal: bool = True          # False -> bidirectional encoder (masked LM)
  dtype: str = "float32"       # compute dtype
  param_dtype: str = "float32"
  scan_layers: bool = True     # False fully unrolls the same stacked-parameter loop
  remat_policy: str = "none"   # see model.transformer.REMAT_POLICIES
  attention_impl: str = "auto" # 'auto' | 'xla' | 'cudnn'
  # Dense-layer matmul operands: 'compute' (= dtype) or 'bfloat16' (bf16 x bf16 with float32
  # accumulation, forward and backward, activations stay in `dtype`): on CPUs with AVX-512 BF16
  # such matmuls run ~1.5-2x faster than fp32 (benchmarks/RESULTS.md).
  matmul_dtype: str = "compute"
  init_std: float = 0.02
  logits_dtype: str = "float32"
  # --- issue 11 (encoders) -------------------------------------------------------------------
  norm_position: str = "pre"   # 'pre': x + f(norm(x)) (GPT-2, Llama); 'post': norm(x + f(x))
                               # (the original Transformer, BERT; no final norm)
  type_vocab_size: int = 0     # token-type (segment A/B) embeddings; 0 -> none (BERT: 2)
  pooler: bool = False         # encoder: dense + tanh on the first ([CLS]) token
  nsp_head: bool = False       # encoder: next-sentence prediction (2 classes) on the pooled output
  # -- encoder-decoder models (issue 11; family 'encoder_decoder', llmjax.model.encoder_decoder) --
  encoder_layers: int = 0      # encoder depth of an encoder-decoder (0 -> num_layers)
  share_embeddings: bool = True  # encoder and decoder read one token table (T5's `shared`)
  relative_buckets: int = 32   # position='relative': T5 relative-position buckets per direction pair
  relative_max_distance: int = 128  # distances beyond this share the last bucket
  scale_attention: bool = True  # False: scores are q.k without 1/sqrt(head_dim) (T5 folds it in init)
  scale_decoder_outputs: bool = False  # hidden * embed_dim**-0.5 before the head (T5 v1.0, tied)
  decoder_start_id: int = 0    # the token the decoder starts from (T5: pad = 0)

  # Sequence classification (issue 9): > 0 puts a `classifier` head (embed -> num_labels) on the
  # pooled final hidden state, and the model returns label logits [batch, num_labels] instead of
  # token logits.
  num_labels: int = 0
  # which hidden state(s) the classifier reads (llmjax/model/pooling.py): 'last' real token,
  # 'first' token, 'mean' over real tokens; 'auto' = last for causal models, first for
  # bidirectional ones
  pooling: str = "auto"

  @property
  def num_encoder_layers(self) -> int:
    return self.encoder_layers or self.num_layers

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.embed_dim // self.num_heads

  @property
  def hidden_dim(self) -> int:
    return self.mlp_dim or 4 * self.embed_dim

  @property
  def rope_scaling_params(self) -> tuple | None:
    """Hashable (kind, factor, low, high, original_len) for apply_rotary, or None."""
    if self.rope_scaling == "none":
      return None
    return (self.rope_scaling, self.rope_scaling_factor, self.rope_low_freq_factor,
            self.rope_high_freq_factor, self.rope_original_max_len)

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> "TransformerConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def num_params(cfg: TransformerConfig, include_embeddings: bool = True) -> int:
  """Parameter count from the config alone (matches the initialized tree; tested)."""
  if cfg.family == "encoder_decoder":
    from llmjax.model.encoder_decoder import num_params as encoder_decoder_params
    return encoder_decoder_params(cfg, include_embeddings)
  d, h, kv, hd, f, v = (cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head,
                        cfg.hidden_dim, cfg.vocab_size)
  b = 1 if cfg.use_bias else 0
  norm = d * (2 if cfg.norm == "layernorm" and cfg.use_bias else 1)
  attn = d * hd * (h + 2 * kv) + h * hd * d + b * (hd * (h + 2 * kv) + d)
  mlp_in = 2 if cfg.mlp == "swiglu" else 1
  mlp = mlp_in * (d * f + b * f) + f * d + b * d
  per_layer = attn + mlp + 2 * norm
  total = cfg.num_layers * per_layer + (norm if cfg.norm_position == "pre" else 0)
  if cfg.family == "encoder":
    # embedding norm; pooler; then either the classifier (num_labels > 0, added below) or the
    # MLM head (transform dense + norm, decoder bias) and the NSP classifier
    total += norm + (d * d + d) * cfg.pooler
    if not getattr(cfg, "num_labels", 0):
      total += d * d + b * d + norm + v + (2 * d + 2) * cfg.nsp_head
  if include_embeddings:
    total += v * d + cfg.type_vocab_size * d
    if cfg.position == "learned":
      total += cfg.max_seq_len * d
    if not cfg.tie_embeddings and not cfg.num_labels:
      total += d * v  # a classification model has no LM head
  if cfg.num_labels:
    total += d * cfg.num_labels + cfg.num_labels  # classifier kernel + bias
  return total
