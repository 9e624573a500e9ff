"""The train state and the pure, jitted train and eval steps.

Nothing here does I/O: `llmjax.loop` drives these functions, checkpoints and logs.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llmjax import sharding as shd


@flax.struct.dataclass
class TrainState:
  """Everything an optimizer step changes. Dropout/masking randomness is derived from
  (seed, step), so the step number is the whole RNG state and resumption is exact."""
  step: jax.Array
  params: Any
  opt_state: Any


def token_loss(logits, targets, weights):
  """Mean cross-entropy over weighted tokens, in float32, plus the weight total."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  total = jnp.sum(weights)
  return jnp.sum(losses * weights) / jnp.maximum(total, 1.0), total


def mask_tokens(rng, inputs, mask_id: int, probability: float):
  """Masked-LM corruption: each token is replaced by [MASK] with `probability`; the loss is taken
  only at masked positions."""
  masked = jax.random.bernoulli(rng, probability, inputs.shape)
  return jnp.where(masked, mask_id, inputs), masked.astype(jnp.float32)


def _model_inputs(batch):
  return dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))


def make_loss_fn(model: nn.Module, objective: str = "causal_lm", mlm_probability: float = 0.15):
  def loss_fn(params, batch, rng, deterministic: bool):
    inputs, targets = batch["inputs"], batch["targets"]
    weights = jnp.ones(targets.shape, jnp.float32)
    if objective == "masked_lm":
      rng, mask_rng = jax.random.split(rng)
      targets = inputs
      inputs, weights = mask_tokens(mask_rng, inputs, model.cfg.vocab_size - 1, mlm_probability)
    logits = model.apply({"params": params}, inputs, deterministic=deterministic,
                         rngs={"dropout": rng}, **_model_inputs(batch))
    loss, count = token_loss(logits, targets, weights)
    return loss, count
  return loss_fn


def make_train_step(model, optimizer, schedule, *, seed: int, grad_accum_steps: int = 1,
                    objective: str = "causal_lm", mlm_probability: float = 0.15) -> Callable:
  """state, batch -> (state, metrics). With accumulation the batch's leading axis is split into
  `grad_accum_steps` micro-batches whose gradients are averaged (a scan keeps memory flat)."""
  loss_fn = make_loss_fn(model, objective, mlm_probability)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    if grad_accum_steps == 1:
      (loss, _), grads = grad_fn(state.params, batch, rng, False)
    else:
      micro = jax.tree.map(
          lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]), batch)

      def accumulate(carry, xs):
        grads_sum, loss_sum = carry
        i, mb = xs
        (loss, _), grads = grad_fn(state.params, mb, jax.random.fold_in(rng, i), False)
        return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, loss), _ = jax.lax.scan(
          accumulate, (zeros, jnp.zeros((), jnp.float32)), (jnp.arange(grad_accum_steps), micro))
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
      loss = loss / grad_accum_steps
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model, *, objective: str = "causal_lm", mlm_probability: float = 0.15,
                   seed: int = 0) -> Callable:
  """params, batch, index -> (summed loss, token count), so batches of any size average exactly."""
  loss_fn = make_loss_fn(model, objective, mlm_probability)

  def eval_step(params, batch, index):
    rng = jax.random.fold_in(jax.random.key(seed + 1), index)
    loss, count = loss_fn(params, batch, rng, True)
    return loss * count, count

  return eval_step


def abstract_state(model, optimizer, example_batch_shape):
  """Shapes, dtypes and logical partitioning of the train state, with no FLOPs and no memory."""
  def init(rng):
    tokens = jnp.zeros(example_batch_shape, jnp.int32)
    params = model.init(rng, tokens)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
  return init, jax.eval_shape(init, jax.random.key(0))


def state_shardings(abstract, mesh, rules):
  """NamedShardings for every leaf of the (boxed) abstract train state."""
  return shd.tree_shardings(abstract, mesh, rules)


def init_state(model, optimizer, mesh, rules, seed: int, example_batch_shape):
  """Initializes the train state directly into its shardings: no device ever holds a full
  unsharded copy of the parameters. Returns (state with plain arrays, shardings)."""
  init, abstract = abstract_state(model, optimizer, example_batch_shape)
  shardings = state_shardings(abstract, mesh, rules)
  with shd.use_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(jax.random.key(seed))
  return state, shardings
