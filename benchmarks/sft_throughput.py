"""SFT vs pretraining throughput on the same model and batch shape, and packing efficiency.

Pretraining batches: inputs/targets windows of the embedded corpus. SFT batches: packed
prompt/completion examples cut from the same corpus (a paragraph's first sentence -> the rest),
carrying per-token loss weights, segment ids and restarted positions. Both run the jitted train
step the loop runs (llmjax.program), timed alternately (A, B, A, B, ...) so machine load hits
both alike. Also prints the packing efficiency (share of positions holding a real token) of
first-fit packing against one example per row.

  PYTHONPATH=$PWD python benchmarks/sft_throughput.py --out=benchmarks/sft_throughput.json
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


def corpus_examples(limit: int):
  """(prompt, completion) pairs from the embedded corpus: a paragraph's first sentence and the
  paragraph's next sentences, so lengths vary as real SFT data does."""
  from llmjax.data.sources import embedded_documents
  out = []
  for doc in embedded_documents():
    for para in doc.split("\n\n"):
      para = " ".join(para.split())
      if ". " not in para or len(para) < 40:
        continue
      head, rest = para.split(". ", 1)
      out.append({"prompt": head + ". ", "completion": rest[:400]})
      if len(out) >= limit:
        return out
  return out


def config(path: str, seq_len: int, batch: int, packing: bool):
  from llmjax.config import default_config
  c = default_config()
  c.model.update(num_layers=4, num_heads=4, embed_dim=128, max_seq_len=seq_len, use_bias=False,
                 scan_layers=False, position="learned")
  c.data.update(path=path, tokenizer="byte", seq_len=seq_len, batch_size=batch, packing=packing,
                truncate="right")
  c.train.update(steps=1000, grad_accum_steps=1)
  return c


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--steps", type=int, default=10, help="timed steps per round")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--out", default="")
  args = p.parse_args()

  import jax
  from llmjax import config as cfglib
  from llmjax import program as programlib
  from llmjax import sharding as shd
  from llmjax.data import load_dataset

  tmp = Path(tempfile.mkdtemp(prefix="llmjax_sft_"))
  task = tmp / "sft.jsonl"
  task.write_text("".join(json.dumps(r) + "\n" for r in corpus_examples(4000)))
  setups = {}
  for name, path, packing in (("pretrain", "", False), ("sft", str(task), True)):
    c = config(path, args.seq_len, args.batch_size, packing)
    cfglib.validate(c, num_devices=jax.device_count())
    data = load_dataset(c.data, 0)
    mesh = shd.make_mesh(c)
    prog = programlib.build(c, mesh, cfglib.model_config(c, data.tokenizer.vocab_size))
    state = prog.init(jax.random.key(0))
    batches = [shd.put_batch(data.batch("train", i, args.batch_size), mesh) for i in range(4)]
    with prog.scope():
      state, m = prog.train_step(state, batches[0])  # compile
      jax.block_until_ready(m)
    setups[name] = [prog, state, batches, data]

  padded_cfg = config(str(task), args.seq_len, args.batch_size, False)
  padded = load_dataset(padded_cfg.data, 0)
  sft_data = setups["sft"][3]
  eff = {"packed": sft_data.efficiency(), "one_per_row": padded.efficiency(),
         "rows_per_epoch_packed": sft_data.rows_per_epoch(),
         "rows_per_epoch_one_per_row": padded.rows_per_epoch()}
  print(f"packing efficiency: {eff['packed']:.1%} packed ({eff['rows_per_epoch_packed']} rows) vs "
        f"{eff['one_per_row']:.1%} one example per row ({eff['rows_per_epoch_one_per_row']} rows)")

  tokens = args.batch_size * args.seq_len
  rates = {"pretrain": [], "sft": []}
  for _ in range(args.rounds):
    for name in ("pretrain", "sft"):
      prog, state, batches, _ = setups[name]
      with prog.scope():
        t0 = time.perf_counter()
        for i in range(args.steps):
          state, m = prog.train_step(state, batches[i % len(batches)])
        jax.block_until_ready(m)
        rates[name].append(tokens * args.steps / (time.perf_counter() - t0))
      setups[name][1] = state
  summary = {k: {"min": min(v), "median": statistics.median(v), "max": max(v)}
             for k, v in rates.items()}
  ratios = [s / p for p, s in zip(rates["pretrain"], rates["sft"])]
  result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, {jax.devices()[0].platform}",
            "args": vars(args), "tokens_per_s": summary,
            "sft_over_pretrain": {"min": min(ratios), "median": statistics.median(ratios),
                                  "max": max(ratios)},
            "packing_efficiency": eff}
  for k, v in summary.items():
    print(f"{k:8s} tokens/s min {v['min']:,.0f} median {v['median']:,.0f} max {v['max']:,.0f}")
  print(f"SFT / pretraining (per round): median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
  print(json.dumps(result, indent=2))
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  main()
