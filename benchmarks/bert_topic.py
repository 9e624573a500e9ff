"""Does masked-LM pretraining pay off where it should? bert_small fine-tuned on FEW topic labels vs
the same architecture trained from scratch.

  python benchmarks/bert_topic.py --workdir=/tmp/bert_topic [--pretrain_steps=2000] \
      [--per_label=16] [--seeds=0,1,2] [--lrs=1e-4,3e-4,1e-3] [--out=benchmarks/bert_topic.json]

The word-order task of benchmarks/bert_finetune.py rewards local order statistics that a random
model learns from 200 examples as fast as a pretrained one; BERT's fine-tuning gains come from
knowing the vocabulary and its contexts. This protocol (fixed before any test set was scored) asks
for that knowledge with few labels:

1. Task: issue 9's topic split (benchmarks/finetune_classify.py: four topics of the embedded
   corpus, ~120-character snippets, every 5th one held out: 95 test snippets). Labelled training
   set: --per_label training snippets per topic (default 16, 64 in all), drawn with a fixed seed;
   validation: --val_per_label OTHER training snippets per topic (default 20). Snippets are
   consecutive, non-overlapping pieces of text, so train, validation and test share no text.
2. Base: experiments/bert_small.py:no_nsp (NSP stayed at chance on this corpus, so it only added a
   second loss), pretrained on the embedded corpus MINUS the held-out snippets
   (finetune_classify.write_pretraining_corpus: neither the tokenizer nor the encoder ever reads
   test text), --pretrain_lr with linear decay to 0. Reused when WORKDIR/pretrained exists.
   The unigram baseline on the same masked validation positions is reported with its MLM accuracy.
3. Fine-tuning, the same recipe for both arms (issue 9's path, experiments/finetune.py with
   train.objective=classification: pooled [CLS] -> dropout -> classifier): batch 16,
   --finetune_steps steps, 10% warmup, linear decay, validation accuracy every --eval_every steps,
   keeping the best checkpoint (train.keep_best=val/accuracy, early stopping on validation). Each
   arm gets its learning rate from --lrs by best validation accuracy with seed 0 (ties: lower
   validation loss). Only then is the test set scored, at the chosen rate, for every seed, on the
   checkpoint validation picked (`llmjax.eval.runner.evaluate_file(..., step="best")`). A seed
   fixes the data order, dropout and the new head's init (for scratch also the whole init).
4. For scale, tf-idf + logistic regression (scikit-learn) on the same 64 labels and test set.

At the defaults the pretrained arm wins on every seed; with a 600- or 1000-step base it does not
(benchmarks/RESULTS.md, issue 11), so --pretrain_steps matters more than anything else here.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from bert_finetune import (ARMS, from_random_weights, load_experiment,  # noqa: E402
                           summarize_arms, unigram_baseline, write_report)
from finetune_classify import (sklearn_baselines, topic_sets,  # noqa: E402
                               write_jsonl, write_pretraining_corpus)


def load() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def make_task(out: Path, per_label: int, val_per_label: int, seed: int = 0) -> dict:
  """train/val/test.jsonl: few labelled training snippets per topic, other training snippets
  for validation, the held-out snippets for test; -> the pretraining regions and a summary."""
  _, test, plain, regions = topic_sets()
  rng = random.Random(seed)
  by_label: dict[str, list[dict]] = {}
  for r in plain:
    by_label.setdefault(r["label"], []).append(r)
  train, val = [], []
  for label in sorted(by_label):
    rows = by_label[label][:]
    if len(rows) < per_label + val_per_label:
      raise SystemExit(f"topic {label!r} has {len(rows)} training snippets; "
                       f"--per_label + --val_per_label must be <= that")
    rng.shuffle(rows)
    train += rows[:per_label]
    val += rows[per_label:per_label + val_per_label]
  rng.shuffle(train)
  out.mkdir(parents=True, exist_ok=True)
  for name, part in (("train", train), ("val", val), ("test", test)):
    write_jsonl(out / f"{name}.jsonl", part)
  return {"regions": regions, "train": train, "test": test,
          "summary": {"train": len(train), "val": len(val), "test": len(test),
                      "labels": sorted(by_label)}}


def pretrain(workdir: Path, corpus: str, steps: int, lr: float, warmup: int) -> dict:
  from llmjax import config as cfglib
  from llmjax import loop
  c = load_experiment("bert_small", "no_nsp")
  c.data.update(path=corpus)
  c.optim.update(lr=lr, warmup_steps=warmup)
  c.train.update(steps=steps, progress=False, eval_every=250, tensorboard=False)
  cfglib.validate(c, 1)
  t0 = time.perf_counter()
  result = loop.train(c, str(workdir))
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  curve = [{k: r[k] for k in ("step", "loss", "mlm_accuracy")} for r in rows
           if r.get("split") == "val"]
  return {"final": result, "val_curve": curve, "seconds": time.perf_counter() - t0}


def finetune(workdir: Path, task: Path, pretrained: Path, seed: int, lr: float, args,
             from_scratch: bool) -> dict:
  """Trains on task/train.jsonl, validating on task/val.jsonl every args.eval_every steps and
  keeping the best checkpoint by validation accuracy. -> the best validation figures."""
  from llmjax import config as cfglib
  from llmjax import loop
  c = load_experiment("finetune", str(pretrained))
  c.data.update(path=str(task / "train.jsonl"), val_path=str(task / "val.jsonl"), packing=False,
                batch_size=args.finetune_batch, truncate="right")
  c.optim.update(lr=lr, warmup_steps=max(1, args.finetune_steps // 10), schedule="linear",
                 min_lr_ratio=0.0)
  c.train.update(objective="classification", epochs=0, steps=args.finetune_steps,
                 eval_every=args.eval_every, keep_best="val/accuracy", seed=seed,
                 progress=False, tensorboard=False, log_every=50)
  if from_scratch:
    from_random_weights(c, pretrained)
  cfglib.validate(c, 1)
  t0 = time.perf_counter()
  loop.train(c, str(workdir))
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  val = [r for r in rows if r.get("split") == "val"]
  # the first evaluation at the best accuracy: the checkpoint train.keep_best kept
  best = next(r for r in val if r["accuracy"] == max(v["accuracy"] for v in val))
  return {"seed": seed, "lr": lr, "val_accuracy": best["accuracy"], "val_loss": best["loss"],
          "best_step": best["step"], "val_curve": [(r["step"], r["accuracy"]) for r in val],
          "seconds": time.perf_counter() - t0}


def score_test(workdir: Path, task: Path) -> dict:
  from llmjax.eval.runner import evaluate_file
  summary, _ = evaluate_file(str(workdir), str(task / "test.jsonl"), step="best", batch_size=32)
  return {"step": summary["step"], "accuracy": summary["accuracy"],
          "macro_f1": summary["macro_f1"]}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--pretrain_steps", type=int, default=2000)
  p.add_argument("--pretrain_lr", type=float, default=2e-3)
  p.add_argument("--pretrain_warmup", type=int, default=200)
  p.add_argument("--per_label", type=int, default=16)
  p.add_argument("--val_per_label", type=int, default=20)
  p.add_argument("--finetune_steps", type=int, default=150)
  p.add_argument("--finetune_batch", type=int, default=16)
  p.add_argument("--eval_every", type=int, default=10)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--lrs", default="1e-4,3e-4,1e-3",
                 help="learning rates tried per arm on the validation split (first seed)")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "bert_topic.json"))
  args = p.parse_args()
  work = Path(args.workdir)
  seeds = [int(s) for s in args.seeds.split(",")]
  lrs = [float(x) for x in args.lrs.split(",")]
  report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus (shared)",
            "command": " ".join(sys.argv), "args": vars(args), "load_start": load()}
  task = make_task(work / "task", args.per_label, args.val_per_label)
  report["task"] = task["summary"]
  report["sklearn_same_labels"] = sklearn_baselines(task["train"], task["test"])
  print("tf-idf + logistic regression on the same labels: " + ", ".join(
      f"{k} {v['accuracy']:.3f}" for k, v in report["sklearn_same_labels"].items()), flush=True)
  corpus = write_pretraining_corpus(work / "corpus", task["regions"])
  report["pretrain"] = pretrain(work / "pretrained", corpus, args.pretrain_steps,
                                args.pretrain_lr, args.pretrain_warmup)
  report["unigram_baseline"] = unigram_baseline(work / "pretrained")
  final = report["pretrain"]["final"]
  print(f"pretrained: MLM accuracy {final['mlm_accuracy']:.4f} (unigram baseline "
        f"{report['unigram_baseline']['accuracy']:.4f}), load {load()}", flush=True)

  def run(arm, seed, lr):
    r = finetune(work / f"{arm}_{seed}_lr{lr:g}", work / "task", work / "pretrained", seed, lr,
                 args, from_scratch=arm == "scratch")
    print(f"{arm} seed {seed} lr {lr:g}: best val accuracy {r['val_accuracy']:.4f} at step "
          f"{r['best_step']} ({r['seconds']:.0f} s, load {load()})", flush=True)
    return r

  result = {}
  for arm in ARMS:  # the learning rate is chosen on validation, never on test
    selection = [run(arm, seeds[0], lr) for lr in lrs]
    best = max(selection, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    result[arm] = {"lr_selection": selection, "lr": best["lr"], "runs": []}
  for seed in seeds:
    for arm in ARMS:
      lr = result[arm]["lr"]
      r = (next(s for s in result[arm]["lr_selection"] if s["lr"] == lr) if seed == seeds[0]
           else run(arm, seed, lr))
      r = {**r, "test": score_test(work / f"{arm}_{seed}_lr{lr:g}", work / "task")}
      print(f"{arm} seed {seed} lr {lr:g}: test accuracy {r['test']['accuracy']:.4f}",
            flush=True)
      result[arm]["runs"].append(r)
  report["classification"] = result
  report["load_end"] = load()
  summarize_arms(result, lambda r: r["test"]["accuracy"], seeds)
  write_report(args.out, report)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
