"""Classification bar: topic classification of text cut from the embedded corpus.

Snippets (~120 characters, at word boundaries) of four topics of Python's documentation (the
corpus shipped with Python that llmjax pretrains on by default): the debugger (pdb), format
strings, the import system, and mapping types. The label is the topic. Every 5th snippet of each
topic is held out for test; snippets do not overlap, so no test text is ever trained on. A pretrained base gets a classifier head (train.objective=classification,
model.num_labels from the data) and is fine-tuned; held-out accuracy and macro-F1 are measured
with `llmjax.eval` (as `python -m llmjax.evaluate` does). The bar (issue 9): accuracy >= 95%.

  PYTHONPATH=$PWD python benchmarks/finetune_classify.py [--base=RUN] --out=benchmarks/finetune_classify.json
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
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

TOPICS = {"debugger": "debugger", "formatstrings": "format strings", "import": "import system",
          "typesmapping": "mapping types"}


def snippets(text: str, size: int) -> list[str]:
  words, out, cur = text.split(), [], []
  for w in words:
    cur.append(w)
    if sum(len(x) + 1 for x in cur) >= size:
      out.append(" ".join(cur))
      cur = []
  return out


def topic_sets(size: int = 120, every: int = 5):
  from pydoc_data.topics import topics
  train, test = [], []
  for key, label in TOPICS.items():
    for i, t in enumerate(snippets(topics[key], size)):
      (test if i % every == every - 1 else train).append({"text": t, "label": label})
  return train, test


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--base", default="", help="a pretrained run (default: pretrain one)")
  p.add_argument("--pretrain_steps", type=int, default=300)
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--lr", type=float, default=5e-4)
  p.add_argument("--workdir", default="")
  p.add_argument("--out", default="")
  args = p.parse_args()

  from finetune_addition import base_config, write_jsonl
  from llmjax import loop
  from llmjax.eval.runner import evaluate_file
  sys.path.insert(0, str(ROOT / "experiments"))
  import finetune

  tmp = Path(args.workdir or tempfile.mkdtemp(prefix="llmjax_classify_"))
  tmp.mkdir(parents=True, exist_ok=True)
  train, test = topic_sets()
  train_path, test_path = write_jsonl(tmp / "train.jsonl", train), write_jsonl(tmp / "test.jsonl", test)
  base = args.base or str(tmp / "base")
  if not (Path(base) / "checkpoints").exists():
    loop.train(base_config(args.pretrain_steps), base)

  c = finetune.get_config(base)
  c.data.update(path=train_path, val_path=test_path, batch_size=16)
  c.optim.update(lr=args.lr, warmup_steps=20)
  c.train.update(objective="classification", epochs=args.epochs, eval_every=0,
                 keep_best="", progress=False, tensorboard=False, log_every=20)
  work = str(tmp / "ft")
  t0 = time.perf_counter()
  final = loop.train(c, work)
  seconds = time.perf_counter() - t0
  summary, _ = evaluate_file(work, test_path, batch_size=32)
  result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus", "args": vars(args),
            "train_examples": len(train), "test_examples": len(test), "labels": list(TOPICS.values()),
            "finetune_s": seconds, "val_accuracy_from_training": final.get("accuracy"),
            "test_accuracy": summary.get("accuracy"), "test_macro_f1": summary.get("macro_f1")}
  print(f"topic classification: accuracy {result['test_accuracy']:.3f}, macro-F1 "
        f"{result['test_macro_f1']:.3f} on {len(test)} held-out snippets ({seconds:.0f} s)")
  print(json.dumps(result, indent=2))
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  main()
