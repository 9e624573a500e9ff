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
from llmjax import dp_grads


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


# The loss building blocks live with the objectives; re-exported for existing callers.
from llmjax.objectives.losses import mask_tokens, token_loss, z_loss_term  # noqa: E402,F401


def default_objective(model, z_loss: float = 0.0):
  """Plain causal LM (with optional z-loss) for callers that build steps without a config."""
  from llmjax.objectives.causal_lm import CausalLM
  objective = CausalLM(None, model.cfg)
  objective.z_loss = float(z_loss)
  return objective


def make_loss_fn(model: nn.Module, objective=None, z_loss: float = 0.0):
  """(params, batch, rng, deterministic) -> (loss to differentiate, (reported loss, weight)) for
  `objective` (default: causal LM with `z_loss`). Kept for tests and benchmarks that time the
  forward/backward alone; the steps below call the objective directly."""
  objective = objective if objective is not None else default_objective(model, z_loss)

  def loss_fn(params, batch, rng, deterministic: bool):
    loss, aux = objective.loss(model, params, batch, rng, deterministic)
    return loss, (aux["loss"], aux["weight"])
  return loss_fn


# -- frozen parameters (LoRA) -------------------------------------------------------------------
# With a `trainable` mask (a tree of bools over the params' dict structure), the step splits the
# params into the trainable part and the frozen rest: gradients are taken with respect to the
# trainable part only (so frozen weights may even be int8: QLoRA, which jax cannot differentiate),
# and the optimizer only ever sees that part, so frozen weights have no optimizer state at all.
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
  """`optimizer` whose state covers only the trainable part of the params it is initialized on
  (its update then takes that part's gradients and params)."""
  return optax.GradientTransformation(lambda params: optimizer.init(partition(params, mask)[0]),
                                      optimizer.update)


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


def make_train_step(model, optimizer, schedule, objective=None, *, seed: int,
                    grad_accum_steps: int = 1, nonfinite_policy: str = "halt",
                    nonfinite_halt_after: int = 1, inject_nan_grads: tuple[int, ...] = (),
                    trainable=None, flat_allreduce_mesh=None) -> Callable:
  """state, batch -> (state, metrics) for `objective` (an llmjax.objectives.Objective; default
  plain causal LM). With accumulation the batch's leading axis is split into `grad_accum_steps`
  micro-batches whose gradients (and reported losses) are averaged (a scan keeps memory flat).
  `trainable`: a pytree of bools (objective.trainable) or None for all; only the trainable part
  is differentiated and updated (see `partition`; the optimizer must be `only_trainable`).
  `flat_allreduce_mesh`: a CPU data-parallel mesh whose gradients then cross devices as one flat
  vector (llmjax/dp_grads.py, issue 12); None: plain SPMD.
  Non-finite steps are handled by `guarded_update`. Metrics: loss, grad_norm, lr, the
  guard's counters, and every extra aux entry of the objective (not aux["weight"])."""
  objective = objective if objective is not None else default_objective(model)

  def loss_fn(params, batch, rng, frozen):
    full = params if frozen is None else merge_trees(params, frozen)
    return objective.loss(model, full, batch, rng, False)

  value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch):
    frozen = None
    if trainable is not None:  # from here on, state.params is the trainable part only
      train_params, frozen = partition(state.params, trainable)
      state = state.replace(params=train_params)
    grad_fn = lambda p, b, r: value_and_grad(p, b, r, frozen)  # noqa: E731
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    if flat_allreduce_mesh is not None:  # issue 12: one flat all-reduce (llmjax/dp_grads.py)
      aux, grads = dp_grads.make(value_and_grad, flat_allreduce_mesh, grad_accum_steps)(
          state.params, batch, rng, frozen)
    elif grad_accum_steps == 1:
      (_, aux), grads = grad_fn(state.params, batch, rng)
    else:
      micro = dp_grads.micro_batches(batch, grad_accum_steps)  # strided rows (see there)

      def accumulate(carry, xs):
        grads_sum, aux_sum = carry
        i, mb = xs
        (_, aux), grads = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, grads_sum, grads), jax.tree.map(jnp.add, aux_sum, aux)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      _, aux_shape = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro), rng)[0]
      aux_zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape)
      (grads, aux), _ = jax.lax.scan(
          accumulate, (zeros, aux_zeros), (jnp.arange(grad_accum_steps), micro))
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
      aux = {k: v if k == "weight" else v / grad_accum_steps for k, v in aux.items()}
    loss = aux["loss"]
    grads = poison_gradients(grads, state.step, tuple(inject_nan_grads))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state, _ = guarded_update(state, grads, loss, params, opt_state, nonfinite_policy,
                                  nonfinite_halt_after)
    metrics = {k: v for k, v in aux.items() if k != "weight"}
    metrics.update({"loss": loss, "grad_norm": optax.global_norm(grads),
                    "lr": schedule(state.step),
                    "nonfinite_skipped": new_state.nonfinite_skipped,
                    "nonfinite_streak": new_state.nonfinite_streak})
    if frozen is not None:
      new_state = new_state.replace(params=merge_trees(new_state.params, frozen))
    return new_state, metrics

  return train_step


def make_eval_step(model, objective=None, *, seed: int = 0) -> Callable:
  """params, batch, index -> the objective's eval_sums (a dict of SUMS over the batch), so
  batches of any size average exactly (`objective.finalize` on the host)."""
  objective = objective if objective is not None else default_objective(model)

  def eval_step(params, batch, index):
    rng = jax.random.fold_in(jax.random.key(seed + 1), index)
    return objective.eval_sums(model, params, batch, rng)

  return eval_step


def abstract_state(model, optimizer, init_inputs):
  """Shapes, dtypes and logical partitioning of the train state, with no FLOPs and no memory.
  init_inputs: the objective's `init_inputs(...)` kwargs (or an int32 token batch shape)."""
  if not isinstance(init_inputs, dict):
    init_inputs = {"tokens": jnp.zeros(tuple(init_inputs), jnp.int32)}

  def init(rng):
    params = model.init(rng, **init_inputs)["params"]
    return TrainState.create(0, params, optimizer.init(params))
  return init, jax.eval_shape(init, jax.random.key(0))


def state_shardings(abstract, mesh, rules):
  """NamedShardings for every leaf of the (boxed) abstract train state."""
  return shd.tree_shardings(abstract, mesh, rules)


def init_state(model, optimizer, mesh, rules, seed: int, init_inputs):
  """Initializes the train state directly into its shardings: no device ever holds a full
  unsharded copy of the parameters. Returns (state with plain arrays, shardings)."""
  init, abstract = abstract_state(model, optimizer, init_inputs)
  shardings = state_shardings(abstract, mesh, rules)
  with shd.use_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(jax.random.key(seed))
  return state, shardings
