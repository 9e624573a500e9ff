"""Next-token prediction; also supervised fine-tuning (SFT), which is causal LM with per-token loss
weights.

batch: inputs, targets int32 [batch, seq]; optional segment_ids/positions (packing) and weights
float32 [batch, seq] (0 on prompt and padding tokens, 1 on trained ones; data.train_on decides).
Without weights every token counts. `train.z_loss` adds PaLM's log(Z)^2 term to the
differentiated loss only.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from llmjax.objectives.base import Objective
from llmjax.objectives.losses import token_loss, z_loss_term


def model_inputs(batch) -> dict:
  return dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))


class TokenLM(Objective):
  """A token-level LM objective: `prepare` turns the batch into (inputs, targets, weights)."""
  reports_bits_per_byte = True

  def __init__(self, config, model_config):
    super().__init__(config, model_config)
    self.z_loss = float(config.train.z_loss) if config is not None else 0.0

  def prepare(self, batch, rng):
    """-> (inputs, targets, weights, rng left for dropout)."""
    targets = batch["targets"]
    weights = batch.get("weights")
    if weights is None:
      weights = jnp.ones(targets.shape, jnp.float32)
    return batch["inputs"], targets, weights.astype(jnp.float32), rng

  def _forward(self, model, params, batch, rng, deterministic):
    inputs, targets, weights, rng = self.prepare(batch, rng)
    logits = model.apply({"params": params}, inputs, deterministic=deterministic,
                         rngs={"dropout": rng}, **model_inputs(batch))
    return logits, targets, weights

  def loss(self, model, params, batch, rng, deterministic: bool):
    logits, targets, weights = self._forward(model, params, batch, rng, deterministic)
    loss, total = token_loss(logits, targets, weights)
    aux = {"loss": loss, "weight": total}
    if self.z_loss:
      return loss + self.z_loss * z_loss_term(logits, weights), aux
    return loss, aux

  def eval_sums(self, model, params, batch, rng) -> dict:
    logits, targets, weights = self._forward(model, params, batch, rng, True)
    loss, total = token_loss(logits, targets, weights)
    return {"loss": loss * total, "weight": total}

  def finalize(self, sums: dict) -> dict:
    loss = sums["loss"] / max(sums["weight"], 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 80.0))}


class CausalLM(TokenLM):
  name = "causal_lm"
