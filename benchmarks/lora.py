"""LoRA / QLoRA against full fine-tuning: memory, step time, and quality on the addition task.

Memory (exact, from the programs' state layouts): trainable parameters, optimizer-state bytes,
frozen-base bytes in float32 and int8 (QLoRA), bytes per parameter.
Step time: the compiled train steps of full fine-tuning, LoRA and QLoRA on the same batch,
interleaved, --repeats rounds of --steps steps each; min / median / max ms per step.
Quality (--quality): issue 9's addition task (three-digit sums, held-out exact match of greedy
completions, as `python -m llmjax.evaluate` computes it) with issue 9's base and recipe
(benchmarks/finetune_addition.py's arguments and defaults): fine-tune the base with the same
budget fully, with LoRA (--lora_rank on --lora_targets, at --lora_lr), with QLoRA (the same on
an int8 base), with LoRA on query/value only, and on query/value plus the token table (`_qve`,
also as QLoRA). With the --workdir of a finetune_addition.py run its base and its completion-loss
run (= full fine-tuning) are reused.
The base's shape is selectable (--base_layers, --base_width, --base_heads, --matmul_dtype;
defaults: issue 9's 4 x 128 base): rank-8 adapters on all seven attention/MLP matrices are
~11.5 / width of the parameters, so a wider base makes them a small share, as in practice. The
shape is recorded in the JSON ("base"); a reused --workdir whose base has another shape is refused.

  PYTHONPATH=$PWD python benchmarks/lora.py --out=benchmarks/lora.json [--quality]
  PYTHONPATH=$PWD python benchmarks/lora.py --quality --base_layers=2 --base_width=640 \
      --base_heads=10 --matmul_dtype=bfloat16 --lora_targets=all,embedding --variants=full,lora_r8
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


# issue 9's task, base and fine-tuning recipe, so LoRA and full fine-tuning are compared on the
# very same examples, base and budget as benchmarks/finetune_addition.py measures
from finetune_addition import (add_recipe_args, addition_sets,  # noqa: E402
                               base_config_from_args, base_shape_mismatch, digit_accuracy,
                               exact_match, finetune_config, run_figures, write_jsonl)


def variants(args) -> dict:
  """name -> LoRA settings (None: full fine-tuning) and the learning rate it trains with."""
  lora = dict(rank=args.lora_rank, alpha=args.lora_alpha, targets=args.lora_targets,
              lr_ratio=args.lora_lr_ratio)
  r = args.lora_rank
  qve = {**lora, "targets": "query,value,embedding"}
  return {
      "full": (None, args.lr),
      f"lora_r{r}": (lora, args.lora_lr),
      f"qlora_r{r}": ({**lora, "base_dtype": "int8"}, args.lora_lr),
      # PEFT's default targets (query, value): the fewest trainable parameters
      f"lora_r{r}_qv": ({**lora, "targets": "query,value"}, args.lora_lr),
      # query, value and the (tied) token table: under 2% of this model's parameters, and the
      # table is what frozen-embedding LoRA could not learn the task without (RESULTS.md)
      f"lora_r{r}_qve": (qve, args.lora_lr),
      f"qlora_r{r}_qve": ({**qve, "base_dtype": "int8"}, args.lora_lr),
  }


def run_name(name: str, args) -> str:
  """The fine-tuning run's directory under --workdir. Full fine-tuning is finetune_addition.py's
  completion-loss run ("ft_completion", reused from a shared --workdir); another train.seed or
  other adapter targets get their own directory; a run found there with another recipe (budget,
  learning rate, ...) is refused by reused_run_mismatch, never reused."""
  work = "ft_completion" if name == "full" else f"ft_{name}"
  if name != "full" and args.lora_targets != "all" and not name.endswith(("_qv", "_qve")):
    work += "_" + args.lora_targets.replace(",", "-")
  if args.train_seed is not None:
    work += f"_seed{args.train_seed}"
  return work


# The fields a fine-tuning run's result depends on, beyond the directory's name (run_name):
# a reused run must have been trained with exactly these, or its figure is another recipe's.
RECIPE_FIELDS = ("optim.lr", "optim.weight_decay", "optim.warmup_steps", "optim.min_lr_ratio",
                 "train.steps", "train.seed", "data.batch_size", "data.seq_len", "data.train_on",
                 "lora.rank", "lora.alpha", "lora.targets", "lora.base_dtype", "lora.lr_ratio")


def reused_run_mismatch(work: str, wanted) -> str:
  """'' when the run in `work` was trained with `wanted`'s recipe (RECIPE_FIELDS), else a
  one-line reason naming the fields that differ: lora.py names its runs by variant and seed
  only, so another budget or learning rate in the same --workdir would otherwise be reused."""
  from llmjax import runs
  have = runs.read_config(work)
  get = lambda c, key: c[key.split(".")[0]][key.split(".")[1]]  # noqa: E731
  wrong = [f"{k}={get(have, k)!r} (flags ask {get(wanted, k)!r})" for k in RECIPE_FIELDS
           if get(have, k) != get(wanted, k)]
  return (f"the run in {work} was trained with {', '.join(wrong)}; use a fresh --workdir for "
          "another recipe") if wrong else ""


def lora_config(base: str, paths: dict, args, lora: dict | None, lr: float):
  c = finetune_config(base, paths["train"], paths["val"], args, "completion", lr)
  if args.train_seed is not None:  # another adapter init, dropout stream and data order
    c.train.seed = args.train_seed
  if lora:
    c.lora.update(**lora)
  return c


def memory(programs) -> dict:
  import jax
  import numpy as np

  from llmjax import quantize
  from llmjax.model import lora as loralib
  out = {}
  for name, prog in programs.items():
    params = prog.abstract_state.params
    adapter, base = loralib.split(params)
    is_q = lambda x: isinstance(x, quantize.QArray)  # noqa: E731
    leaves = jax.tree.leaves(base, is_leaf=is_q)
    count = lambda xs: sum(int(np.prod(x.shape)) for x in xs)  # noqa: E731
    nbytes = lambda xs: sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize  # noqa: E731
                            for x in jax.tree.leaves(xs))
    trainable = count(jax.tree.leaves(adapter)) if prog.lora else count(leaves)
    total = count(leaves) + count(jax.tree.leaves(adapter))
    matrices = [x for p, x in jax.tree_util.tree_flatten_with_path(base, is_leaf=is_q)[0]
                if "kernel" in str(p) or "embedding" in str(p)]
    out[name] = {"params": total, "trainable": trainable, "trainable_fraction": trainable / total,
                 "optimizer_bytes": nbytes(prog.abstract_state.opt_state),
                 "base_bytes": nbytes(base), "adapter_bytes": nbytes(adapter),
                 "base_bytes_per_param": nbytes(base) / max(count(leaves), 1),
                 "matrix_bytes": nbytes(matrices),
                 "matrix_bytes_per_param": nbytes(matrices) / max(count(
                     [x.values if is_q(x) else x for x in matrices]), 1)}
  full = out["full"]
  for name, m in out.items():
    m["optimizer_vs_full"] = m["optimizer_bytes"] / full["optimizer_bytes"]
    m["base_vs_fp32"] = m["base_bytes"] / full["base_bytes"]
    m["matrices_vs_fp32"] = m["matrix_bytes"] / full["matrix_bytes"]
  return out


def step_times(programs, base_params, steps: int, repeats: int) -> dict:
  """ms per compiled train step, interleaving the variants round by round."""
  import jax
  import numpy as np

  from llmjax import quantize
  compiled, states = {}, {}
  rng = np.random.default_rng(0)
  some = next(iter(programs.values()))
  shape = (some.config.data.batch_size, some.config.data.seq_len)
  tokens = rng.integers(0, 500, (shape[0], shape[1] + 1)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": np.ones(shape, np.float32), "segment_ids": np.ones(shape, np.int32),
           "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()}
  for name, prog in programs.items():
    fields = prog.abstract_batch()
    b = jax.device_put({k: batch[k] for k in fields}, prog.batch_sharding)
    states[name] = prog.state_from_params(quantize.dequantize_params(base_params))
    with prog.scope():
      compiled[name] = (prog.train_step.lower(prog.abstract_state, prog.abstract_batch()).compile(), b)
  times = {name: [] for name in programs}
  for _ in range(repeats):
    for name, prog in programs.items():
      step, b = compiled[name]
      state = states[name]
      state, m = step(state, b)  # warm
      jax.block_until_ready(m)
      t0 = time.perf_counter()
      for _ in range(steps):
        state, m = step(state, b)
      jax.block_until_ready((state, m))
      times[name].append((time.perf_counter() - t0) / steps * 1e3)
      states[name] = state
  return {n: {"min_ms": min(t), "median_ms": statistics.median(t), "max_ms": max(t),
              "runs_ms": t} for n, t in times.items()}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_recipe_args(p)
  p.add_argument("--lora_rank", type=int, default=8)
  p.add_argument("--lora_alpha", type=float, default=16.0)
  p.add_argument("--lora_targets", default="all", help="lora.targets of the lora/qlora variants")
  p.add_argument("--lora_lr", type=float, default=2e-3, help="adapters' learning rate")
  p.add_argument("--lora_lr_ratio", type=float, default=1.0,
                 help="lora.lr_ratio: B's learning rate over A's (LoRA+; 1 = plain LoRA)")
  p.add_argument("--train_seed", type=int, default=None,
                 help="train.seed of the fine-tuning runs (default: the base run's)")
  p.add_argument("--steps", type=int, default=10, help="timed steps per round")
  p.add_argument("--repeats", type=int, default=5, help="timing rounds (0: no timing)")
  p.add_argument("--quality", action="store_true", help="also fine-tune and measure exact match")
  p.add_argument("--variants", default="", help="comma-separated; default: all of them")
  p.add_argument("--workdir", default="")
  p.add_argument("--out", default="")
  args = p.parse_args()
  table = variants(args)
  names = args.variants.split(",") if args.variants else list(table)
  unknown = [n for n in names if n not in table]
  if unknown:
    p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(table)}")
  import jax

  from llmjax import config as cfglib
  from llmjax import loop, program, runs
  from llmjax import sharding as shd
  tmp = Path(args.workdir or tempfile.mkdtemp(prefix="llmjax_lora_"))
  tmp.mkdir(parents=True, exist_ok=True)
  train, val, test = addition_sets(args.seed, args.train_examples, 200, args.test_examples,
                                   args.answer)
  paths = {k: write_jsonl(tmp / f"{k}.jsonl", v) for k, v in
           (("train", train), ("val", val), ("test", test))}
  result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, {jax.devices()[0].platform}",
            "args": vars(args), "load_at_start": os.getloadavg()}
  base = str(tmp / "base")
  if not (Path(base) / "checkpoints").exists():
    t0 = time.perf_counter()
    result["pretrain_final"] = loop.train(base_config_from_args(args), base)
    result["pretrain_s"] = time.perf_counter() - t0
  elif mismatch := base_shape_mismatch(base, args):
    p.error(mismatch)
  loaded = runs.load_run(base)
  programs = {}
  for name in (names if "full" in names else ["full", *names]):  # memory is relative to full
    c = lora_config(base, paths, args, *table[name])
    c.data.packing = False  # fixed rows for timing
    programs[name] = program.build(c, shd.make_mesh(c), cfglib.model_config(
        c, loaded.tokenizer.vocab_size))
  result["memory"] = memory(programs)
  result["base"] = {"layers": args.base_layers, "width": args.base_width,
                    "heads": args.base_heads, "matmul_dtype": args.matmul_dtype,
                    "params": result["memory"]["full"]["params"]}
  print(f"base: {args.base_layers} layers x {args.base_width} wide, {args.base_heads} heads, "
        f"matmuls {args.matmul_dtype}: {result['base']['params']:,} parameters", flush=True)
  for name, m in result["memory"].items():
    print(f"{name:9s} trainable {m['trainable']:>9,} ({m['trainable_fraction']:.2%}); optimizer "
          f"{m['optimizer_bytes'] / 1024:,.1f} KiB ({m['optimizer_vs_full']:.2%} of full); base "
          f"{m['base_bytes'] / 1024:,.1f} KiB ({m['base_vs_fp32']:.1%} of fp32; matrices "
          f"{m['matrix_bytes_per_param']:.2f} B/param, {m['matrices_vs_fp32']:.1%})", flush=True)
  result["step_time"] = (step_times({n: programs[n] for n in names}, loaded.params, args.steps,
                                    args.repeats)
                         if args.repeats > 0 else {})
  for name, t in result["step_time"].items():
    print(f"{name:9s} step {t['min_ms']:.1f} / {t['median_ms']:.1f} / {t['max_ms']:.1f} ms "
          "(min / median / max)", flush=True)
  if args.quality:
    result["base_exact_match"] = exact_match(base, paths["test"])
    print(f"base model: exact match {result['base_exact_match']:.3f}", flush=True)
    for name in names:
      # full fine-tuning is finetune_addition.py's completion-loss run (the same config): with a
      # shared --workdir it is reused, not trained twice
      work = str(tmp / run_name(name, args))
      t0 = time.perf_counter()
      reused = (Path(work) / "checkpoints").exists()
      wanted = lora_config(base, paths, args, *table[name])
      if reused and (mismatch := reused_run_mismatch(work, wanted)):
        p.error(mismatch)
      if not reused:
        loop.train(wanted, work)
      seconds = time.perf_counter() - t0
      em = exact_match(work, paths["test"])
      result.setdefault("quality", {})[name] = {
          "exact_match": em, "lr": table[name][1], "reused_run": reused,
          "finetune_s": None if reused else seconds, "load_after": os.getloadavg(),
          # where a run stalls: teacher-forced accuracy of each answer digit on the validation
          # sums (validation, not test: recipes are compared on it)
          "val_digits": digit_accuracy(work, paths["val"], args.answer),
          **run_figures(work)}
      print(f"{name:12s} exact match {em:.3f} after {args.finetune_steps} steps", flush=True)
      save(result, args.out)  # after every variant: a stopped run keeps the ones it finished
  print(json.dumps(result, indent=2))
  save(result, args.out)


def save(result: dict, out: str) -> None:
  """Writes the JSON atomically (a temporary file renamed over --out)."""
  if out:
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)


if __name__ == "__main__":
  main()
