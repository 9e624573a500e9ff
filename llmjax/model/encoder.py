"""The bidirectional encoder (BERT family): embeddings -> N blocks -> masked-LM head (+ pooler, NSP).

Embeddings are token + position (learned or sinusoidal) + token type (segment A/B), then a norm
(BERT normalizes the embedding sum). The blocks are the decoder's `Block` run without the causal
mask, pre- or post-norm (model.norm_position); pre-norm stacks end with a final norm, post-norm
ones already end in one. Padding is masked through `segment_ids`: tokens attend only to tokens of
their own segment, so padding given segment 0 is never attended to by real tokens.

Heads:
- masked LM (always): dense -> activation -> norm -> decoder tied to the token embeddings (or its
  own kernel when tie_embeddings=False) plus a per-token output bias, as BERT's cls.predictions;
- pooler (model.pooler): dense + tanh on the first ([CLS]) token, for classification;
- next-sentence prediction (model.nsp_head): 2 logits from the pooled output;
- classification (model.num_labels > 0, the fine-tuning head): label logits from the pooled first
  token (or the pooling model.pooling names), replacing the masked-LM and NSP heads.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from llmjax.model.config import TransformerConfig
from llmjax.model.layers import (DenseGeneral, Norm, constrain, dense_weight, logical_init,
                                 zeros_init)
from llmjax.model.pooling import pool_hidden
from llmjax.model.transformer import embed_tokens, scanned_blocks


def activation(cfg: TransformerConfig, x):
  """The MLM head's activation: the blocks' GELU flavour (BERT's hidden_act)."""
  return nn.gelu(x, approximate=cfg.gelu_approximate)


class MlmHead(nn.Module):
  """BERT's prediction head: transform (dense, activation, norm), then the vocabulary decoder."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x, embedding):
    cfg = self.cfg
    # [embed, embed] kernels: a logical name may appear once per array, so the output side is
    # named "mlp" (tensor-parallel like the MLP's hidden side).
    h = DenseGeneral(cfg, (cfg.embed_dim,), ("embed", "mlp"), use_bias=cfg.use_bias,
                     name="transform")(x)
    h = Norm(cfg, name="norm")(activation(cfg, h))
    if cfg.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", h, dense_weight(embedding, cfg.compute_dtype, h))
    else:
      logits = DenseGeneral(cfg, (cfg.vocab_size,), ("embed", "vocab"), name="decoder")(h)
    bias = self.param("bias", zeros_init(("vocab",)), (cfg.vocab_size,), cfg.weight_dtype)
    return logits + bias.astype(logits.dtype)


class Pooler(nn.Module):
  """dense + tanh on the first token's final hidden state (BERT's pooler)."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, hidden):
    cfg = self.cfg
    first = hidden[:, 0]
    return jnp.tanh(DenseGeneral(cfg, (cfg.embed_dim,), ("embed", "mlp"), use_bias=True,
                                 name="dense")(first))


class Encoder(nn.Module):
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, token_types=None,
               deterministic: bool = True, decode: bool = False, return_hidden: bool = False,
               return_nsp: bool = False, return_pooled: bool = False):
    """tokens: int [batch, length] -> masked-LM logits [batch, length, vocab] (float32 default).

    token_types (int [batch, length], default 0) select the segment embedding; segment_ids mask
    attention (0 for padding, see the module doc). return_hidden gives the final hidden states
    instead; return_pooled gives the pooled first token [batch, embed]; return_nsp gives
    (logits, nsp_logits [batch, 2]). Initialization creates every configured head.
    """
    cfg = self.cfg
    if decode:
      raise ValueError("an encoder (model.family='encoder') has no KV-cached decoding; "
                       "use llmjax.fill_mask or a decoder model for generation")
    if cfg.causal:  # the blocks read cfg.causal; an encoder is bidirectional by definition
      cfg = dataclasses.replace(cfg, causal=False)
    batch, length = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))

    x, embedding = embed_tokens(self, cfg, tokens, positions)
    if cfg.type_vocab_size:
      types = self.param("type_embedding", logical_init(cfg, (None, "embed")),
                         (cfg.type_vocab_size, cfg.embed_dim), cfg.weight_dtype)
      if token_types is None:
        token_types = jnp.zeros_like(tokens)
      x = x + jnp.take(types, token_types, axis=0).astype(cfg.compute_dtype)
    x = Norm(cfg, name="embed_norm")(x)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    x = constrain(x, ("batch", "length", "embed"))

    x = scanned_blocks(cfg, x, positions, segment_ids, deterministic)
    if cfg.norm_position == "pre":
      x = Norm(cfg, name="final_norm")(x)
    if return_hidden:
      return x

    if getattr(cfg, "num_labels", 0) > 0:
      return self._classify(x, segment_ids, deterministic)

    init = self.is_initializing()
    pooled = None
    if cfg.pooler and (init or return_pooled or return_nsp):
      pooled = Pooler(cfg, name="pooler")(x)
    if return_pooled:
      if pooled is None:
        raise ValueError("return_pooled needs model.pooler=True")
      return pooled
    nsp = None
    if cfg.nsp_head and (init or return_nsp):
      if pooled is None:
        raise ValueError("model.nsp_head=True needs model.pooler=True")
      nsp = DenseGeneral(cfg, (2,), ("embed", None), use_bias=True, name="nsp")(pooled)
      nsp = nsp.astype(jnp.float32)

    logits = MlmHead(cfg, name="mlm_head")(x, embedding)
    logits = constrain(logits, ("batch", "length", "vocab")).astype(jnp.dtype(cfg.logits_dtype))
    if return_nsp:
      if nsp is None:
        raise ValueError("return_nsp needs model.nsp_head=True")
      return logits, nsp
    return logits

  @nn.nowrap  # runs inside __call__'s compact scope
  def _classify(self, x, segment_ids, deterministic):
    """Sequence classification (model.num_labels > 0), as BertForSequenceClassification: label
    logits [batch, num_labels] from the pooled first token (the pooler's output when the model has
    one, else the hidden state model.pooling picks: the first token by default, or the mean over
    real tokens), after dropout. The MLM and NSP heads are not built."""
    cfg = self.cfg
    pooled = (Pooler(cfg, name="pooler")(x) if cfg.pooler
              else pool_hidden(x, segment_ids, False, cfg.pooling))
    pooled = nn.Dropout(cfg.dropout)(constrain(pooled, ("batch", "embed")),
                                     deterministic=deterministic)
    logits = DenseGeneral(cfg, (cfg.num_labels,), ("embed", "labels"), use_bias=True,
                          name="classifier")(pooled)
    return logits.astype(jnp.float32)
