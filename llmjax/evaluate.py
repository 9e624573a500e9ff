"""Validation metrics (loss, perplexity, bits per character/byte), during training and eval-only.

`python -m llmjax.main --mode=eval --workdir=RUN [--step=N]` evaluates a checkpoint without
training: it restores only what evaluation needs, on the run's mesh or on another one
(`--config=... --config.mesh.fsdp=4 ...`: only the `mesh` and `train.eval_batches` fields of a
given config are used, everything else comes from the run), prints the metrics and writes them to
`RUN/eval/step_<N>.json`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np

from llmjax import sharding as shd
from llmjax import train as trainlib


def bytes_per_token(tokenizer, val_tokens) -> float:
  if tokenizer.kind in ("char", "byte"):
    return 1.0  # bits per character / per byte == bits per token
  sample = np.asarray(val_tokens[: 1 << 16])
  return max(len(tokenizer.decode(sample).encode("utf-8")), 1) / max(len(sample), 1)


def evaluate_params(eval_step, params, batch_fn, num_batches: int, tokenizer,
                    bytes_per_tok: float, objective=None) -> dict:
  """Metrics over `num_batches` validation batches: each batch's eval_sums are summed in float64
  on the host (so the result does not depend on how batches were split across devices) and
  `objective.finalize` (default: causal LM's loss/perplexity) turns the totals into metrics.
  Token-level LM objectives also get bits per character (char tokenizers) or byte."""
  totals: dict[str, float] = {}
  for i in range(num_batches):
    sums = jax.device_get(eval_step(params, batch_fn(i), i))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  if objective is None:
    from llmjax.objectives.causal_lm import CausalLM
    objective = CausalLM(None, None)
  result = dict(objective.finalize(totals))
  if objective.reports_bits_per_byte and "loss" in result:
    unit = "bpc" if tokenizer.kind == "char" else "bpb"
    result[unit] = result["loss"] / (math.log(2) * bytes_per_tok)
  return result


def evaluate_checkpoint(workdir: str, step: int | None = None, override=None) -> dict:
  """Evaluates checkpoint `step` (default: latest) of the run in `workdir`. `override`, a config,
  supplies the mesh and train.eval_batches. Returns the metrics with 'step' added."""
  from llmjax import runs
  from llmjax.data import load_dataset

  config = runs.read_config(workdir)
  if override is not None:
    config.mesh.update(override.mesh.to_dict())
    config.train.eval_batches = override.train.eval_batches
  from llmjax import config as cfglib
  try:
    cfglib.validate(config, num_devices=jax.device_count())  # e.g. batch vs the new mesh
  except cfglib.ConfigError:
    if override is not None:
      raise
    # the run's training mesh does not fit here: plain data parallelism over what there is
    config.mesh.update(data=-1, fsdp=1, sequence=1, tensor=1)
    config.mesh.dcn.update(data=1, fsdp=1, sequence=1, tensor=1)
    cfglib.validate(config, num_devices=jax.device_count())
  mesh = shd.make_mesh(config)
  loaded = runs.load_run(workdir, step, mesh=mesh)
  from llmjax import objectives
  dataset = load_dataset(loaded.config.data, loaded.config.train.seed, loaded.tokenizer,
                         **objectives.data_options(loaded.config, workdir))
  t = loaded.config.train
  eval_step = jax.jit(trainlib.make_eval_step(loaded.model, loaded.objective, seed=t.seed))
  batch_fn = lambda i: shd.put_batch(
      dataset.batch("val", i, loaded.config.data.batch_size, jax.process_index(),
                    jax.process_count()), mesh)
  import flax.linen as nn
  with shd.use_mesh(mesh), nn.logical_axis_rules(shd.logical_rules(config)):
    num_batches = config.train.eval_batches
    if hasattr(dataset, "num_batches"):  # task data: the whole validation set once
      num_batches = dataset.num_batches("val", loaded.config.data.batch_size)
    result = evaluate_params(eval_step, loaded.params, batch_fn, num_batches,
                             loaded.tokenizer, bytes_per_token(loaded.tokenizer, dataset.val),
                             loaded.objective)
  result = {"step": loaded.step, **result}
  if jax.process_index() == 0:
    out = Path(workdir) / "eval" / f"step_{loaded.step}.json"
    try:
      out.parent.mkdir(exist_ok=True)
      out.write_text(json.dumps(result, indent=2))
      result["written_to"] = str(out)
    except OSError as e:  # a read-only run directory still gets its numbers printed
      print(f"llmjax: warning: could not write {out}: {e.strerror}")
  return result


def describe_metrics(result: dict) -> str:
  """'val loss 1.234567, perplexity 3.437, bpb 1.7811' (LM) or 'val loss ..., accuracy ...'."""
  parts = [f"val loss {result['loss']:.6f}"]
  if "perplexity" in result:
    parts.append(f"perplexity {result['perplexity']:.3f}")
  parts += [f"{k} {v:.4f}" for k, v in result.items()
            if k not in ("loss", "perplexity", "step", "written_to") and isinstance(v, float)]
  return ", ".join(parts)


def format_result(result: dict) -> str:
  return f"step {result['step']}: {describe_metrics(result)}"


if __name__ == "__main__":  # `python -m llmjax.evaluate`: the task runner (llmjax/eval/cli.py)
  from llmjax.eval.cli import run
  run()
