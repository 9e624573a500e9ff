"""Runs nanoGPT's own train.py (../shared/ref/nanoGPT, read-only) as a reference process.

Nothing of nanoGPT is copied into llmjax: its folder is copied to a temporary directory (its
prepare.py writes next to itself), tiny Shakespeare is prepared there once, and each run is a
whole `python train.py ...` process on the CPU with torch's default threads, as a new user would
run it (see ../shared/ref/README.md). This module builds the command lines and parses the log.

Used by benchmarks/train_throughput.py (--nanogpt) and experiments/shakespeare_speedrun.py.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
NANOGPT = SHARED / "ref" / "nanoGPT"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"

# nanoGPT's shakespeare_char CPU recipe (its README), and the compute-bound shape of issue 12.
CONFIGS = {
    "shakespeare_char": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    "cpu_6l384": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8),
}
ITER = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms", re.M)
EVAL = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)", re.M)


def available() -> str | None:
  """None when nanoGPT and tiny Shakespeare are here; else why not (for a clean skip)."""
  if not (NANOGPT / "train.py").exists():
    return f"nanoGPT's train.py not found at {NANOGPT} (../shared is absent)"
  if not SHAKESPEARE.exists():
    return f"tiny Shakespeare not found at {SHAKESPEARE}"
  try:
    import torch  # noqa: F401
  except ImportError:
    return "torch is not installed (nanoGPT needs it)"
  return None


def prepare(workdir: str | Path | None = None) -> Path:
  """A private copy of nanoGPT with data/shakespeare_char/{train,val}.bin prepared."""
  ref = Path(workdir or tempfile.mkdtemp(prefix="nanogpt_ref_")) / "nanoGPT"
  shutil.copytree(NANOGPT, ref)
  data = ref / "data" / "shakespeare_char"
  shutil.copy(SHAKESPEARE, data / "input.txt")  # present: prepare.py never downloads
  subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)
  return ref


def command(config: str, iters: int, *, eval_interval: int | None = None, eval_iters: int = 1,
            log_interval: int = 1, out_dir: str = "out-bench", **extra) -> list[str]:
  """train.py's command line for `iters` iterations of `config` (no checkpoint unless it evaluates
  after iteration 0; eval_interval=None evaluates only at iteration 0, with eval_iters batches)."""
  args = dict(CONFIGS[config], device="cpu", compile=False, dropout=0.0, max_iters=iters,
              lr_decay_iters=2000, eval_interval=eval_interval or 10**9, eval_iters=eval_iters,
              log_interval=log_interval, out_dir=out_dir, always_save_checkpoint=False)
  args.update(extra)
  return [sys.executable, "train.py", "config/train_shakespeare_char.py",
          *(f"--{k}={v}" for k, v in args.items())]


def run(ref: Path, cmd: list[str], timeout: float = 7200) -> dict:
  """Runs one train.py process; -> wall seconds, per-iteration (iter, loss, ms), evals."""
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ref, capture_output=True, text=True, timeout=timeout)
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    raise RuntimeError(f"nanoGPT failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
  iters = [(int(i), float(l), float(t)) for i, l, t in ITER.findall(proc.stdout)]
  evals = [(int(s), float(tr), float(v)) for s, tr, v in EVAL.findall(proc.stdout)]
  return {"wall_s": wall, "iters": iters, "evals": evals}


def interval_ms(iters: list[tuple[int, float, float]], per: int, skip: int) -> list[float]:
  """Mean ms/iteration over consecutive blocks of `per` logged iterations, after the first `skip`
  iterations (start-up and iteration 0's evaluation), like llmjax's logged intervals."""
  times = [t for i, _, t in iters if i >= skip]
  return [sum(times[k:k + per]) / per for k in range(0, len(times) - per + 1, per)]
