"""Fine-tuning bar: three-digit addition learned by a small pretrained model on CPU.

1. Pretrain a base model (4 layers, 128 wide, sentencepiece with split digits) on the embedded
   corpus (Python's documentation prose, shipped with Python) for --pretrain_steps.
2. Generate addition examples with a seed; train, val and test sets are disjoint (distinct
   (a, b) pairs). The default, --answer=plain, is the issue's format
   {"prompt": "123+456=", "completion": "579"}; --answer=reversed writes the answer's digits least
   significant first ("123+456=" -> "975"), which small Transformers learn faster.
3. Exact match of greedy completions on the test set (`llmjax.eval`, as `python -m llmjax.evaluate`
   computes it): the base model, then the model fine-tuned with experiments/finetune.py on this
   recipe (lr 1e-3, 100 warmup steps, cosine to 1e-4, weight decay 0.1, 4,000 steps of 64 sums,
   100,000 training sums; completion-only loss) and, on the same budget, with loss on every token;
   with each, the teacher-forced accuracy of every answer digit by significance (units, tens, ...).

Weight decay is what the plain format needs: without it (the earlier recipe) the units digit stays
near chance for 3,000 steps (0.206 exact match) while every other digit is learned; with 0.1 it is
learned in a sudden transition whose step varies with the data seed (seed 0 by step 2,500 of
3,000, seed 1 only at ~3,000 of 3,000 but by 2,500 of 4,000; benchmarks/RESULTS.md, issue 9).

Prints the figures and writes JSON (--out). The bar (issue 9): exact match from about 0 to >= 90%.

  PYTHONPATH=$PWD python benchmarks/finetune_addition.py --out=benchmarks/finetune_addition.json
  PYTHONPATH=$PWD python benchmarks/finetune_addition.py --answer=reversed --finetune_steps=1500 \
      --weight_decay=0
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


ANSWERS = ("plain", "reversed")


def addition_sets(seed: int, n_train: int, n_val: int, n_test: int, answer: str = "plain"):
  """Disjoint sets of distinct (a, b) pairs of three-digit numbers. answer='plain' is the issue's
  format ("123+456=" -> "579"); 'reversed' writes the sum's digits least significant first
  ("123+456=" -> "975"), so every answer digit needs only the carry of the digit already written
  before it (the plain format's first digit needs the whole carry chain at once)."""
  import numpy as np
  assert answer in ANSWERS, answer
  rng = np.random.default_rng(seed)
  picks = rng.choice(900 * 900, size=n_train + n_val + n_test, replace=False)
  pairs = [(100 + int(p) // 900, 100 + int(p) % 900) for p in picks]
  text = (lambda n: str(n)) if answer == "plain" else (lambda n: str(n)[::-1])
  make = lambda ps: [{"prompt": f"{a}+{b}=", "completion": text(a + b)} for a, b in ps]
  return (make(pairs[:n_train]), make(pairs[n_train:n_train + n_val]),
          make(pairs[n_train + n_val:]))


def write_jsonl(path: Path, records) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def base_config(steps: int, layers: int = 4, width: int = 128, heads: int = 4,
                matmul_dtype: str = "compute", lr: float = 2e-3):
  """The base's pretraining config. The defaults are issue 9's base (4 layers, 128 wide, 4 heads:
  1.1M parameters), the one every recorded figure up to issue 10's wide-base runs used; the
  fine-tuning runs inherit its shape and matmul_dtype (experiments/finetune.py copies `model`)."""
  from llmjax.config import default_config
  c = default_config()
  c.model.update(num_layers=layers, num_heads=heads, embed_dim=width, max_seq_len=64,
                 position="rotary", norm="rmsnorm", mlp="swiglu", use_bias=False,
                 scan_layers=False, matmul_dtype=matmul_dtype)
  c.data.update(tokenizer="sentencepiece", sp_vocab_size=512, sp_split_digits=True, seq_len=64,
                batch_size=16)
  c.optim.update(lr=lr, warmup_steps=50, min_lr_ratio=0.1)
  c.train.update(steps=steps, eval_every=0, eval_batches=4, log_every=50, checkpoint_every=0,
                 sample_tokens=0, progress=False, tensorboard=False, grad_accum_steps=1)
  return c


def base_shape_mismatch(base: str, args) -> str:
  """'' when the existing base run in `base` has the shape the flags ask for, else a one-line
  reason: a reused --workdir must not silently measure another base than the one recorded."""
  from llmjax import runs
  m = runs.read_config(base).model
  want = {"num_layers": args.base_layers, "embed_dim": args.base_width,
          "num_heads": args.base_heads, "matmul_dtype": args.matmul_dtype}
  wrong = [f"{k}={m[k]} (flags ask {v})" for k, v in want.items() if m[k] != v]
  return (f"the base run in {base} has {', '.join(wrong)}; use another --workdir or the "
          "matching --base_layers/--base_width/--base_heads/--matmul_dtype") if wrong else ""


def base_config_from_args(args):
  """base_config with the shape the recipe flags (add_recipe_args) ask for."""
  return base_config(args.pretrain_steps, layers=args.base_layers, width=args.base_width,
                     heads=args.base_heads, matmul_dtype=args.matmul_dtype, lr=args.pretrain_lr)


def finetune_config(base: str, train: str, val: str, args, train_on: str = "completion",
                    lr: float = 0.0):
  """experiments/finetune.py's config for `base` with this benchmark's recipe (args)."""
  sys.path.insert(0, str(ROOT / "experiments"))
  import finetune
  c = finetune.get_config(base)
  if getattr(args, "scratch", False):  # same architecture, tokenizer and recipe; random weights (a diagnostic)
    c.train.init_from = ""
    c.data.tokenizer_path = str(Path(base) / "tokenizer.model")
  # one sum (15 tokens: "▁" + 3 digits, "+", 3 digits, "=", "▁" + 3-4 digits, EOS) per row of 16:
  # padding, no packing needed; longer rows pack several sums
  c.data.update(path=train, val_path=val, train_on=train_on, batch_size=args.batch_size,
                seq_len=args.seq_len, packing=args.seq_len > 16)
  c.optim.update(lr=lr or args.lr, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio,
                 weight_decay=args.weight_decay)
  c.train.update(epochs=0, steps=args.finetune_steps, eval_every=args.eval_every, keep_best="",
                 log_every=100, progress=False, tensorboard=False,
                 checkpoint_every=getattr(args, "checkpoint_every", 0), keep_checkpoints=0)
  return c


def run_figures(workdir: str) -> dict:
  """From the run's metrics.jsonl: median / min / max ms per step (the first logged interval,
  which holds the compilation, left out) and the validation-loss curve."""
  import statistics
  rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()
          if line.strip()]
  ms = [r["step_time_ms"] for r in rows if r.get("split") == "train" and "step_time_ms" in r][1:]
  curve = {r["step"]: round(r["loss"], 4) for r in rows if r.get("split") == "val"}
  out = {"val_loss_curve": curve}
  if ms:
    out.update(ms_per_step_median=statistics.median(ms), ms_per_step_min=min(ms),
               ms_per_step_max=max(ms))
  return out


def exact_match(workdir: str, test: str) -> float:
  from llmjax.eval.runner import evaluate_file
  from llmjax.eval.tasks import Options
  summary, _ = evaluate_file(workdir, test, options=Options(max_new_tokens=8), batch_size=64)
  return summary["exact_match"]


def digit_accuracy(workdir: str, test: str, answer: str) -> dict:
  """Teacher-forced accuracy and loss of each answer digit by its significance (units, tens, ...)
  over the test sums, split by answer length: where an unlearned digit hides, independent of
  greedy decoding (the completion is "▁", the digits, EOS; the loss weights mark it)."""
  import collections
  import jax
  import jax.numpy as jnp
  import numpy as np
  from llmjax import runs
  from llmjax.data.task_data import load_task_dataset
  run = runs.load_run(workdir)
  data = run.config.data.copy_and_resolve_references()
  # the answer digits are found from the completion's loss weights, whatever the run trained on
  # (an all-token run's weights would cover the prompt too)
  data.update(path=test, val_path=test, packing=False, train_on="completion")
  ds = load_task_dataset(data, 0, tokenizer=run.tokenizer)
  b = ds.batch("val", 0, len(ds.examples["val"]))
  logits = run.model.apply({"params": run.params}, jnp.asarray(b["inputs"]), deterministic=True,
                           positions=jnp.asarray(b["positions"]),
                           segment_ids=jnp.asarray(b["segment_ids"]))
  logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1))
  hits, nll = collections.defaultdict(list), collections.defaultdict(list)
  names = ("units", "tens", "hundreds", "thousands")
  for r in range(len(b["inputs"])):
    where = np.nonzero(b["weights"][r])[0][1:-1]   # the digits: after "▁", before EOS
    n = len(where)
    for k, pos in enumerate(where):
      significance = k if answer == "reversed" else n - 1 - k
      key = f"{names[significance]}_of_{n}"
      target = b["targets"][r, pos]
      hits[key].append(float(logp[r, pos].argmax() == target))
      nll[key].append(float(-logp[r, pos, target]))
  return {k: {"n": len(hits[k]), "accuracy": round(float(np.mean(hits[k])), 4),
              "nll": round(float(np.mean(nll[k])), 4)} for k in sorted(hits)}


def add_recipe_args(p: argparse.ArgumentParser) -> None:
  """The task and fine-tuning recipe, shared with benchmarks/lora.py so both measure the same
  budget on the same examples. These defaults (reversed answers, 1,500 steps, no weight decay) are
  the ones lora.py's recorded figures used; this script's main() sets the plain format's recipe."""
  p.add_argument("--pretrain_steps", type=int, default=300)
  # the base's shape (defaults: issue 9's 4 x 128 base); a wider base makes rank-8 adapters a
  # smaller share of the parameters (~11.5 / width on all seven attention/MLP matrices)
  p.add_argument("--base_layers", type=int, default=4, help="the base's layers")
  p.add_argument("--base_width", type=int, default=128, help="the base's model width (embed_dim)")
  p.add_argument("--base_heads", type=int, default=4, help="the base's attention heads")
  p.add_argument("--pretrain_lr", type=float, default=2e-3, help="the base's pretraining lr")
  p.add_argument("--matmul_dtype", choices=("compute", "bfloat16"), default="compute",
                 help="model.matmul_dtype of the base, inherited by every fine-tuning run")
  p.add_argument("--finetune_steps", type=int, default=1500)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--warmup_steps", type=int, default=100)
  p.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine decay to lr * this")
  p.add_argument("--weight_decay", type=float, default=0.0)
  p.add_argument("--seq_len", type=int, default=16)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--eval_every", type=int, default=500, help="validation loss every N steps")
  p.add_argument("--train_examples", type=int, default=100000)
  p.add_argument("--test_examples", type=int, default=500)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--answer", choices=ANSWERS, default="reversed",
                 help="the sum as written ('plain', the issue's format) or digits reversed")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_recipe_args(p)
  # this benchmark's recipe for the plain format (add_recipe_args keeps the defaults that
  # benchmarks/lora.py's documented figures were measured with: reversed, 1,500 steps, no decay)
  p.set_defaults(answer="plain", finetune_steps=4000, weight_decay=0.1)
  p.add_argument("--scratch", action="store_true",
                 help="fine-tune from random weights instead of the base (same recipe)")
  p.add_argument("--checkpoint_every", type=int, default=0,
                 help="also keep checkpoints every N steps (for per-digit curves; 0: the last only)")
  p.add_argument("--skip_all_tokens", action="store_true", help="skip the all-token comparison")
  p.add_argument("--workdir", default="", help="keep the runs here (default: a temp dir)")
  p.add_argument("--out", default="")
  args = p.parse_args()

  from llmjax import loop
  tmp = Path(args.workdir or tempfile.mkdtemp(prefix="llmjax_addition_"))
  tmp.mkdir(parents=True, exist_ok=True)
  train, val, test = addition_sets(args.seed, args.train_examples, 200, args.test_examples,
                                   args.answer)
  paths = {k: write_jsonl(tmp / f"{k}.jsonl", v) for k, v in
           (("train", train), ("val", val), ("test", test))}
  pairs = lambda rs: {r["prompt"] for r in rs}
  assert not (pairs(train) & pairs(test)) and not (pairs(val) & pairs(test))

  result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus", "args": vars(args),
            "load_at_start": os.getloadavg()}
  t0 = time.perf_counter()
  base = str(tmp / "base")
  if not (Path(base) / "checkpoints").exists():
    loop.train(base_config_from_args(args), base)
  elif mismatch := base_shape_mismatch(base, args):
    p.error(mismatch)
  result["pretrain_s"] = time.perf_counter() - t0
  result["base_exact_match"] = exact_match(base, paths["test"])
  print(f"base model: exact match {result['base_exact_match']:.3f} on {len(test)} held-out sums",
        flush=True)

  variants = [("completion", "completion")] + ([] if args.skip_all_tokens else [("all", "all")])
  for name, train_on in variants:
    work = str(tmp / f"ft_{name}")
    t0 = time.perf_counter()
    final = loop.train(finetune_config(base, paths["train"], paths["val"], args, train_on), work)
    seconds = time.perf_counter() - t0
    em = exact_match(work, paths["test"])
    result[f"{name}_loss"] = {"finetune_s": seconds, "exact_match": em,
                              "val_loss": final.get("loss"), "load_after": os.getloadavg(),
                              "digits_teacher_forced": digit_accuracy(work, paths["test"],
                                                                      args.answer),
                              **run_figures(work)}
    print("  teacher-forced digit accuracy: " + ", ".join(
        f"{k} {v['accuracy']:.3f}" for k, v in result[f"{name}_loss"]["digits_teacher_forced"].items()),
        flush=True)
    print(f"fine-tuned, loss on {name} tokens: exact match {em:.3f} after "
          f"{args.finetune_steps} steps ({seconds:.0f} s, median "
          f"{result[f'{name}_loss'].get('ms_per_step_median', 0):.0f} ms/step, load "
          f"{os.getloadavg()[0]:.1f})", flush=True)
  print(json.dumps(result, indent=2))
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  main()
