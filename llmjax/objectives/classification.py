"""Sequence classification: cross-entropy over labels from the model's classifier head.

The model (model.num_labels > 0, taken from the training data's labels when 0) pools the final
hidden states as model.pooling says (llmjax/model/pooling.py: by default the last real token for
causal models, the first token for bidirectional ones; or the mean over real tokens) and maps the
pooled vector to label logits. batch: inputs, segment_ids, positions int32 [batch, seq] (segment 0 = padding);
labels int32 [batch]; label_weights float32 [batch] (0 for empty rows that pad the last eval
batch). Validation reports loss, accuracy and macro-F1 (the unweighted mean of per-label F1 over
the labels, as sklearn's f1_score(average="macro")).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from llmjax.objectives.base import BatchField, Objective
from llmjax.objectives.causal_lm import model_inputs


class Classification(Objective):
  data_options = {"classification": True}

  def __init__(self, config, model_config):
    super().__init__(config, model_config)
    self.num_labels = model_config.num_labels
    if not self.num_labels:
      raise ValueError("train.objective=classification needs model.num_labels > 0 (set from the "
                       "training labels when the run starts)")

  def batch_spec(self, config) -> dict[str, BatchField]:
    b, l = config.data.batch_size, config.data.seq_len
    return {"inputs": BatchField((b, l), np.int32), "segment_ids": BatchField((b, l), np.int32),
            "positions": BatchField((b, l), np.int32), "labels": BatchField((b,), np.int32),
            "label_weights": BatchField((b,), np.float32)}

  def _logits(self, model, params, batch, rng, deterministic):
    return model.apply({"params": params}, batch["inputs"], deterministic=deterministic,
                       rngs={"dropout": rng}, **model_inputs(batch))

  def _terms(self, logits, batch):
    labels = jnp.maximum(batch["labels"], 0)
    w = batch["label_weights"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return labels, w, ce, correct

  def loss(self, model, params, batch, rng, deterministic: bool):
    logits = self._logits(model, params, batch, rng, deterministic)
    _, w, ce, correct = self._terms(logits, batch)
    total = jnp.sum(w)
    loss = jnp.sum(ce * w) / jnp.maximum(total, 1.0)
    return loss, {"loss": loss, "weight": total,
                  "accuracy": jnp.sum(correct * w) / jnp.maximum(total, 1.0)}

  def eval_sums(self, model, params, batch, rng) -> dict:
    logits = self._logits(model, params, batch, rng, True)
    labels, w, ce, correct = self._terms(logits, batch)
    pred = jnp.argmax(logits, -1)
    sums = {"loss": jnp.sum(ce * w), "weight": jnp.sum(w), "correct": jnp.sum(correct * w)}
    for k in range(self.num_labels):  # per-label counts for macro-F1 (K is small)
      sums[f"tp_{k}"] = jnp.sum(w * ((pred == k) & (labels == k)))
      sums[f"pred_{k}"] = jnp.sum(w * (pred == k))
      sums[f"true_{k}"] = jnp.sum(w * (labels == k))
    return sums

  def finalize(self, sums: dict) -> dict:
    n = max(sums["weight"], 1.0)
    f1s = []
    for k in range(self.num_labels):
      tp, pred, true = sums[f"tp_{k}"], sums[f"pred_{k}"], sums[f"true_{k}"]
      if pred + true == 0:
        continue  # a label absent from both predictions and references does not count
      f1s.append(2 * tp / (pred + true))
    return {"loss": sums["loss"] / n, "accuracy": sums["correct"] / n,
            "macro_f1": float(np.mean(f1s)) if f1s else 0.0}
