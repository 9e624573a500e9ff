"""The decoder-only (or bidirectional) Transformer: embeddings -> N blocks -> norm -> logits.

Layers are always stored stacked along a leading 'layers' axis and run with `nn.scan`; with
`scan_layers=False` the same loop is fully unrolled, so both modes share one parameter layout
(checkpoints and converters never need to know which one trained).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.model.attention import Attention
from llmjax.model.config import TransformerConfig
from llmjax.model.layers import DenseGeneral, Mlp, Norm, constrain, logical_init

# Which intermediate values a rematerialized block keeps for the backward pass.
REMAT_POLICIES = {
    "none": None,  # no remat: keep everything
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""
  cfg: TransformerConfig
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    cfg = self.cfg
    x = constrain(x, ("batch", "length", "embed"))
    h = Norm(cfg, name="attn_norm")(x)
    x = x + Attention(cfg, name="attn")(h, positions, segment_ids, self.deterministic, self.decode)
    h = Norm(cfg, name="mlp_norm")(x)
    x = x + Mlp(cfg, name="mlp")(h, self.deterministic)
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

    embedding = self.param("token_embedding", logical_init(cfg, ("vocab", "embed")),
                           (cfg.vocab_size, cfg.embed_dim), cfg.weight_dtype)
    x = jnp.take(embedding, tokens, axis=0).astype(cfg.compute_dtype)
    if cfg.position == "learned":
      pos_table = self.param("position_embedding", logical_init(cfg, ("length", "embed")),
                             (cfg.max_seq_len, cfg.embed_dim), cfg.weight_dtype)
      x = x + jnp.take(pos_table, positions, axis=0).astype(cfg.compute_dtype)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    x = constrain(x, ("batch", "length", "embed"))

    block = Block
    policy = REMAT_POLICIES[cfg.remat_policy]
    if cfg.remat_policy != "none":
      block = nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)
    layers = nn.scan(
        block,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        unroll=1 if cfg.scan_layers else cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = layers(cfg, deterministic, decode, name="layers")(x, positions, segment_ids)
    x = Norm(cfg, name="final_norm")(x)
    if return_hidden:
      return x

    if cfg.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", x, embedding.astype(cfg.compute_dtype))
    else:
      logits = DenseGeneral(cfg, (cfg.vocab_size,), ("embed", "vocab"), name="lm_head")(x)
    logits = constrain(logits, ("batch", "length", "vocab"))
    return logits.astype(jnp.dtype(cfg.logits_dtype))
