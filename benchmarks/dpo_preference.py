"""DPO bar: a synthetic preference with one right answer, learned by LoRA DPO on a tiny model.

Prompts are three random letters and a question mark ("kqd?"); the preferred answer is "Y" when
the first letter comes before 'n' and "N" otherwise (one character: chosen and rejected differ in
exactly one token, the decision). Train and held-out prompts are disjoint.

1. SFT a small character-level model from scratch on the prompts with "Y" / "N" drawn at
   random (so it answers in the format but has no preference).
2. DPO with LoRA adapters (train.objective=dpo) from the SFT run; the reference policy is the SFT
   model (the base with the adapters off).
3. On the held-out prompts, before (SFT) and after (DPO): preference accuracy (the policy gives
   the chosen answer a higher log-probability than the rejected one; DPO's reward accuracy is
   also logged), and how often the greedy answer is the preferred one.

  PYTHONPATH=$PWD python benchmarks/dpo_preference.py --out=benchmarks/dpo_preference.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import string
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def answer(prompt: str) -> str:
  return "Y" if prompt[0] < "n" else "N"


def prompts(seed: int, count: int) -> list[str]:
  rng = random.Random(seed)
  seen = set()
  while len(seen) < count:
    seen.add("".join(rng.choice(string.ascii_lowercase) for _ in range(3)) + "?")
  out = sorted(seen)
  rng.shuffle(out)
  return out


def datasets(seed: int, n_train: int, n_test: int):
  every = prompts(seed, n_train + n_test)
  train, test = every[:n_train], every[n_train:]
  rng = random.Random(seed + 1)
  sft = [{"prompt": p, "completion": rng.choice(["Y", "N"])} for p in train]

  def pair(p):
    right = answer(p)
    return {"prompt": p, "chosen": right, "rejected": "N" if right == "Y" else "Y"}
  return sft, [pair(p) for p in train], [pair(p) for p in test]


def write_jsonl(path: Path, records) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def sft_config(train: str, steps: int):
  from llmjax.config import default_config
  c = default_config()
  c.model.update(num_layers=2, num_heads=4, embed_dim=64, max_seq_len=16, dropout=0.0)
  c.data.update(path=train, seq_len=16, batch_size=32, packing=False, val_fraction=0.1,
                train_on="all")  # the prompts too: letter features the DPO adapters can use
  c.optim.update(lr=3e-3, warmup_steps=20, weight_decay=0.0)
  c.train.update(steps=steps, eval_every=0, eval_batches=2, log_every=50, checkpoint_every=0,
                 sample_tokens=0, progress=False, tensorboard=False)
  return c


def dpo_config(sft: str, train: str, test: str, steps: int, beta: float, rank: int,
               rpo_alpha: float = 0.0):
  from llmjax import runs
  c = sft_config(train, steps)
  c.model = runs.read_config(sft).model
  c.data.update(val_path=test)
  c.lora.update(rank=rank, alpha=2.0 * rank, targets="all")
  c.optim.update(lr=2e-3, warmup_steps=10)
  c.train.update(objective="dpo", dpo_beta=beta, dpo_rpo_alpha=rpo_alpha, init_from=sft,
                 eval_batches=0)
  return c


def judge(workdir: str, pairs: list[dict]) -> dict:
  """Held-out preference accuracy (policy log-probabilities) and greedy answers."""
  import jax
  import numpy as np

  from llmjax import runs
  from llmjax.generate import generate
  from llmjax.objectives.dpo import sequence_logps
  run = runs.load_run(workdir)
  tok = run.tokenizer

  def logps(side):
    """Log-probabilities of every pair's `side` response, one padded batch, one jitted call."""
    seqs = [(tok.encode(p["prompt"] + p[side]), len(tok.encode(p["prompt"]))) for p in pairs]
    width = max(len(ids) for ids, _ in seqs) - 1
    inputs = np.zeros((len(seqs), width), np.int32)
    targets = np.zeros((len(seqs), width), np.int32)
    weights = np.zeros((len(seqs), width), np.float32)
    for r, (ids, n_prompt) in enumerate(seqs):
      inputs[r, :len(ids) - 1], targets[r, :len(ids) - 1] = ids[:-1], ids[1:]
      weights[r, n_prompt - 1:len(ids) - 1] = 1.0
    fn = jax.jit(lambda p, i, t, w: sequence_logps(run.model.apply({"params": p}, i), t, w))
    return np.asarray(fn(run.params, inputs, targets, weights))

  prefer = list(logps("chosen") > logps("rejected"))
  outs = generate(run.model, run.params, [tok.encode(p["prompt"]) for p in pairs], 4,
                  temperature=0.0)
  follows = [tok.decode(o).startswith(p["chosen"]) for o, p in zip(outs, pairs)]
  answered = [tok.decode(o).startswith(("Y", "N")) for o in outs]
  return {"preference_accuracy": float(np.mean(prefer)), "greedy_follows": float(np.mean(follows)),
          "greedy_answers_y_or_n": float(np.mean(answered))}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sft_steps", type=int, default=300)
  p.add_argument("--dpo_steps", type=int, default=300)
  p.add_argument("--beta", type=float, default=0.1)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--rpo_alpha", type=float, default=1.0, help="train.dpo_rpo_alpha (0: plain DPO)")
  p.add_argument("--train_prompts", type=int, default=1500)
  p.add_argument("--test_prompts", type=int, default=200)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workdir", default="")
  p.add_argument("--out", default="")
  args = p.parse_args()
  from llmjax import loop
  tmp = Path(args.workdir or tempfile.mkdtemp(prefix="llmjax_dpo_"))
  tmp.mkdir(parents=True, exist_ok=True)
  sft, train, test = datasets(args.seed, args.train_prompts, args.test_prompts)
  paths = {"sft": write_jsonl(tmp / "sft.jsonl", sft), "train": write_jsonl(tmp / "train.jsonl", train),
           "test": write_jsonl(tmp / "test.jsonl", test)}
  result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus", "args": vars(args)}
  t0 = time.perf_counter()
  loop.train(sft_config(paths["sft"], args.sft_steps), str(tmp / "sft"))
  result["sft_s"] = time.perf_counter() - t0
  result["before"] = judge(str(tmp / "sft"), test)
  print(f"SFT model on held-out prompts: {result['before']}", flush=True)
  t0 = time.perf_counter()
  final = loop.train(dpo_config(str(tmp / "sft"), paths["train"], paths["test"], args.dpo_steps,
                                args.beta, args.rank, args.rpo_alpha), str(tmp / "dpo"))
  result["dpo_s"] = time.perf_counter() - t0
  result["dpo_val"] = final
  result["after"] = judge(str(tmp / "dpo"), test)
  print(f"DPO (LoRA rank {args.rank}) on held-out prompts: {result['after']}; DPO eval: {final}",
        flush=True)
  print(json.dumps(result, indent=2))
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  main()
