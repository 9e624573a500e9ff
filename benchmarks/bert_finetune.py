"""Does masked-LM pretraining pay off? bert_small's MLM accuracy against the unigram baseline, and
classification accuracy fine-tuned from the pretrained run vs the same architecture from scratch.

  python benchmarks/bert_finetune.py --workdir=/tmp/bert_bench [--pretrain_steps=1000] \
      [--finetune_steps=100] [--seeds=0,1,2] [--lrs=3e-4,1e-3] [--out=benchmarks/bert_finetune.json]

1. Pretrains experiments/bert_small.py (MLM with whole-word masking + NSP) in WORKDIR/pretrained
   (reused, or resumed, when it exists).
2. Unigram baseline: always predict the most frequent non-special token of the training stream;
   its accuracy on the very masked positions validation scores (same batches).
3. A classification task made from the corpus's sentences (8-20 words): "original" sentences vs
   "shuffled" ones (the same words in a random order), a task that word-order knowledge from
   pretraining should help with. Few labels (200 train; 200 validation for choosing the learning
   rate; 600 test): the regime where a pretrained encoder is expected to pay off (BERT's small
   GLUE tasks), fixed before any of these runs. The pretraining run saw these sentences as
   unlabeled text (as BERT's pretraining corpus covers its tasks' domain); the shuffled variants
   and the labels are new to it.
4. Fine-tunes with the issue-9 path (experiments/finetune.py, train.objective=classification,
   init_from the pretrained run) and trains the same architecture, same tokenizer and same
   schedule from a random initialization. Each arm gets its own learning rate, the best of --lrs
   by VALIDATION accuracy (seed 0); the test set is only scored with that rate, for every seed.
   Reports test accuracy per seed, mean, sample standard deviation and min/median/max per arm,
   and the per-seed differences (a seed fixes the data order and the new head's init in both).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

SPECIALS = "[PAD],[UNK],[CLS],[SEP],[MASK]"


def load_experiment(name: str, argument: str = ""):
  """experiments/<name>.py's get_config(argument)."""
  from llmjax.experiment import load_config
  return load_config(name, argument)


def make_task(out: Path, n_train: int = 200, n_val: int = 200, n_test: int = 600,
              seed: int = 0) -> dict:
  """original-vs-shuffled sentences from the embedded corpus: train/val/test.jsonl."""
  from llmjax.data.sources import embedded_documents
  sentences = []
  for doc in embedded_documents():
    for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
      words = s.split()
      if 8 <= len(words) <= 20 and len(set(words)) > 4:
        sentences.append(words)
  rng = random.Random(seed)
  rng.shuffle(sentences)
  total = n_train + n_val + n_test
  rows = []
  for words in sentences[:total]:
    if rng.random() < 0.5:
      shuffled = words[:]
      while shuffled == words:
        rng.shuffle(shuffled)
      rows.append({"text": " ".join(shuffled), "label": "shuffled"})
    else:
      rows.append({"text": " ".join(words), "label": "original"})
  if len(rows) < total:
    raise SystemExit(f"only {len(rows)} sentences for the task, {total} asked for")
  out.mkdir(parents=True, exist_ok=True)
  parts = {"train": rows[:n_train], "val": rows[n_train:n_train + n_val],
           "test": rows[n_train + n_val:]}
  for name, part in parts.items():
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
  return {"train": n_train, "val": n_val, "test": n_test,
          "source": "embedded corpus sentences of 8-20 words",
          "labels": "original / shuffled (same words, random order), 50/50"}


def pretrain(workdir: Path, steps: int) -> dict:
  from llmjax import config as cfglib
  from llmjax import loop
  c = load_experiment("bert_small", "")
  c.train.update(steps=steps, progress=False, eval_every=100)
  cfglib.validate(c, 1)
  t0 = time.perf_counter()
  result = loop.train(c, str(workdir))
  curve = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  curve = [{k: r[k] for k in ("step", "loss", "mlm_accuracy", "nsp_accuracy")}
           for r in curve if r.get("split") == "val"]
  return {"final": result, "val_curve": curve, "seconds": time.perf_counter() - t0}


def unigram_baseline(workdir: Path) -> dict:
  """Accuracy of always predicting the most frequent non-special training token, on the masked
  positions of the same validation batches the run's evaluation scores."""
  from llmjax import objectives, runs
  from llmjax.config import model_config
  from llmjax.data import load_dataset, load_tokenizer
  config = runs.read_config(workdir)
  tokenizer = load_tokenizer(workdir)
  obj = objectives.build(config, model_config(config, tokenizer.vocab_size))
  ds = obj.wrap_dataset(load_dataset(config.data, config.train.seed, tokenizer))
  counts = np.bincount(ds.train, minlength=tokenizer.vocab_size)
  counts[ds.vocab.special] = 0
  top = int(counts.argmax())
  hits = total = 0.0
  for i in range(config.train.eval_batches):
    b = ds.batch("val", i, config.data.batch_size)
    hits += float(((b["targets"] == top) * b["weights"]).sum())
    total += float(b["weights"].sum())
  return {"token": tokenizer.id_to_token(top), "accuracy": hits / total, "masked_tokens": total}


def from_random_weights(c, pretrained: Path) -> None:
  """The scratch arm: the fine-tuning config `c` keeps the pretrained run's architecture and
  tokenizer but starts from random weights."""
  c.train.init_from = ""
  c.data.update(tokenizer="sentencepiece", tokenizer_path=str(pretrained / "tokenizer.model"),
                special_tokens=SPECIALS)


def classify(workdir: Path, task: Path, pretrained: Path, seed: int, steps: int,
             from_scratch: bool, lr: float, batch_size: int, split: str) -> dict:
  """Fine-tunes (or trains from scratch) on task/train.jsonl; scores task/<split>.jsonl."""
  from llmjax import config as cfglib
  from llmjax import loop
  c = load_experiment("finetune", str(pretrained))
  c.data.update(path=str(task / "train.jsonl"), val_path=str(task / f"{split}.jsonl"),
                packing=False, batch_size=batch_size)
  c.optim.update(lr=lr, warmup_steps=10, schedule="linear", min_lr_ratio=0.0)
  c.train.update(objective="classification", epochs=0, steps=steps, eval_every=0, seed=seed,
                 keep_best="", progress=False, tensorboard=False, log_every=50)
  if from_scratch:
    from_random_weights(c, pretrained)
  cfglib.validate(c, 1)
  t0 = time.perf_counter()
  result = loop.train(c, str(workdir))
  return {"seed": seed, "lr": lr, "split": split, "accuracy": result["accuracy"],
          "macro_f1": result["macro_f1"], "loss": result["loss"],
          "seconds": time.perf_counter() - t0}


def spread(values):
  return {"mean": statistics.mean(values),
          "std": statistics.stdev(values) if len(values) > 1 else 0.0,
          "min": min(values), "median": statistics.median(values), "max": max(values)}


ARMS = ("pretrained", "scratch")


def summarize_arms(result: dict, accuracy, seeds) -> None:
  """Adds each arm's test-accuracy spread over the seeds and pretrained minus scratch per seed to
  `result` (arm -> {"lr", "runs"}), and prints them; `accuracy(run)` reads a run's test accuracy.
  Shared by this benchmark and benchmarks/bert_topic.py."""
  for arm in ARMS:
    result[arm]["accuracy"] = spread([accuracy(r) for r in result[arm]["runs"]])
  diffs = [accuracy(a) - accuracy(b)
           for a, b in zip(result["pretrained"]["runs"], result["scratch"]["runs"])]
  result["pretrained_minus_scratch"] = {"per_seed": diffs, **spread(diffs)}
  for arm in ARMS:
    a = result[arm]["accuracy"]
    print(f"{arm} (lr {result[arm]['lr']:g} chosen on val): test accuracy mean {a['mean']:.4f} "
          f"std {a['std']:.4f} min {a['min']:.4f} median {a['median']:.4f} max {a['max']:.4f} "
          f"over seeds {seeds}")
  print(f"pretrained - scratch per seed: {', '.join(f'{x:+.4f}' for x in diffs)} "
        f"(mean {result['pretrained_minus_scratch']['mean']:+.4f})")


def write_report(path, report: dict) -> None:
  """The JSON report, written atomically (a stopped run never leaves half a file)."""
  out = Path(path)
  tmp = out.with_suffix(out.suffix + ".tmp")
  tmp.write_text(json.dumps(report, indent=2, default=float) + "\n")
  os.replace(tmp, out)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--pretrain_steps", type=int, default=1000)
  p.add_argument("--finetune_steps", type=int, default=100)
  p.add_argument("--finetune_batch", type=int, default=16)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--lrs", default="3e-4,1e-3",
                 help="learning rates tried per arm on the validation split (seed 0)")
  p.add_argument("--n_train", type=int, default=200)
  p.add_argument("--n_val", type=int, default=200)
  p.add_argument("--n_test", type=int, default=600)
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "bert_finetune.json"))
  args = p.parse_args()
  work = Path(args.workdir)
  seeds = [int(s) for s in args.seeds.split(",")]
  lrs = [float(x) for x in args.lrs.split(",")]
  report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()} {platform.processor() or ''} CPU (shared)".strip(),
            "command": " ".join(sys.argv)}
  report["pretrain"] = pretrain(work / "pretrained", args.pretrain_steps)
  report["unigram_baseline"] = unigram_baseline(work / "pretrained")
  report["task"] = make_task(work / "task", args.n_train, args.n_val, args.n_test)

  def run(arm, seed, lr, split):
    r = classify(work / f"{arm}_{split}_{seed}_lr{lr:g}", work / "task", work / "pretrained",
                 seed, args.finetune_steps, from_scratch=arm == "scratch", lr=lr,
                 batch_size=args.finetune_batch, split=split)
    print(f"{arm} seed {seed} lr {lr:g} {split} accuracy {r['accuracy']:.4f}", flush=True)
    return r

  result = {}
  for arm in ARMS:  # the learning rate is chosen on validation, never on test
    selection = [run(arm, seeds[0], lr, "val") for lr in lrs]
    best = max(selection, key=lambda r: r["accuracy"])["lr"]
    result[arm] = {"lr_selection": selection, "lr": best}
  for seed in seeds:
    for arm in ARMS:
      result[arm].setdefault("runs", []).append(run(arm, seed, result[arm]["lr"], "test"))
  report["classification"] = result
  final = report["pretrain"]["final"]
  print(f"MLM accuracy {final['mlm_accuracy']:.4f} (unigram baseline "
        f"{report['unigram_baseline']['accuracy']:.4f}), NSP accuracy {final['nsp_accuracy']:.4f}")
  summarize_arms(result, lambda r: r["accuracy"], seeds)
  write_report(args.out, report)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
