"""Masked language modelling, the BERT recipe (optionally with next-sentence prediction).

The corruption happens in the data layer (llmjax/data/mlm.py: 15% selected, 80/10/10, special and
padding tokens never selected, optional whole-word masking, NSP pairs), so a batch is a pure
function of (seed, split, step) and validation always scores the same masks. This objective reads

    inputs (corrupted), targets (original ids), weights (1 at selected tokens) int32/float32
    [batch, seq]; token_types, segment_ids int32 [batch, seq]; nsp_labels int32 [batch] (NSP)

and differentiates the masked-token cross-entropy (+ the NSP cross-entropy). It reports the MLM
loss (aux["loss"]), MLM accuracy and, with NSP, the NSP loss and accuracy; validation reports the
same from exact sums. Needs a bidirectional model (model.family='encoder', or model.causal=False);
NSP needs an encoder with model.pooler and model.nsp_head.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from llmjax.objectives.base import BatchField, Objective
from llmjax.objectives.losses import token_loss


class MaskedLM(Objective):
  name = "masked_lm"
  reports_bits_per_byte = False  # the loss is over selected tokens only: not a compression rate

  def __init__(self, config, model_config):
    super().__init__(config, model_config)
    self.nsp = bool(config.train.mlm_nsp) if config is not None else False

  def batch_spec(self, config) -> dict:
    b, t = config.data.batch_size, config.data.seq_len
    spec = {k: BatchField((b, t), jnp.int32)
            for k in ("inputs", "targets", "token_types", "segment_ids")}
    spec["weights"] = BatchField((b, t), jnp.float32)
    if self.nsp:
      spec["nsp_labels"] = BatchField((b,), jnp.int32)
    return spec

  def wrap_dataset(self, dataset):
    """The token dataset the data layer built -> masked-LM rows (llmjax.data.mlm)."""
    from llmjax.data.mlm import MaskedLMDataset
    return MaskedLMDataset.from_token_dataset(dataset, self.config.train)

  def _forward(self, model, params, batch, rng, deterministic):
    kwargs = dict(segment_ids=batch.get("segment_ids"), deterministic=deterministic,
                  rngs={"dropout": rng})
    if model.cfg.family == "encoder":
      kwargs["token_types"] = batch.get("token_types")
    if self.nsp:
      return model.apply({"params": params}, batch["inputs"], return_nsp=True, **kwargs)
    return model.apply({"params": params}, batch["inputs"], **kwargs), None

  def _terms(self, model, params, batch, rng, deterministic):
    logits, nsp_logits = self._forward(model, params, batch, rng, deterministic)
    targets, weights = batch["targets"], batch["weights"].astype(jnp.float32)
    loss, weight = token_loss(logits, targets, weights)
    correct = jnp.sum((jnp.argmax(logits, -1) == targets) * weights)
    terms = {"loss": loss, "weight": weight, "correct": correct}
    if nsp_logits is not None:
      labels = batch["nsp_labels"]
      terms["nsp_loss"] = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          nsp_logits.astype(jnp.float32), labels))
      terms["nsp_correct"] = jnp.sum(jnp.argmax(nsp_logits, -1) == labels).astype(jnp.float32)
      terms["nsp_count"] = jnp.asarray(labels.shape[0], jnp.float32)
    return terms

  def loss(self, model, params, batch, rng, deterministic: bool):
    terms = self._terms(model, params, batch, rng, deterministic)
    aux = {"loss": terms["loss"], "weight": terms["weight"],
           "mlm_accuracy": terms["correct"] / jnp.maximum(terms["weight"], 1.0)}
    total = terms["loss"]
    if self.nsp:
      total = total + terms["nsp_loss"]
      aux.update(nsp_loss=terms["nsp_loss"], nsp_accuracy=terms["nsp_correct"] / terms["nsp_count"])
    return total, aux

  def eval_sums(self, model, params, batch, rng) -> dict:
    terms = self._terms(model, params, batch, rng, True)
    sums = {"loss": terms["loss"] * terms["weight"], "weight": terms["weight"],
            "correct": terms["correct"]}
    if self.nsp:
      sums.update(nsp_loss=terms["nsp_loss"] * terms["nsp_count"],
                  nsp_correct=terms["nsp_correct"], nsp_count=terms["nsp_count"])
    return sums

  def finalize(self, sums: dict) -> dict:
    weight = max(sums["weight"], 1.0)
    loss = sums["loss"] / weight
    out = {"loss": loss, "perplexity": math.exp(min(loss, 80.0)),
           "mlm_accuracy": sums["correct"] / weight}
    if "nsp_count" in sums:
      count = max(sums["nsp_count"], 1.0)
      out.update(nsp_loss=sums["nsp_loss"] / count, nsp_accuracy=sums["nsp_correct"] / count)
    return out
