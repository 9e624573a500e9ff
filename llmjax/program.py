"""What a config compiles to on a mesh: model, optimizer, sharded state layout and jitted steps.

Training (`llmjax.loop`), the memory planner (`llmjax.plan`), loading a run for inference
(`llmjax.runs`) and the SPMD equivalence tests all build their program here, so the step that is
planned and tested across meshes is the very step that trains.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax

from llmjax import adapters
from llmjax import dp_grads
from llmjax import config as cfglib
from llmjax import objectives as objlib
from llmjax import sharding as shd
from llmjax import train as trainlib
from llmjax.model import TransformerConfig, build_model
from llmjax.model.lora import split as lora_split
from llmjax.optim import make_optimizer


@dataclasses.dataclass
class Program:
  config: Any                  # the run's ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  rules: tuple                 # logical axis name -> mesh axes
  model_config: TransformerConfig
  model: Any                   # the linen module llmjax.model.build_model made
  objective: objlib.Objective  # what the steps optimize/evaluate (train.objective)
  optimizer: Any
  schedule: Callable
  state_shardings: Any         # a TrainState of NamedShardings
  abstract_state: Any          # a TrainState of ShapeDtypeStructs that carry those shardings
  batch_sharding: Any          # {name: NamedSharding} for every array of objective.batch_spec
  train_step: Callable         # jitted (state, batch) -> (state, metrics); donates the state
  eval_step: Callable          # jitted (params, batch, index) -> objective.eval_sums (sums)
  init_fn: Callable            # rng -> boxed TrainState (see `init` for the sharded one)
  lora: Any = None             # the LoraSpec of a LoRA run (llmjax.adapters), else None
  trainable: Any = None        # tree of bools: what the optimizer trains (None: everything)

  @property
  def base_dtype(self) -> str:
    return self.config.lora.base_dtype if self.lora is not None else "float32"

  @contextlib.contextmanager
  def scope(self):
    """The mesh and logical axis rules that tracing the model under this program needs."""
    with shd.use_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def init(self, rng) -> trainlib.TrainState:
    """A freshly initialized state, created already sharded (never whole on one device)."""
    with self.scope():
      if self.base_dtype != "float32":  # QLoRA from a random base: initialize, then quantize
        state = jax.jit(lambda r: nn.meta.unbox(self.init_fn(r)))(rng)
        return self.state_from_params(state.params)
      return jax.jit(lambda r: nn.meta.unbox(self.init_fn(r)), out_shardings=self.state_shardings)(rng)

  def state_from_params(self, params) -> trainlib.TrainState:
    """Step 0 with these weights and a fresh optimizer state (init_from, fine-tuning). A LoRA
    program takes either full params or base params without adapters (fresh ones are added)."""
    if self.lora is not None:
      adapter, _ = lora_split(params)
      if not adapter:
        micro = self.config.data.batch_size // self.config.train.grad_accum_steps
        shardings = lora_split(adapters.float_shardings(self.abstract_state.params))[0]
        with self.scope():
          adapter = adapters.fresh_adapter(
              self.model, self.objective.init_inputs((micro, self.config.data.seq_len)),
              jax.random.key(self.config.train.seed), shardings)
      params = adapters.attach_base(params, adapter, self.abstract_state.params, self.base_dtype)
    params = jax.device_put(params, self.state_shardings.params)
    with self.scope():
      fresh = jax.jit(lambda p: trainlib.TrainState.create(0, p, self.optimizer.init(p)),
                      out_shardings=self.state_shardings)
      return fresh(params)

  def abstract_batch(self) -> dict:
    """The global batch's shapes, dtypes and sharding (objective.batch_spec), for compiling
    ahead of time."""
    spec = self.objective.batch_spec(self.config)
    return {k: jax.ShapeDtypeStruct(f.shape, f.dtype, sharding=self.batch_sharding[k])
            for k, f in spec.items()}


def build(config, mesh, model_config: TransformerConfig) -> Program:
  """The program for `config` (its optim, train and mesh-rule fields) and `model_config` on `mesh`.

  Nothing is compiled or allocated here: the state layout comes from `jax.eval_shape`, and the
  steps compile on their first call (or through `.lower(...).compile()`)."""
  t = config.train
  model, spec = adapters.wrap(build_model(model_config), config, model_config)
  objective = objlib.build(config, model_config)
  rules = shd.logical_rules(config)
  micro_batch = config.data.batch_size // t.grad_accum_steps
  init_inputs = objective.init_inputs((micro_batch, config.data.seq_len))
  optimizer, schedule = make_optimizer(config.optim, t.steps)
  if spec is not None:  # LoRA+: B at lora.lr_ratio times the learning rate
    optimizer = adapters.lora_plus(optimizer, config.lora.lr_ratio)
  trainable = _trainable_mask(model, objective, init_inputs, spec)
  if trainable is not None:
    # frozen leaves: no gradient and no optimizer state (see train.partition)
    optimizer = trainlib.only_trainable(optimizer, trainable)
  init_fn, boxed = trainlib.abstract_state(model, optimizer, init_inputs)
  state_shardings = trainlib.state_shardings(boxed, mesh, rules)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                nn.meta.unbox(boxed), state_shardings)
  if spec is not None and config.lora.base_dtype != "float32":  # QLoRA: the frozen base is int8
    abstract_state = abstract_state.replace(
        params=adapters.quantized_abstract(abstract_state.params, config.lora.base_dtype))
    state_shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
  batch_sharding = {k: shd.batch_sharding(mesh, len(f.shape))
                    for k, f in objective.batch_spec(config).items()}
  replicated = shd.replicated(mesh)
  train_step = trainlib.make_train_step(
      model, optimizer, schedule, objective, seed=t.seed, grad_accum_steps=t.grad_accum_steps,
      nonfinite_policy=t.nonfinite_policy, nonfinite_halt_after=t.nonfinite_halt_after,
      inject_nan_grads=cfglib.parse_steps(t.inject_nan_grads), trainable=trainable,
      flat_allreduce_mesh=mesh if dp_grads.applies(mesh) else None)  # issue 12
  eval_step = trainlib.make_eval_step(model, objective, seed=t.seed)
  return Program(
      config=config, mesh=mesh, rules=rules, model_config=model_config, model=model,
      objective=objective, optimizer=optimizer, schedule=schedule,
      state_shardings=state_shardings, abstract_state=abstract_state,
      batch_sharding=batch_sharding,
      train_step=jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, replicated), donate_argnums=0),
      eval_step=jax.jit(eval_step, in_shardings=(state_shardings.params, batch_sharding, None),
                        out_shardings=replicated),
      init_fn=init_fn, lora=spec, trainable=trainable)


def _trainable_mask(model, objective, init_inputs, spec=None):
  """objective.trainable over the (abstract) params (and with LoRA, only the adapters and a new
  task head), or None when everything trains."""
  shapes = jax.eval_shape(lambda r: nn.meta.unbox(model.init(r, **init_inputs)["params"]),
                          jax.random.key(0))
  mask = objective.trainable(shapes)
  if spec is not None:
    mask = jax.tree.map(lambda a, b: bool(a) and bool(b), mask, adapters.trainable_mask(shapes))
  return None if objlib.all_trainable(mask) else mask
