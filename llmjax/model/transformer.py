"""The decoder-only (or bidirectional) Transformer: embeddings -> N blocks -> norm -> logits.

Layers are always stored stacked along a leading 'layers' axis and run with `nn.scan`; with
`scan_layers=False` the same loop is fully unrolled, so both modes share one parameter layout
(checkpoints and converters never need to know which one trained).

Cached decoding (`decode=True`) is the exception: it runs one `Block` per layer ("layer_0",
"layer_1", ...) over per-layer weights and caches that `unstack_layers` splits off the stacked
params once per generation. A scan (or its unrolled form) slices every stacked weight per layer on
every step, and XLA on CPU materializes each slice as a copy before the matmul, so one decoded
token would read all weights twice and write them once; the stacked cache would also go in as scan
inputs and come out as fresh scan outputs. Separate per-layer buffers are read in place by the
matmuls, and each layer's cache is updated in place (the decode step donates it).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.model.attention import Attention
from llmjax.model.config import TransformerConfig
from llmjax.model.embeddings import sinusoidal_positions
from llmjax.model.layers import (DenseGeneral, Mlp, Norm, constrain, dense_weight, embedding_rows,
                                 logical_init, matmul)
from llmjax.model.pooling import pool_hidden

# Which intermediate values a rematerialized block keeps for the backward pass.
REMAT_POLICIES = {
    "none": None,  # no remat: keep everything
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); or, with
  norm_position='post' (the original Transformer, BERT), norm(x + attn(x)), then norm(x + mlp(x)).
  The two norms keep their names in both layouts (attn_norm, mlp_norm)."""
  cfg: TransformerConfig
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    cfg = self.cfg
    x = constrain(x, ("batch", "length", "embed"))
    attn = Attention(cfg, name="attn")
    mlp = Mlp(cfg, name="mlp")
    if cfg.norm_position == "post":
      x = Norm(cfg, name="attn_norm")(
          x + attn(x, positions, segment_ids, self.deterministic, self.decode))
      x = Norm(cfg, name="mlp_norm")(x + mlp(x, self.deterministic))
      return x, None
    h = Norm(cfg, name="attn_norm")(x)
    x = x + attn(h, positions, segment_ids, self.deterministic, self.decode)
    h = Norm(cfg, name="mlp_norm")(x)
    x = x + mlp(h, self.deterministic)
    return x, None  # (carry, per-layer output) for nn.scan


class Transformer(nn.Module):
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, deterministic: bool = True,
               decode: bool = False, return_hidden: bool = False):
    """tokens: int [batch, length] -> logits [batch, length, vocab] (float32 by default).

    positions default to 0..length-1; segment_ids (int [batch, length]) keep packed documents
    from attending to each other and restart positions are the caller's business.
    """
    cfg = self.cfg
    batch, length = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))

    x, embedding = embed_tokens(self, cfg, tokens, positions)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    x = constrain(x, ("batch", "length", "embed"))

    if decode:
      for i in range(cfg.num_layers):
        x, _ = Block(cfg, deterministic, decode, name=f"layer_{i}")(x, positions, segment_ids)
    else:
      x = scanned_blocks(cfg, x, positions, segment_ids, deterministic)
    if cfg.norm_position == "pre":  # post-norm blocks already end in a norm
      x = Norm(cfg, name="final_norm")(x)
    if return_hidden:
      return x
    if cfg.num_labels > 0:
      return self._classify(pool_hidden(x, segment_ids, cfg.causal, cfg.pooling))

    if cfg.tie_embeddings:
      table = dense_weight(embedding, cfg.compute_dtype, x)
      if cfg.matmul_dtype == "compute":
        logits = jnp.einsum("btd,vd->btv", x, table)
      else:
        logits = matmul(cfg, x.reshape(batch * length, -1), table,
                        transpose_w=True).reshape(batch, length, -1)
    else:
      logits = DenseGeneral(cfg, (cfg.vocab_size,), ("embed", "vocab"), name="lm_head")(x)
    logits = constrain(logits, ("batch", "length", "vocab"))
    return logits.astype(jnp.dtype(cfg.logits_dtype))

  @nn.nowrap  # runs inside __call__'s compact scope
  def _classify(self, pooled):
    """Label logits [batch, num_labels] (float32) from pooled hidden states [batch, embed]."""
    cfg = self.cfg
    pooled = constrain(pooled, ("batch", "embed"))
    logits = DenseGeneral(cfg, (cfg.num_labels,), ("embed", "labels"), use_bias=True,
                          name="classifier")(pooled)
    return logits.astype(jnp.float32)


def embed_tokens(module: nn.Module, cfg: TransformerConfig, tokens, positions):
  """(the token embeddings of `tokens` plus the position encoding of `positions`, in the compute
  dtype; the table "token_embedding", a param of `module`, which a tied output head reuses): the
  front end decoders and encoders share."""
  embedding = module.param("token_embedding", logical_init(cfg, ("vocab", "embed")),
                           (cfg.vocab_size, cfg.embed_dim), cfg.weight_dtype)
  adapt = getattr(module, "adapted_table", None)  # a LoRA model's token-table adapter (model/lora.py)
  if adapt is not None:
    embedding = adapt(embedding)
  x = embedding_rows(embedding, tokens).astype(cfg.compute_dtype)
  return x + position_encoding(module, cfg, positions), embedding


def position_encoding(module: nn.Module, cfg: TransformerConfig, positions):
  """What the embeddings add for `positions`: a learned table ("position_embedding", a param of
  `module`), fixed sinusoids, or zero (rotary positions act inside attention; 'none')."""
  if cfg.position == "learned":
    pos_table = module.param("position_embedding", logical_init(cfg, ("length", "embed")),
                             (cfg.max_seq_len, cfg.embed_dim), cfg.weight_dtype)
    return jnp.take(pos_table, positions, axis=0).astype(cfg.compute_dtype)
  if cfg.position == "sinusoidal":
    return sinusoidal_positions(positions, cfg.embed_dim).astype(cfg.compute_dtype)
  return jnp.zeros((), cfg.compute_dtype)


def scanned_blocks(cfg: TransformerConfig, x, positions, segment_ids, deterministic,
                   block=None):
  """The stack of `cfg.num_layers` blocks as one scan over stacked params (named "layers"), or
  its unrolled twin (scan_layers=False); call it inside a compact method."""
  block = block or Block
  policy = REMAT_POLICIES[cfg.remat_policy]
  if cfg.remat_policy != "none":
    block = nn.remat(block, policy=policy, prevent_cse=not cfg.scan_layers)
  layers = nn.scan(
      block,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast, nn.broadcast),
      length=cfg.num_layers,
      unroll=1 if cfg.scan_layers else cfg.num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )
  x, _ = layers(cfg, deterministic, False, name="layers")(x, positions, segment_ids)
  return x


def unstack_layers(params):
  """The params in the per-layer layout decoding uses: the stacked "layers" subtree becomes
  "layer_0" .. "layer_{n-1}" (one copy of the layer weights); params already in that layout, or
  with no layers, come back as they are. Works on quantized (QArray) weights too."""
  if "layers" not in params:
    return params
  params = dict(params)
  stacked = params.pop("layers")
  count = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(count):
    params[f"layer_{i}"] = jax.tree.map(lambda w, i=i: w[i], stacked)
  return params
