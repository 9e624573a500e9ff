"""Training objectives, chosen by `train.objective` from a registry.

    @register("my_objective")
    class MyObjective(Objective): ...

`build(config, model_config)` constructs the run's objective; config validation takes its choices
from `names()`. See `llmjax/objectives/base.py` for the interface every objective implements.
"""
from __future__ import annotations

from llmjax.objectives.base import BatchField, Objective, all_trainable

_REGISTRY: dict[str, type] = {}


def register(name: str):
  """Class decorator: makes an Objective subclass selectable as train.objective=<name>."""
  def wrap(cls):
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"objective {name!r} is registered twice")
    cls.name = name
    _REGISTRY[name] = cls
    return cls
  return wrap


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get(name: str) -> type:
  if name not in _REGISTRY:
    raise ValueError(f"train.objective={name!r} is not one of {', '.join(_REGISTRY)}")
  return _REGISTRY[name]


def build(config, model_config) -> Objective:
  return get(config.train.objective)(config, model_config)


def data_options(config, run_dir=None) -> dict:
  """load_dataset keywords the run's objective needs; with `run_dir` (resuming, evaluating) the
  label mapping that run saved is reused."""
  options = dict(get(config.train.objective).data_options)
  if options.get("classification") and run_dir is not None:
    from llmjax.data.task_data import read_labels
    options["labels"] = read_labels(run_dir)
  return options


# The landed objectives (registration order = the order listed in errors and docs).
from llmjax.objectives.causal_lm import CausalLM  # noqa: E402
from llmjax.objectives.classification import Classification  # noqa: E402
from llmjax.objectives.masked_lm import MaskedLM  # noqa: E402

register("causal_lm")(CausalLM)
register("masked_lm")(MaskedLM)
register("classification")(Classification)

__all__ = ["Objective", "BatchField", "all_trainable", "register", "names", "get", "build",
           "data_options",
           "CausalLM", "MaskedLM", "Classification"]
