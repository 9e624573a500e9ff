"""Registry of Hugging Face model families that live in their own converter modules.

A family converts one HF `model_type` group both ways. `llmjax.convert` asks this registry first
(by `model_type` on import, by the llmjax model config on export) and falls back to the GPT-2 /
Llama converter in hf_config.py / weights.py, so adding a family is one module plus one line in
`FAMILIES` below, never another branch in the import/export path.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from llmjax.model import TransformerConfig


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  model_types: tuple[str, ...]
  # (config.json dict, param_dtype) -> TransformerConfig; refuses unsupported variants by name
  to_llmjax: Callable[[Mapping[str, Any], str], TransformerConfig]
  # (HF tensors, cfg, numpy dtype) -> (llmjax params, cfg); refuses unknown or missing weights
  import_params: Callable[..., tuple[dict, TransformerConfig]]
  # does this family represent an llmjax model config? (export dispatch)
  exports: Callable[[TransformerConfig], bool]
  # (cfg, tokenizer or None) -> config.json dict; raises ConversionError when it cannot be exact
  to_hf: Callable[..., dict]
  # (numpy params, cfg) -> HF tensors
  export_params: Callable[[dict, TransformerConfig], dict[str, np.ndarray]]
  # adjusts the run config of an imported model (e.g. the training objective); optional
  run_config: Callable[[Any], None] | None = None


def _families() -> tuple[Family, ...]:
  from llmjax.convert import bert
  return (bert.FAMILY,)


def for_model_type(model_type: str | None) -> Family | None:
  return next((f for f in _families() if model_type in f.model_types), None)


def for_config(cfg: TransformerConfig) -> Family | None:
  return next((f for f in _families() if f.exports(cfg)), None)
