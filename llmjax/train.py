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
  (seed, step), so the step number is the whole RNG state and resumption is exact (no key is
  stored). `nonfinite_skipped` counts steps whose update was skipped by the non-finite guard and
  `nonfinite_streak` the current run of consecutive ones; both are checkpointed with the rest."""
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite_skipped: jax.Array = 0  # defaults keep TrainState(step, params, opt_state) valid
  nonfinite_streak: jax.Array = 0

  @classmethod
  def create(cls, step, params, opt_state) -> "TrainState":
    zero = jnp.zeros((), jnp.int32)
    return cls(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state,
               nonfinite_skipped=zero, nonfinite_streak=zero)


class NonFiniteError(RuntimeError):
  """Training stopped by the non-finite guard (train.nonfinite_policy='halt')."""


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


def z_loss_term(logits, weights):
  """PaLM's auxiliary loss mean(log(Z)^2): keeps the softmax normalizer near 1 so bf16/large-vocab
  logits do not drift (and overflow)."""
  log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.square(log_z) * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_loss_fn(model: nn.Module, objective: str = "causal_lm", mlm_probability: float = 0.15,
                 z_loss: float = 0.0):
  """(params, batch, rng, deterministic) -> (loss to differentiate, (cross-entropy, token count)).
  With `z_loss` > 0 the differentiated loss adds z_loss * mean(log Z^2); the reported
  cross-entropy never includes it, so losses stay comparable across runs."""
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
    if z_loss:
      return loss + z_loss * z_loss_term(logits, weights), (loss, count)
    return loss, (loss, count)
  return loss_fn


def poison_gradients(grads, step, steps: tuple[int, ...]):
  """Fault injection for tests (train.inject_nan_grads): NaN gradients on the given 1-based steps.
  Compiled out entirely when `steps` is empty."""
  if not steps:
    return grads
  hit = jnp.any(step + 1 == jnp.asarray(steps, jnp.int32))
  return jax.tree.map(lambda g: jnp.where(hit, jnp.nan, g), grads)


def guarded_update(state, grads, loss, params, opt_state, policy: str, halt_after: int):
  """The non-finite guard, inside the jitted step (no host sync): if the loss or any gradient is
  NaN/Inf, keep the old params and optimizer state (so no NaN can reach a checkpoint) and count
  the step. Under 'halt', once `halt_after` consecutive steps were bad the state stays frozen and
  the loop stops at its next metrics fetch. The global grad norm is non-finite iff some gradient
  is, so one scalar test covers the whole tree. Returns (new state, finite flag)."""
  finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
  ok = finite
  if policy == "halt":
    ok = ok & (state.nonfinite_streak < halt_after)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  bad = (~ok).astype(jnp.int32)
  return TrainState(step=state.step + 1, params=keep(params, state.params),
                    opt_state=keep(opt_state, state.opt_state),
                    nonfinite_skipped=state.nonfinite_skipped + bad,
                    nonfinite_streak=(state.nonfinite_streak + bad) * bad), finite


# -- frozen parameters (LoRA) -------------------------------------------------------------------
# With a `trainable` mask (a tree of bools over the params' dict structure), the step splits the
# params into the trainable part and the frozen rest: gradients are taken with respect to the
# trainable part only (so frozen weights may even be int8: QLoRA), and the optimizer only ever
# sees that part, so frozen weights have no optimizer state at all.
def partition(params, mask):
  """(trainable, frozen): nested dicts sharing the arrays of `params`. Walks dicts only, so a
  non-dict leaf (an array, or an int8 QArray) is taken whole with its mask entry."""
  trainable, frozen = {}, {}
  for key, value in params.items():
    if isinstance(value, dict):
      t, f = partition(value, mask[key])
      if t:
        trainable[key] = t
      if f:
        frozen[key] = f
    elif mask[key]:
      trainable[key] = value
    else:
      frozen[key] = value
  return trainable, frozen


def merge_trees(a, b):
  """The union of two partitions (inverse of `partition`)."""
  out = dict(b)
  for key, value in a.items():
    out[key] = merge_trees(value, out[key]) if isinstance(value, dict) and key in out else value
  return out


def only_trainable(optimizer, mask):
  """`optimizer` whose state covers only the trainable part of the params it is initialized on."""
  return optax.GradientTransformation(lambda params: optimizer.init(partition(params, mask)[0]),
                                      optimizer.update)


def make_train_step(model, optimizer, schedule, *, seed: int, grad_accum_steps: int = 1,
                    objective: str = "causal_lm", mlm_probability: float = 0.15,
                    z_loss: float = 0.0, nonfinite_policy: str = "halt",
                    nonfinite_halt_after: int = 1, inject_nan_grads: tuple[int, ...] = (),
                    trainable=None) -> Callable:
  """state, batch -> (state, metrics). With accumulation the batch's leading axis is split into
  `grad_accum_steps` micro-batches whose gradients are averaged (a scan keeps memory flat).
  Non-finite steps are handled by `guarded_update`. `trainable`: see `partition` (None: all)."""
  loss_fn = make_loss_fn(model, objective, mlm_probability, z_loss)

  def partial_loss(train_params, batch, rng, deterministic, frozen):
    params = train_params if frozen is None else merge_trees(train_params, frozen)
    return loss_fn(params, batch, rng, deterministic)

  inner = _make_step(partial_loss, optimizer, schedule, seed, grad_accum_steps, nonfinite_policy,
                     nonfinite_halt_after, inject_nan_grads)
  if trainable is None:
    return inner

  def train_step(state: TrainState, batch):
    train_params, frozen = partition(state.params, trainable)
    new_state, metrics = inner(state.replace(params=train_params), batch, frozen=frozen)
    return new_state.replace(params=merge_trees(new_state.params, frozen)), metrics

  return train_step


def _make_step(loss_fn, optimizer, schedule, seed, grad_accum_steps, nonfinite_policy,
               nonfinite_halt_after, inject_nan_grads):
  """The step over `state.params` (the trainable part, when `frozen` holds the rest)."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch, frozen=None):
    grad_fn_ = lambda p, b, r, d: grad_fn(p, b, r, d, frozen)  # noqa: E731
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    if grad_accum_steps == 1:
      (_, (loss, _)), grads = grad_fn_(state.params, batch, rng, False)
    else:
      micro = jax.tree.map(
          lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]), batch)

      def accumulate(carry, xs):
        grads_sum, loss_sum = carry
        i, mb = xs
        (_, (loss, _)), grads = grad_fn_(state.params, mb, jax.random.fold_in(rng, i), False)
        return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, loss), _ = jax.lax.scan(
          accumulate, (zeros, jnp.zeros((), jnp.float32)), (jnp.arange(grad_accum_steps), micro))
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
      loss = loss / grad_accum_steps
    grads = poison_gradients(grads, state.step, tuple(inject_nan_grads))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state, _ = guarded_update(state, grads, loss, params, opt_state, nonfinite_policy,
                                  nonfinite_halt_after)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step),
               "nonfinite_skipped": new_state.nonfinite_skipped,
               "nonfinite_streak": new_state.nonfinite_streak}
    return new_state, metrics

  return train_step


def make_eval_step(model, *, objective: str = "causal_lm", mlm_probability: float = 0.15,
                   seed: int = 0) -> Callable:
  """params, batch, index -> (summed loss, token count), so batches of any size average exactly."""
  loss_fn = make_loss_fn(model, objective, mlm_probability)

  def eval_step(params, batch, index):
    rng = jax.random.fold_in(jax.random.key(seed + 1), index)
    _, (loss, count) = loss_fn(params, batch, rng, True)
    return loss * count, count

  return eval_step


def abstract_state(model, optimizer, example_batch_shape):
  """Shapes, dtypes and logical partitioning of the train state, with no FLOPs and no memory."""
  def init(rng):
    tokens = jnp.zeros(example_batch_shape, jnp.int32)
    params = model.init(rng, tokens)["params"]
    return TrainState.create(0, params, optimizer.init(params))
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
