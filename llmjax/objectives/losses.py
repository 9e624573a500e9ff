"""Loss building blocks shared by the token-level objectives (all in float32)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def token_loss(logits, targets, weights):
  """Mean cross-entropy over weighted tokens, in float32, plus the weight total."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  total = jnp.sum(weights)
  return jnp.sum(losses * weights) / jnp.maximum(total, 1.0), total


def z_loss_term(logits, weights):
  """PaLM's auxiliary loss mean(log(Z)^2): keeps the softmax normalizer near 1 so bf16/large-vocab
  logits do not drift (and overflow)."""
  log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.square(log_z) * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def mask_tokens(rng, inputs, mask_id: int, probability: float):
  """Masked-LM corruption: each token is replaced by [MASK] with `probability`; the loss is taken
  only at masked positions."""
  masked = jax.random.bernoulli(rng, probability, inputs.shape)
  return jnp.where(masked, mask_id, inputs), masked.astype(jnp.float32)
