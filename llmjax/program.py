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
import jax.numpy as jnp

from llmjax import config as cfglib
from llmjax import sharding as shd
from llmjax import train as trainlib
from llmjax.model import Transformer, TransformerConfig, build_model
from llmjax.optim import make_optimizer


@dataclasses.dataclass
class Program:
  config: Any                  # the run's ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  rules: tuple                 # logical axis name -> mesh axes
  model_config: TransformerConfig
  model: Transformer
  optimizer: Any
  schedule: Callable
  state_shardings: Any         # a TrainState of NamedShardings
  abstract_state: Any          # a TrainState of ShapeDtypeStructs that carry those shardings
  batch_sharding: Any
  train_step: Callable         # jitted (state, batch) -> (state, metrics); donates the state
  eval_step: Callable          # jitted (params, batch, index) -> (summed loss, token count)
  init_fn: Callable            # rng -> boxed TrainState (see `init` for the sharded one)

  @contextlib.contextmanager
  def scope(self):
    """The mesh and logical axis rules that tracing the model under this program needs."""
    with shd.use_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def init(self, rng) -> trainlib.TrainState:
    """A freshly initialized state, created already sharded (never whole on one device)."""
    with self.scope():
      return jax.jit(lambda r: nn.meta.unbox(self.init_fn(r)), out_shardings=self.state_shardings)(rng)

  def state_from_params(self, params) -> trainlib.TrainState:
    """Step 0 with these weights and a fresh optimizer state (init_from, fine-tuning)."""
    params = jax.device_put(params, self.state_shardings.params)
    with self.scope():
      fresh = jax.jit(lambda p: trainlib.TrainState.create(0, p, self.optimizer.init(p)),
                      out_shardings=self.state_shardings)
      return fresh(params)

  def abstract_batch(self) -> dict:
    """The global batch's shapes and sharding, for compiling ahead of time."""
    shape = (self.config.data.batch_size, self.config.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)
            for k in ("inputs", "targets")}


def build(config, mesh, model_config: TransformerConfig) -> Program:
  """The program for `config` (its optim, train and mesh-rule fields) and `model_config` on `mesh`.

  Nothing is compiled or allocated here: the state layout comes from `jax.eval_shape`, and the
  steps compile on their first call (or through `.lower(...).compile()`)."""
  t = config.train
  model = build_model(model_config)
  optimizer, schedule = make_optimizer(config.optim, t.steps)
  rules = shd.logical_rules(config)
  micro_batch = config.data.batch_size // t.grad_accum_steps
  init_fn, boxed = trainlib.abstract_state(model, optimizer, (micro_batch, config.data.seq_len))
  state_shardings = trainlib.state_shardings(boxed, mesh, rules)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                nn.meta.unbox(boxed), state_shardings)
  batch_sharding = shd.batch_sharding(mesh)
  replicated = shd.replicated(mesh)
  train_step = trainlib.make_train_step(
      model, optimizer, schedule, seed=t.seed, grad_accum_steps=t.grad_accum_steps,
      objective=t.objective, mlm_probability=t.mlm_probability, z_loss=t.z_loss,
      nonfinite_policy=t.nonfinite_policy, nonfinite_halt_after=t.nonfinite_halt_after,
      inject_nan_grads=cfglib.parse_steps(t.inject_nan_grads))
  eval_step = trainlib.make_eval_step(model, objective=t.objective,
                                      mlm_probability=t.mlm_probability, seed=t.seed)
  return Program(
      config=config, mesh=mesh, rules=rules, model_config=model_config, model=model,
      optimizer=optimizer, schedule=schedule, state_shardings=state_shardings,
      abstract_state=abstract_state, batch_sharding=batch_sharding,
      train_step=jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, replicated), donate_argnums=0),
      eval_step=jax.jit(eval_step, in_shardings=(state_shardings.params, batch_sharding, None),
                        out_shardings=(replicated, replicated)),
      init_fn=init_fn)
