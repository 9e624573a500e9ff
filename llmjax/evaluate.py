"""Validation metrics (loss, perplexity, bits per character/byte), during training and eval-only.

`python -m llmjax.main --mode=eval --workdir=RUN [--step=N]` evaluates a checkpoint without
training: it restores only what evaluation needs, on the run's mesh or on another one
(`--config=... --config.mesh.fsdp=4 ...`), or on another corpus (`--config.data.val_path=...`,
`--config.data.path=...`, also for a run whose corpus moved). Of a given config only `mesh.*`,
`train.eval_batches` and `data.path`/`data.val_path`/`data.token_dtype` are used; everything else
comes from the run, and any other field that differs from the run's is named in a warning. It
prints the metrics and writes them to `RUN/eval/step_<N>.json`.
"""
from __future__ import annotations

import json
import math
import zlib
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


def evaluate_checkpoint(workdir: str, step: int | None = None, override=None,
                        explicit=None) -> dict:
  """Evaluates checkpoint `step` (default: latest) of the run in `workdir`. `override`, a config,
  supplies the mesh and train.eval_batches, and the corpus fields among `explicit` (see
  `_eval_data`). Returns the metrics with 'step' added."""
  from llmjax import runs
  from llmjax.data import load_dataset

  from llmjax import config as cfglib
  config = runs.read_config(workdir)
  data = None
  if override is not None:
    data = _eval_data(config, override, explicit)
    config.mesh.update(override.mesh.to_dict())
    config.train.eval_batches = override.train.eval_batches
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
  eval_config = loaded.config
  if data is not None:  # another corpus (data.path / data.val_path given with --mode=eval)
    eval_config = loaded.config.copy_and_resolve_references()
    eval_config.data = data
  dataset = loaded.objective.load_dataset(eval_config, loaded.tokenizer,
                                          **objectives.data_options(loaded.config, workdir))
  dataset = loaded.objective.wrap_dataset(dataset)
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
  name = f"step_{loaded.step}"
  if data is not None and (data.path, data.val_path) != (config.data.path, config.data.val_path):
    # another corpus: its own file, so the run's own figures are never overwritten by these
    result["data"] = {"path": data.path, "val_path": data.val_path}
    corpus = Path(data.val_path or data.path or "embedded").stem
    name += f"_{corpus}_{zlib.crc32(json.dumps(result['data']).encode()):08x}"
  if jax.process_index() == 0:
    out = Path(workdir) / "eval" / f"{name}.json"
    try:
      out.parent.mkdir(exist_ok=True)
      out.write_text(json.dumps(result, indent=2))
      result["written_to"] = str(out)
    except OSError as e:  # a read-only run directory still gets its numbers printed
      print(f"llmjax: warning: could not write {out}: {e.strerror}")
  return result


EVAL_OVERRIDES = ("data.path", "data.val_path", "data.token_dtype")


def _eval_data(config, override, explicit=None):
  """The data config to evaluate on: the run's, with the corpus fields of `override` that were
  set explicitly (`explicit`: the --config.* names given on the command line; None: every field
  of `override`). Warns by name about every other explicit field, which evaluation ignores."""
  import sys
  from llmjax import config as cfglib
  run, given = cfglib.flatten(config), cfglib.flatten(override)
  names = set(given) if explicit is None else set(explicit) & set(given)
  used = lambda k: k in EVAL_OVERRIDES or k == "train.eval_batches" or k.startswith("mesh.")
  ignored = sorted(k for k in names if not used(k) and given[k] != run.get(k))
  if ignored:
    more = f" (+{len(ignored) - 6} more)" if len(ignored) > 6 else ""
    print(f"llmjax: warning: --mode=eval ignores {', '.join(ignored[:6])}{more} and uses the "
          f"run's own values; it takes only mesh.*, train.eval_batches, {', '.join(EVAL_OVERRIDES)}"
          " from --config", file=sys.stderr, flush=True)
  data = config.data.copy_and_resolve_references()
  for key in EVAL_OVERRIDES:
    if key in names:
      data[key.split(".", 1)[1]] = given[key]
  changed = [f"data.{k}={data[k]!r}" for k in ("path", "val_path") if data[k] != config.data[k]]
  if changed:
    print(f"llmjax: evaluating on {', '.join(changed)} (the run trained on data.path="
          f"{config.data.path!r}, data.val_path={config.data.val_path!r})", file=sys.stderr,
          flush=True)
  if data.val_path and "data.path" not in names:
    data.path = data.val_path  # evaluation reads only the validation split: no train corpus needed
  return data


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
