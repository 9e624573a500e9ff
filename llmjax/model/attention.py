"""Multi-head / grouped-query / multi-query self-attention with an optional KV cache.

The score computation goes through `jax.nn.dot_product_attention`, so GPUs get cuDNN's fused
(flash) kernel when the compute dtype allows it, and CPUs and TPUs get XLA's fused softmax.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.model.bf16_attention import bf16_attention
from llmjax.model.config import TransformerConfig
from llmjax.model.layers import DenseGeneral, apply_rotary, constrain, relative_bias


# Logical axes of one layer's KV cache. Heads come before length so that the score and value
# matmuls read the cache as it lies ([batch, heads] batch dims, then length x head_dim); with
# length first, XLA transposes (copies) the whole cache of every layer on every decode step.
CACHE_AXES = ("batch", "kv_heads", "length", "kv")


def score_scale(cfg: TransformerConfig) -> float:
  """1/sqrt(head_dim), or 1 for T5 (whose initialization folds the scale into the query weights)."""
  return cfg.dim_per_head ** -0.5 if cfg.scale_attention else 1.0


def attention_implementation(cfg: TransformerConfig) -> str | None:
  """'cudnn' only where it can run (a GPU and a 16-bit compute dtype); None lets JAX choose."""
  if cfg.attention_impl != "auto":
    return cfg.attention_impl
  if jax.default_backend() == "gpu" and cfg.dtype in ("bfloat16", "float16"):
    return "cudnn"
  return "xla"


def uses_bf16_attention(cfg: TransformerConfig) -> bool:
  """Whether training-time self-attention (no padding mask or score bias) runs as
  llmjax.model.bf16_attention: bf16 matmuls were asked for (model.matmul_dtype) and the
  attention takes XLA's path (not cuDNN's fused kernel, which has its own precision)."""
  return cfg.matmul_dtype == "bfloat16" and attention_implementation(cfg) == "xla"


def _bf16_self_attention(cfg: TransformerConfig, q, k, v):
  """q: [batch, length, heads, head_dim], k and v with kv_heads; same layout out."""
  groups = cfg.num_heads // cfg.kv_heads
  if groups > 1:  # grouped-query: each key/value head serves `groups` query heads
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  out = bf16_attention(_swap_length_heads(q), _swap_length_heads(k), _swap_length_heads(v),
                       score_scale(cfg), cfg.causal)
  return _swap_length_heads(out)


def _swap_length_heads(x):
  """[b, t, h, d] <-> [b, h, t, d] as a copy. Written through a unit axis because XLA folds a
  plain transpose into the batched dots that read it, and XLA:CPU then runs them with float32
  operands (see layers.materialized_transpose)."""
  b, t, h, d = x.shape
  return x.reshape(b, t, h, d, 1).transpose(0, 2, 4, 1, 3).reshape(b, h, t, d)


class Attention(nn.Module):
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x, positions, segment_ids=None, deterministic: bool = True,
               decode: bool = False, relative_table=None):
    """x: [batch, length, embed]; positions: [batch, length] absolute positions.

    relative_table ([buckets, heads], position='relative'): T5's learned bias on the scores by
    bucketed key-minus-query distance (bidirectional unless the model is causal). It belongs to
    the stack (shared by all its layers), so it comes in as an argument.

    decode=True reads and writes the 'cache' collection: keys and values of the new tokens are
    written at their absolute positions (per example, so prompts of different lengths work) and the
    queries attend to every cached slot at a position not after their own.
    """
    cfg = self.cfg
    h, kv, hd = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    q = DenseGeneral(cfg, (h, hd), ("embed", "heads", "kv"), use_bias=cfg.use_bias, name="query")(x)
    k = DenseGeneral(cfg, (kv, hd), ("embed", "kv_heads", "kv"), use_bias=cfg.use_bias, name="key")(x)
    v = DenseGeneral(cfg, (kv, hd), ("embed", "kv_heads", "kv"), use_bias=cfg.use_bias, name="value")(x)
    if cfg.position == "rotary":
      q = apply_rotary(q, positions, cfg.rope_theta, cfg.rope_scaling_params)
      k = apply_rotary(k, positions, cfg.rope_theta, cfg.rope_scaling_params)
    q = constrain(q, ("batch", "length", "heads", "kv"))
    k = constrain(k, ("batch", "length", "kv_heads", "kv"))
    v = constrain(v, ("batch", "length", "kv_heads", "kv"))

    if decode:
      out = self._cached_attention(q, k, v, positions, relative_table)
    else:
      mask = None
      if segment_ids is not None:
        # Packed documents: a token attends only within its own document.
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None, :, :]
      bias = None
      if relative_table is not None:
        bias = relative_bias(relative_table, positions, positions, not cfg.causal,
                             cfg.relative_max_distance).astype(q.dtype)
      if mask is None and bias is None and uses_bf16_attention(cfg):
        out = _bf16_self_attention(cfg, q, k, v)
      else:
        out = jax.nn.dot_product_attention(
            q, k, v, bias=bias, mask=mask, is_causal=cfg.causal, scale=score_scale(cfg),
            implementation=attention_implementation(cfg))
    out = constrain(out, ("batch", "length", "heads", "kv"))
    y = DenseGeneral(cfg, (cfg.embed_dim,), ("heads", "kv", "embed"), in_axes=2,
                     use_bias=cfg.use_bias, std=out_std, name="out")(out)
    return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)

  def _cached_attention(self, q, k, v, positions, relative_table=None):
    """Writes this call's keys/values into the per-layer cache and attends over it.

    The cache holds kv_heads (not heads) per slot, so grouped-query and multi-query models store
    each shared head once and serves its group of query heads from there.
    Its length is whatever the caller allocated (see llmjax.generate.init_cache): any length that
    covers the positions in use gives the same result, so a short generation reads a short cache.
    """
    cfg = self.cfg
    if not cfg.causal:
      raise ValueError("KV-cached decoding needs a causal model (model.causal=True).")
    batch, q_len = q.shape[:2]
    shape = (batch, cfg.kv_heads, cfg.max_seq_len, cfg.dim_per_head)
    cached_k = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
    if self.is_initializing():
      # Only shape the cache; nothing to attend to yet.
      return jnp.zeros_like(q)
    # Each example writes at its own absolute start position (prompts of different lengths).
    start = positions[:, 0]
    write = jax.vmap(lambda cache, new, s: jax.lax.dynamic_update_slice(cache, new, (0, s, 0)))
    k = k.astype(cached_k.value.dtype).transpose(0, 2, 1, 3)   # [batch, kv_heads, q_len, kv]
    v = v.astype(cached_v.value.dtype).transpose(0, 2, 1, 3)
    keys = constrain(write(cached_k.value, k, start), CACHE_AXES)
    values = constrain(write(cached_v.value, v, start), CACHE_AXES)
    cached_k.value, cached_v.value = keys, values
    # A query at absolute position p sees the slots 0..p: its own prompt and what it generated.
    # Slots past p may hold stale or padding entries; they are masked out.
    slots = jnp.arange(keys.shape[2])
    mask = slots[None, None, :] <= positions[:, :, None]          # [batch, q_len, cache_len]
    # Grouped-query attention: each of the kv_heads serves `groups` query heads.
    groups = cfg.num_heads // cfg.kv_heads
    q = q.reshape(batch, q_len, cfg.kv_heads, groups, cfg.dim_per_head)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, keys.astype(q.dtype),
                        preferred_element_type=jnp.float32) * score_scale(cfg)
    if relative_table is not None:
      bias = relative_bias(relative_table, positions, slots[None], False, cfg.relative_max_distance)
      scores = scores + bias.reshape(batch, cfg.kv_heads, groups, q_len, -1).astype(jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, values.astype(q.dtype))
    return out.reshape(batch, q_len, cfg.num_heads, cfg.dim_per_head)


class CrossAttention(nn.Module):
  """The decoder's attention over the encoder output: queries from the decoder, keys and values
  from the encoded source, no causal mask and no positions.

  With decode=True the keys and values live in the 'cache' collection ("cross_key",
  "cross_value", [batch, kv_heads, source length, head_dim]): the call that passes `encoded`
  (prefill) computes and stores them once per request; later calls pass encoded=None and read
  them, so a decoding step never touches the encoder output again.
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x, encoded, mask, deterministic: bool = True, decode: bool = False):
    """x: [batch, q_len, embed]; encoded: [batch, src_len, embed] or None (decode steps);
    mask: bool [batch, q_len, src_len] (True: may attend) or None."""
    cfg = self.cfg
    h, kv, hd = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    q = DenseGeneral(cfg, (h, hd), ("embed", "heads", "kv"), use_bias=cfg.use_bias, name="query")(x)
    q = constrain(q, ("batch", "length", "heads", "kv"))
    key_layer = DenseGeneral(cfg, (kv, hd), ("embed", "kv_heads", "kv"), use_bias=cfg.use_bias,
                             name="key")
    value_layer = DenseGeneral(cfg, (kv, hd), ("embed", "kv_heads", "kv"), use_bias=cfg.use_bias,
                               name="value")
    if encoded is not None:
      k = constrain(key_layer(encoded), ("batch", "length", "kv_heads", "kv"))
      v = constrain(value_layer(encoded), ("batch", "length", "kv_heads", "kv"))
    if decode:
      if encoded is not None:  # prefill: project the source once and keep it
        k_t, v_t = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        cached_k = self.variable("cache", "cross_key", lambda: k_t)
        cached_v = self.variable("cache", "cross_value", lambda: v_t)
        cached_k.value, cached_v.value = k_t, v_t
      else:
        cached_k = self.variable("cache", "cross_key", lambda: None)
        cached_v = self.variable("cache", "cross_value", lambda: None)
        if cached_k.value is None:
          raise ValueError("cross-attention decoding needs the prefill call (with the encoder "
                           "output) before the decode steps")
      keys = constrain(cached_k.value, CACHE_AXES)
      values = constrain(cached_v.value, CACHE_AXES)
      batch, q_len = q.shape[:2]
      groups = h // kv
      qg = q.reshape(batch, q_len, kv, groups, hd)
      scores = jnp.einsum("btkgd,bksd->bkgts", qg, keys.astype(q.dtype),
                          preferred_element_type=jnp.float32) * score_scale(cfg)
      if mask is not None:
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
      out = jnp.einsum("bkgts,bksd->btkgd", probs, values.astype(q.dtype))
      out = out.reshape(batch, q_len, h, hd)
    else:
      out = jax.nn.dot_product_attention(
          q, k, v, mask=None if mask is None else mask[:, None], scale=score_scale(cfg),
          implementation=attention_implementation(cfg))
    out = constrain(out, ("batch", "length", "heads", "kv"))
    y = DenseGeneral(cfg, (cfg.embed_dim,), ("heads", "kv", "embed"), in_axes=2,
                     use_bias=cfg.use_bias, std=out_std, name="out")(out)
    return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
