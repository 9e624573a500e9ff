"""Tiny Shakespeare speedrun: the least wall-clock time to nanoGPT's iteration-2000 validation loss.

Target: 1.919, nanoGPT's shakespeare_char CPU recipe (4L/4H/128, block 64, batch 12) after 2000
iterations, estimated over 200 random validation batches (`--eval_iters=200`).

The recipe (a config, like every experiment):
  python -m llmjax.main --config=experiments/shakespeare_speedrun.py --workdir=runs/speedrun \\
      --config.data.path=../shared/data/tinyshakespeare/input.txt

The race: nanoGPT's own train.py (2000 iterations, then its 200-batch evaluation) and this recipe
(its steps, then 200 x 12 validation windows, the same count) as whole processes, interleaved,
wall time from start to exit, each with the validation loss it reached:
  python experiments/shakespeare_speedrun.py --race --rounds=2
JSON: benchmarks/out/shakespeare_speedrun.json. Results and what each change gave:
benchmarks/RESULTS.md ("Issue 12").
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.919
STEPS = 380  # one seed (0), val loss over 200 x 12 windows, the recipe below: 360 -> 1.9313,
# 380 -> 1.9135; with Muon lr 0.02: 380 -> 1.9240, 400 -> 1.9134 (RESULTS.md, issue 12)


def get_config():
  from llmjax.experiment import load_config
  c = load_config(Path(__file__).with_name("shakespeare_char.py"))
  # Same model as nanoGPT's; what changes is how it is trained.
  c.model.update(matmul_dtype="bfloat16")   # bf16 x bf16 -> f32 matmuls (AVX-512 BF16)
  # One process: Muon's Newton-Schulz update is replicated work that data-parallel processes
  # cannot split, and single-threaded workers run it slower (2 processes: 81-89 ms/step, 59.2 s
  # for the whole run; 1 process: 65-69 ms/step, 43.5 s; benchmarks/RESULTS.md, issue 12).
  c.mesh.cpu_processes = 1
  # Muon (llmjax/muon.py) on the layer matrices: its Newton-Schulz matmuls on bf16 operands
  # (float32 accumulation): the same loss at 500 steps (1.8774 vs 1.8783), the update ~2x faster.
  # AdamW on embeddings and norms at lr 3e-2 (was 3e-3): 400 steps reach 1.912 instead of 1.932;
  # Muon lr 0.025 (was 0.02): 380 steps reach 1.9135 instead of 1.9240.
  c.optim.update(optimizer="muon", muon_lr=0.025, muon_momentum=0.95, muon_ns_dtype="bfloat16",
                 lr=3e-2,                    # AdamW on embeddings and norms
                 warmup_steps=20, schedule="linear", min_lr_ratio=0.0, weight_decay=0.0)
  # Each batch of 12 as 3 micro-batches of 4 (as shakespeare_char does; the same update up to
  # rounding): 187 vs 248 ms/step in one interleaved A/B under load (benchmarks/speedrun_step.py,
  # RESULTS.md); at 400 steps (Muon lr 0.02) 1.9134 (1.9123 without).
  c.train.update(steps=STEPS, grad_accum_steps=3, eval_every=0, eval_batches=200,  # final eval only
                 log_every=100, checkpoint_every=0, sample_tokens=0, tensorboard=False,
                 progress=False)
  return c


def _llmjax_run(data: str, workdir: str, extra: list[str]) -> dict:
  cmd = [sys.executable, "-m", "llmjax.main", f"--config={Path(__file__).resolve()}",
         f"--workdir={workdir}", f"--config.data.path={data}", *extra]
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=7200)
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    raise RuntimeError(f"llmjax failed:\n{proc.stderr[-3000:]}")
  vals = [float(v) for v in re.findall(r"val loss ([\d.]+)", proc.stdout)]
  return {"wall_s": wall, "val_loss": vals[-1] if vals else None}


def race(args) -> dict:
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import nanogpt_train as ng
  why = ng.available()
  if why:
    print(f"note: cannot race: {why}")
    return {}
  reference = ng.prepare(tempfile.mkdtemp(prefix="speedrun_nanogpt_"))
  rows = []
  for r in range(args.rounds):
    load = os.getloadavg()[0]
    cmd = ng.command("shakespeare_char", 2000, eval_interval=2000, eval_iters=200,
                     log_interval=100)
    nano = ng.run(reference, cmd)
    nano_val = nano["evals"][-1][2]
    with tempfile.TemporaryDirectory(prefix="speedrun_llmjax_") as workdir:
      ours = _llmjax_run(str(ng.SHAKESPEARE), workdir, args.set)
    row = {"round": r + 1, "load": load, "nanogpt_s": nano["wall_s"], "nanogpt_val": nano_val,
           "llmjax_s": ours["wall_s"], "llmjax_val": ours["val_loss"],
           "time_ratio": ours["wall_s"] / nano["wall_s"]}
    rows.append(row)
    print(f"round {r + 1}: nanoGPT {nano['wall_s']:.1f} s (val {nano_val:.4f}); llmjax "
          f"{ours['wall_s']:.1f} s (val {ours['val_loss']:.4f}); time ratio "
          f"{row['time_ratio']:.2f} (load {load:.1f})", flush=True)
  import shutil
  shutil.rmtree(reference.parent, ignore_errors=True)  # the temporary copy of nanoGPT
  ratios = [r["time_ratio"] for r in rows]
  report = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "target": TARGET,
            "steps": STEPS, "overrides": args.set, "rounds": rows,
            "time_ratio_median": statistics.median(ratios), "time_ratio_min": min(ratios),
            "time_ratio_max": max(ratios),
            "reached_target": all(r["llmjax_val"] <= TARGET for r in rows)}
  print(f"llmjax / nanoGPT wall time: median {report['time_ratio_median']:.2f} "
        f"({min(ratios):.2f}-{max(ratios):.2f}); target {TARGET} reached in every round: "
        f"{report['reached_target']}")
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2))
  print(f"wrote {out}")
  return report


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--race", action="store_true", help="time nanoGPT and this recipe side by side")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--set", action="append", default=[],
                 help="extra --config.X=Y flags for the llmjax run (e.g. --set=--config.train.steps=600)")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "shakespeare_speedrun.json"))
  args = p.parse_args(argv)
  if not args.race:
    p.error("pass --race (or train the recipe with llmjax.main; see the module docstring)")
  return race(args)


if __name__ == "__main__":
  main()
