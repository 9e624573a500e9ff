"""Pooling: one vector per row from final hidden states, for classification heads (issue 9).

x [batch, length, embed]; segment_ids [batch, length] mark real tokens (> 0) and padding (0), and
with no segment_ids the whole row is real. Classification rows hold one example each, left-aligned.

- last: the last real token. In a causal model it is the only position that has seen the whole
  example, so it is the default there (as Hugging Face's *ForSequenceClassification decoders do).
- first: the first real token (BERT's [CLS]); the default for bidirectional models.
- mean: the mean over the real tokens (sentence-transformers' mean pooling); padding contributes
  nothing, so the result does not depend on what the padding positions hold.

model.pooling='auto' resolves to last (causal) or first (bidirectional).
"""
from __future__ import annotations

import jax.numpy as jnp


def _real(x, segment_ids):
  """bool [batch, length]: which positions hold a real token."""
  if segment_ids is None:
    return jnp.ones(x.shape[:2], bool)
  return segment_ids > 0


def _at(x, index):
  return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]


def pool_last(x, segment_ids):
  idx = jnp.arange(x.shape[1], dtype=jnp.int32)
  return _at(x, jnp.max(jnp.where(_real(x, segment_ids), idx, 0), axis=1))


def pool_first(x, segment_ids):
  idx = jnp.arange(x.shape[1], dtype=jnp.int32)
  first = jnp.min(jnp.where(_real(x, segment_ids), idx, x.shape[1] - 1), axis=1)
  return _at(x, first)


def pool_mean(x, segment_ids):
  real = _real(x, segment_ids)[..., None]
  # summed in float32 so a bf16 model's mean does not lose the small per-token contributions
  total = jnp.sum(jnp.where(real, x.astype(jnp.float32), 0.0), axis=1)
  count = jnp.maximum(jnp.sum(real, axis=1).astype(jnp.float32), 1.0)
  return (total / count).astype(x.dtype)


POOLING = {"last": pool_last, "first": pool_first, "mean": pool_mean}
CHOICES = ("auto",) + tuple(POOLING)


def resolve(pooling: str, causal: bool) -> str:
  """The pooling a model config means: 'auto' -> last (causal) or first (bidirectional)."""
  if pooling == "auto":
    return "last" if causal else "first"
  return pooling


def pool_hidden(x, segment_ids, causal: bool, pooling: str = "auto"):
  """One vector [batch, embed] per row of hidden states x [batch, length, embed]."""
  return POOLING[resolve(pooling, causal)](x, segment_ids)
