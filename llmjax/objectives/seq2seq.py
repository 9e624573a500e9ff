"""Teacher-forced sequence-to-sequence loss for encoder-decoders (family 'encoder_decoder').

batch (llmjax/data/seq2seq.py): the source side (encoder_inputs, encoder_segment_ids,
encoder_positions [batch, source_len]) and the target side (inputs = decoder start + target[:-1],
targets, weights, segment_ids, positions [batch, seq_len]). The loss is cross-entropy on the
target tokens only (weights: 0 on padding); packed pairs stay apart through the segment ids on
both sides. Validation reports loss, perplexity and next-token accuracy on the targets.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from llmjax.objectives.base import BatchField, Objective
from llmjax.objectives.losses import token_loss


class Seq2Seq(Objective):
  name = "seq2seq"
  families = ("encoder_decoder",)   # the model families this objective trains

  @classmethod
  def load_dataset(cls, config, tokenizer=None, **options):
    """The run's batches: {"source", "target"} pairs from data.path."""
    from llmjax.data.seq2seq import load_seq2seq_dataset
    return load_seq2seq_dataset(config, tokenizer, start_id=int(config.model.decoder_start_id))

  def batch_spec(self, config) -> dict[str, BatchField]:
    from llmjax.data.seq2seq import batch_fields
    b = config.data.batch_size
    return {k: BatchField((b, length), dtype) for k, (length, dtype) in batch_fields(config.data).items()}

  def init_inputs(self, micro_batch_shape) -> dict:
    from llmjax.data.seq2seq import source_len
    batch, length = micro_batch_shape
    return {"encoder_tokens": jnp.zeros((batch, source_len(self.config.data)), jnp.int32),
            "decoder_tokens": jnp.zeros((batch, length), jnp.int32)}

  def _forward(self, model, params, batch, rng, deterministic):
    logits = model.apply(
        {"params": params}, batch["encoder_inputs"], batch["inputs"],
        encoder_positions=batch["encoder_positions"], decoder_positions=batch["positions"],
        encoder_segment_ids=batch["encoder_segment_ids"], decoder_segment_ids=batch["segment_ids"],
        deterministic=deterministic, rngs={"dropout": rng})
    return logits, batch["targets"], batch["weights"].astype(jnp.float32)

  def loss(self, model, params, batch, rng, deterministic: bool):
    logits, targets, weights = self._forward(model, params, batch, rng, deterministic)
    loss, total = token_loss(logits, targets, weights)
    return loss, {"loss": loss, "weight": total}

  def eval_sums(self, model, params, batch, rng) -> dict:
    logits, targets, weights = self._forward(model, params, batch, rng, True)
    loss, total = token_loss(logits, targets, weights)
    correct = jnp.sum((jnp.argmax(logits, -1) == targets) * weights)
    return {"loss": loss * total, "weight": total, "correct": correct}

  def finalize(self, sums: dict) -> dict:
    weight = max(sums["weight"], 1.0)
    loss = sums["loss"] / weight
    return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)),
            "accuracy": sums["correct"] / weight}
