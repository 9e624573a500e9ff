"""Direct preference optimization (Rafailov et al., 2023).

For a pair (prompt x, chosen y_w, rejected y_l), with log-probabilities of the responses under the
policy (pi) and under the frozen reference model (ref):

    margin = beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]
    loss   = -log sigmoid(margin)

averaged over the pairs of the batch. `train.dpo_rpo_alpha` > 0 adds alpha times the chosen
responses' mean per-token negative log-likelihood (RPO, Pang et al. 2024; TRL's `rpo_alpha`):
plain DPO only moves log-probability *ratios*, and can lower the chosen response's likelihood
along with the rejected one's until greedy decoding follows neither; the NLL term keeps the chosen
responses likely. The implicit rewards beta * (log pi - log ref) of each side
are logged: reward margin (chosen minus rejected), preference accuracy (chosen reward > rejected),
and the policy's chosen / rejected log-probabilities.

The reference is the starting model with no second copy of the weights: the run trains LoRA
adapters on a frozen base, and the reference is that base with the adapters switched off
(`adapters=False`). So DPO needs lora.rank > 0 and a starting model (train.init_from); config
validation says so in one line.

batch (llmjax.data.preference): {chosen,rejected}_{inputs,targets,weights} [batch, seq]; the
weights are 1 on response tokens only; a row whose weights are all 0 is padding and counts for
nothing.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from llmjax.objectives.base import BatchField, Objective


def sequence_logps(logits, targets, weights):
  """Sum over positions of weights * log p(target) (float32): a response's log-probability."""
  logp = -optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(logp * weights, axis=-1)


def dpo_terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
  """Per-pair (loss, chosen reward, rejected reward) from the four log-probabilities."""
  chosen_reward = beta * (policy_chosen - ref_chosen)
  rejected_reward = beta * (policy_rejected - ref_rejected)
  loss = -jax.nn.log_sigmoid(chosen_reward - rejected_reward)
  return loss, chosen_reward, rejected_reward


class DPO(Objective):
  data_options = {"preference": True}

  def __init__(self, config, model_config):
    super().__init__(config, model_config)
    self.beta = float(config.train.dpo_beta) if config is not None else 0.1
    self.rpo_alpha = float(config.train.dpo_rpo_alpha) if config is not None else 0.0

  def batch_spec(self, config) -> dict:
    from llmjax.data.preference import batch_fields
    shape = (config.data.batch_size, config.data.seq_len)
    return {k: BatchField(shape, dtype) for k, dtype in batch_fields().items()}

  def _logps(self, model, params, batch, rng, deterministic, adapters: bool):
    """(chosen, rejected) response log-probabilities, both sides in one forward pass."""
    inputs = jnp.concatenate([batch["chosen_inputs"], batch["rejected_inputs"]])
    targets = jnp.concatenate([batch["chosen_targets"], batch["rejected_targets"]])
    weights = jnp.concatenate([batch["chosen_weights"], batch["rejected_weights"]])
    extra = {} if adapters else {"adapters": False}
    logits = model.apply({"params": params}, inputs, deterministic=deterministic,
                         rngs={"dropout": rng}, **extra)
    logps = sequence_logps(logits, targets, weights)
    n = batch["chosen_inputs"].shape[0]
    return logps[:n], logps[n:]

  def _terms(self, model, params, batch, rng, deterministic):
    policy_c, policy_r = self._logps(model, params, batch, rng, deterministic, adapters=True)
    # the reference: the same weights with the adapters off, no gradient through it
    ref_c, ref_r = self._logps(model, jax.lax.stop_gradient(params), batch, rng, True,
                               adapters=False)
    ref_c, ref_r = jax.lax.stop_gradient(ref_c), jax.lax.stop_gradient(ref_r)
    loss, chosen_r, rejected_r = dpo_terms(policy_c, policy_r, ref_c, ref_r, self.beta)
    tokens = jnp.sum(batch["chosen_weights"], axis=-1)
    valid = (tokens > 0).astype(jnp.float32)
    if self.rpo_alpha:
      loss = loss - self.rpo_alpha * policy_c / jnp.maximum(tokens, 1.0)
    return {"loss": loss * valid, "weight": valid,
            "correct": (chosen_r > rejected_r).astype(jnp.float32) * valid,
            "reward_margin": (chosen_r - rejected_r) * valid,
            "reward_chosen": chosen_r * valid, "reward_rejected": rejected_r * valid,
            "logp_chosen": policy_c * valid, "logp_rejected": policy_r * valid}

  def loss(self, model, params, batch, rng, deterministic: bool):
    sums = {k: jnp.sum(v) for k, v in self._terms(model, params, batch, rng, deterministic).items()}
    count = jnp.maximum(sums["weight"], 1.0)
    aux = {k: v / count for k, v in sums.items() if k != "weight"}
    aux["accuracy"] = aux.pop("correct")
    aux["weight"] = sums["weight"]
    return aux["loss"], aux

  def eval_sums(self, model, params, batch, rng) -> dict:
    return {k: jnp.sum(v) for k, v in self._terms(model, params, batch, rng, True).items()}

  def finalize(self, sums: dict) -> dict:
    count = max(float(sums["weight"]), 1.0)
    out = {k: float(v) / count for k, v in sums.items() if k not in ("weight", "correct")}
    out["accuracy"] = float(sums["correct"]) / count
    out["pairs"] = float(sums["weight"])
    return out
