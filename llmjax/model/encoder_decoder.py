"""The encoder-decoder Transformer (family 'encoder_decoder'): the original translation model and T5.

    source tokens -> embed (+ positions) -> encoder blocks (bidirectional) -> norm -> encoded
    target tokens -> embed (+ positions) -> decoder blocks (causal self-attention, cross-attention
                     over `encoded`, MLP) -> norm -> logits

Both stacks are pre-norm and reuse the decoder-only model's layers (Attention, Mlp, Norm), so they
carry the same logical axis names and shard the same way. Positions are 'learned' (a table per
stack), 'sinusoidal', or 'relative' (T5: a learned bias per stack on the attention scores,
bidirectional buckets in the encoder, causal ones in the decoder, shared by the stack's layers).
With share_embeddings one token table ("token_embedding") serves encoder input, decoder input
and, when tie_embeddings, the output head (T5's `shared`).

Layers are stored stacked ("layers") and run with nn.scan (unrolled when scan_layers=False), as
in llmjax.model.transformer; cached decoding runs the decoder's per-layer path ("layer_0", ...;
see unstack_decoder) with the self-attention KV cache and the cross-attention keys/values in the
'cache' collection (llmjax.seq2seq_decode drives it).

Segment ids (0 = padding) keep packed pairs apart on both sides: a source token attends to source
tokens of its segment, a target token to earlier target tokens of its segment and to the source
tokens of the same segment.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from llmjax.model.attention import Attention, CrossAttention
from llmjax.model.config import TransformerConfig
from llmjax.model.embeddings import sinusoidal_positions
from llmjax.model.layers import (DenseGeneral, Mlp, Norm, constrain, dense_weight, embedding_rows,
                                 logical_init)
from llmjax.model.transformer import REMAT_POLICIES, unstack_layers

POSITIONS = ("learned", "sinusoidal", "relative", "none")


def stack_configs(cfg: TransformerConfig) -> tuple[TransformerConfig, TransformerConfig]:
  """(encoder, decoder) configs: the encoder is bidirectional with its own depth."""
  enc = dataclasses.replace(cfg, causal=False, num_layers=cfg.num_encoder_layers)
  dec = dataclasses.replace(cfg, causal=True)
  return enc, dec


def _default_positions(tokens):
  batch, length = tokens.shape
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


class EncoderBlock(nn.Module):
  cfg: TransformerConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, positions, segment_ids, relative_table):
    cfg = self.cfg
    x = constrain(x, ("batch", "length", "embed"))
    h = Norm(cfg, name="attn_norm")(x)
    x = x + Attention(cfg, name="attn")(h, positions, segment_ids, self.deterministic, False,
                                        relative_table)
    h = Norm(cfg, name="mlp_norm")(x)
    x = x + Mlp(cfg, name="mlp")(h, self.deterministic)
    return x, None


class DecoderBlock(nn.Module):
  cfg: TransformerConfig
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids, relative_table, encoded, cross_mask):
    cfg = self.cfg
    x = constrain(x, ("batch", "length", "embed"))
    h = Norm(cfg, name="attn_norm")(x)
    x = x + Attention(cfg, name="attn")(h, positions, segment_ids, self.deterministic,
                                        self.decode, relative_table)
    h = Norm(cfg, name="cross_norm")(x)
    x = x + CrossAttention(cfg, name="cross_attn")(h, encoded, cross_mask, self.deterministic,
                                                   self.decode)
    h = Norm(cfg, name="mlp_norm")(x)
    x = x + Mlp(cfg, name="mlp")(h, self.deterministic)
    return x, None


def _scan(block_cls, cfg: TransformerConfig, n_broadcast: int, name: str, *block_args):
  """The stacked-parameter loop over cfg.num_layers blocks (see llmjax.model.transformer)."""
  block = block_cls
  if cfg.remat_policy != "none":
    block = nn.remat(block_cls, policy=REMAT_POLICIES[cfg.remat_policy],
                     prevent_cse=not cfg.scan_layers)
  return nn.scan(
      block,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,) * n_broadcast,
      length=cfg.num_layers,
      unroll=1 if cfg.scan_layers else cfg.num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )(cfg, *block_args, name=name)


class _Stack(nn.Module):
  """Shared parts of both stacks: token embedding lookup, positions, relative-bias table."""
  cfg: TransformerConfig

  @nn.nowrap  # runs inside the subclass's compact __call__
  def embed(self, table, tokens, positions, deterministic):
    cfg = self.cfg
    x = embedding_rows(table, tokens).astype(cfg.compute_dtype)
    if cfg.position == "learned":
      pos_table = self.param("position_embedding", logical_init(cfg, ("length", "embed")),
                             (cfg.max_seq_len, cfg.embed_dim), cfg.weight_dtype)
      x = x + jnp.take(pos_table, positions, axis=0).astype(cfg.compute_dtype)
    elif cfg.position == "sinusoidal":
      x = x + sinusoidal_positions(positions, cfg.embed_dim).astype(cfg.compute_dtype)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    return constrain(x, ("batch", "length", "embed"))

  @nn.nowrap
  def relative_table(self):
    cfg = self.cfg
    if cfg.position != "relative":
      return None
    return self.param("relative_bias", logical_init(cfg, (None, "heads")),
                      (cfg.relative_buckets, cfg.num_heads), cfg.weight_dtype)


class Encoder(_Stack):
  @nn.compact
  def __call__(self, table, tokens, positions, segment_ids, deterministic: bool = True):
    cfg = self.cfg
    x = self.embed(table, tokens, positions, deterministic)
    rel = self.relative_table()
    x, _ = _scan(EncoderBlock, cfg, 3, "layers", deterministic)(x, positions, segment_ids, rel)
    x = Norm(cfg, name="final_norm")(x)
    return nn.Dropout(cfg.dropout)(x, deterministic=deterministic)


class Decoder(_Stack):
  @nn.compact
  def __call__(self, table, tokens, positions, segment_ids, encoded, cross_mask,
               deterministic: bool = True, decode: bool = False):
    cfg = self.cfg
    x = self.embed(table, tokens, positions, deterministic)
    rel = self.relative_table()
    if decode:  # per-layer weights and caches (see module docstring)
      for i in range(cfg.num_layers):
        x, _ = DecoderBlock(cfg, deterministic, True, name=f"layer_{i}")(
            x, positions, segment_ids, rel, encoded, cross_mask)
    else:
      x, _ = _scan(DecoderBlock, cfg, 5, "layers", deterministic, False)(
          x, positions, segment_ids, rel, encoded, cross_mask)
    x = Norm(cfg, name="final_norm")(x)
    return nn.Dropout(cfg.dropout)(x, deterministic=deterministic)


def cross_mask(decoder_segment_ids, encoder_segment_ids):
  """bool [batch, target, source]: a target token sees the source tokens of its own segment
  (segment 0 is padding and sees nothing real)."""
  return decoder_segment_ids[:, :, None] == encoder_segment_ids[:, None, :]


class EncoderDecoder(nn.Module):
  """`model(encoder_tokens, decoder_tokens)` -> logits [batch, target length, vocab].

  Methods for decoding: `encode(...)` -> encoded source; `decode(...)` -> logits from decoder
  tokens and an encoded source (or, with decode=True and encoded=None, from the cache).
  """
  cfg: TransformerConfig

  def setup(self):
    cfg = self.cfg
    if cfg.position not in POSITIONS:
      raise ValueError(f"model.position={cfg.position!r} is not available for encoder-decoders; "
                       f"use one of {', '.join(POSITIONS)}")
    enc_cfg, dec_cfg = stack_configs(cfg)
    table = lambda: logical_init(cfg, ("vocab", "embed"))  # noqa: E731
    shape = (cfg.vocab_size, cfg.embed_dim)
    if cfg.share_embeddings:
      self.token_embedding = self.param("token_embedding", table(), shape, cfg.weight_dtype)
    else:
      self.encoder_embedding = self.param("encoder_embedding", table(), shape, cfg.weight_dtype)
      self.decoder_embedding = self.param("decoder_embedding", table(), shape, cfg.weight_dtype)
    self.encoder = Encoder(enc_cfg)
    self.decoder = Decoder(dec_cfg)
    if not cfg.tie_embeddings:
      self.lm_head = DenseGeneral(cfg, (cfg.vocab_size,), ("embed", "vocab"))

  def _tables(self):
    if self.cfg.share_embeddings:
      return self.token_embedding, self.token_embedding
    return self.encoder_embedding, self.decoder_embedding

  def encode(self, encoder_tokens, encoder_positions=None, encoder_segment_ids=None,
             deterministic: bool = True):
    """[batch, source length] ids -> encoded source [batch, source length, embed]."""
    if encoder_positions is None:
      encoder_positions = _default_positions(encoder_tokens)
    table, _ = self._tables()
    return self.encoder(table, encoder_tokens, encoder_positions, encoder_segment_ids,
                        deterministic)

  def decode(self, decoder_tokens, encoded, decoder_positions=None, decoder_segment_ids=None,
             encoder_segment_ids=None, deterministic: bool = True, decode: bool = False,
             return_hidden: bool = False):
    """Logits [batch, target length, vocab] for decoder tokens attending to `encoded` (or, when
    decoding, to the cross-attention keys/values cached by the prefill call: encoded=None)."""
    cfg = self.cfg
    batch, length = decoder_tokens.shape
    if decoder_positions is None:
      decoder_positions = _default_positions(decoder_tokens)
    mask = None
    if encoder_segment_ids is not None:
      if decoder_segment_ids is None:  # one target per row: every target token is segment 1
        mask = jnp.broadcast_to((encoder_segment_ids != 0)[:, None, :],
                                (batch, length, encoder_segment_ids.shape[1]))
      else:
        mask = cross_mask(decoder_segment_ids, encoder_segment_ids)
    _, table = self._tables()
    x = self.decoder(table, decoder_tokens, decoder_positions, decoder_segment_ids, encoded, mask,
                     deterministic, decode)
    if return_hidden:
      return x
    if cfg.scale_decoder_outputs:
      x = x * cfg.embed_dim ** -0.5
    if cfg.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", x, dense_weight(table, cfg.compute_dtype, x))
    else:
      logits = self.lm_head(x)
    logits = constrain(logits, ("batch", "length", "vocab"))
    return logits.astype(jnp.dtype(cfg.logits_dtype))

  def __call__(self, encoder_tokens, decoder_tokens, encoder_positions=None,
               decoder_positions=None, encoder_segment_ids=None, decoder_segment_ids=None,
               deterministic: bool = True, return_hidden: bool = False):
    encoded = self.encode(encoder_tokens, encoder_positions, encoder_segment_ids, deterministic)
    return self.decode(decoder_tokens, encoded, decoder_positions, decoder_segment_ids,
                       encoder_segment_ids, deterministic, return_hidden=return_hidden)


def unstack_decoder(params):
  """The params with the decoder's stacked layers split per layer, as cached decoding reads them
  (one copy of the decoder layer weights); a no-op when already split."""
  if "decoder" not in params or "layers" not in params["decoder"]:
    return params
  params = dict(params)
  params["decoder"] = unstack_layers(params["decoder"])
  return params


def num_params(cfg: TransformerConfig, include_embeddings: bool = True) -> int:
  """Parameter count of an encoder-decoder from its config (matches the initialized tree)."""
  d, h, kv, hd, f, v = (cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head,
                        cfg.hidden_dim, cfg.vocab_size)
  b = 1 if cfg.use_bias else 0
  norm = d * (2 if cfg.norm == "layernorm" and cfg.use_bias else 1)
  attn = d * hd * (h + 2 * kv) + h * hd * d + b * (hd * (h + 2 * kv) + d)
  mlp_in = 2 if cfg.mlp in ("swiglu", "geglu") else 1
  mlp = mlp_in * (d * f + b * f) + f * d + b * d
  enc_layer = attn + mlp + 2 * norm
  dec_layer = 2 * attn + mlp + 3 * norm
  total = cfg.num_encoder_layers * enc_layer + cfg.num_layers * dec_layer + 2 * norm
  if cfg.position == "relative":
    total += 2 * cfg.relative_buckets * h
  if not include_embeddings:
    return total
  total += v * d * (1 if cfg.share_embeddings else 2)
  if not cfg.tie_embeddings:
    total += d * v
  if cfg.position == "learned":
    total += 2 * cfg.max_seq_len * d
  return total
