"""The Objective interface: what a train/eval step asks of a training objective.

An objective is built once per run, `Objective(config, model_config)`, reading the train.* /
data.* fields it needs. The jitted steps (`llmjax.train`) call only these methods and never branch
on the objective's name, so a new objective is a new module plus a `@register("name")` line in
`llmjax/objectives/__init__.py`:

- `batch_spec(config)` -> {name: BatchField(shape, dtype)}: the arrays of the GLOBAL batch the step
  consumes (Program.abstract_batch, the memory planner and the jit's input shardings use it). The
  dataset's `batch(...)` must return exactly these keys (per process: its rows of them).
- `init_inputs(micro_batch_shape)` -> kwargs of example arrays for `model.init`.
- `loss(model, params, batch, rng, deterministic)` -> (loss to differentiate, aux). aux holds
  scalars: aux["loss"] the reported loss (never auxiliary terms such as z-loss), aux["weight"] its
  denominator (e.g. the weighted token count); any other entry is logged as a train metric.
- `eval_sums(model, params, batch, rng)` -> {name: scalar SUM over the batch}, e.g.
  {"loss": loss * weight, "weight": weight, "correct": n}; summed over batches on the host so any
  batch size or sharding averages exactly. `finalize(sums)` turns the totals into metrics.
- `trainable(params)` -> a pytree of bools (default all True); frozen leaves get no optimizer
  state and no gradient (LoRA).
- `wrap_dataset(dataset)` -> the dataset batches come from (default: the data layer's own).
- `data_options` (class attribute): extra load_dataset keywords the objective's batches need.
- `reports_bits_per_byte`: True for token-level LM objectives, whose eval loss is also reported
  in bits per character/byte.
"""
from __future__ import annotations

import abc
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class BatchField(NamedTuple):
  """Shape and dtype of one array of the global batch (a ShapeDtypeStruct without sharding)."""
  shape: tuple
  dtype: Any


class Objective(abc.ABC):
  name = ""
  reports_bits_per_byte = False
  # extra keyword arguments for llmjax.data.load_dataset (e.g. {"classification": True})
  data_options: dict = {}
  # Issue 11: model families this objective trains (config validation checks model.family);
  # None: any family that takes plain token inputs (every one but 'encoder_decoder').
  families: tuple | None = None

  @classmethod
  def load_dataset(cls, config, tokenizer=None, **options):
    """The dataset the loop draws this objective's batches from (default: llmjax.data's
    load_dataset with `data_options`). Objectives with their own rows (seq2seq) override it."""
    from llmjax.data import load_dataset
    return load_dataset(config.data, config.train.seed, tokenizer, **options)

  def __init__(self, config, model_config):
    self.config = config
    self.model_config = model_config

  # -- what the step consumes ------------------------------------------------------------------
  def batch_spec(self, config) -> dict[str, BatchField]:
    """Default: the token rows the data layer makes for `config.data` (see
    llmjax.data.formats.batch_fields)."""
    from llmjax.data.formats import batch_fields
    d = config.data
    return {k: BatchField((d.batch_size, d.seq_len), dtype)
            for k, dtype in batch_fields(d).items()}

  def init_inputs(self, micro_batch_shape) -> dict:
    return {"tokens": jnp.zeros(micro_batch_shape, jnp.int32)}

  # -- training and evaluation ------------------------------------------------------------------
  @abc.abstractmethod
  def loss(self, model, params, batch, rng, deterministic: bool):
    """Each objective defines it (see the module docstring)."""

  @abc.abstractmethod
  def eval_sums(self, model, params, batch, rng) -> dict:
    """Each objective defines it (see the module docstring)."""

  @abc.abstractmethod
  def finalize(self, sums: dict) -> dict:
    """Each objective defines it (see the module docstring)."""

  def trainable(self, params):
    return jax.tree.map(lambda _: True, params)

  # -- data (issue 11) ---------------------------------------------------------------------------
  def wrap_dataset(self, dataset):
    """The dataset the loop and evaluation read batches from, given the one the data layer built
    (default: unchanged). Objectives whose rows are made from a token stream (masked LM) wrap it
    here, so batches stay a pure function of (seed, split, step)."""
    return dataset


def all_trainable(mask) -> bool:
  """True when every leaf of a `trainable` mask is True (then no masking machinery is built)."""
  return all(bool(np.all(m)) for m in jax.tree.leaves(mask))
