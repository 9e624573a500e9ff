"""Masked language modelling (bare switch): each input token is replaced by [MASK] (the last id of
the vocabulary) with probability train.mlm_probability and predicted at masked positions only.
Needs a bidirectional model (model.causal=False). Issue 11 replaces it with the BERT recipe.
"""
from __future__ import annotations

import jax

from llmjax.objectives.causal_lm import TokenLM
from llmjax.objectives.losses import mask_tokens


class MaskedLM(TokenLM):
  name = "masked_lm"

  def __init__(self, config, model_config):
    super().__init__(config, model_config)
    self.probability = float(config.train.mlm_probability)

  def prepare(self, batch, rng):
    rng, mask_rng = jax.random.split(rng)
    inputs = batch["inputs"]
    corrupted, weights = mask_tokens(mask_rng, inputs, self.model_config.vocab_size - 1,
                                     self.probability)
    return corrupted, inputs, weights, rng
