"""Corpus preparation speed and memory (issue 13): `python -m llmjax.data.prepare` with one worker
vs a pool of N, against a bare one-process loop over the same documents with the same tokenizer
library (sentencepiece), on a synthetic JSONL corpus of 100+ MB made in a temporary directory from
the embedded Python docs; then the pool's peak memory on a corpus twice as large.

  python benchmarks/prepare_corpus.py [--mb=120] [--rounds=3] [--workers=2]
  -> prints a table, writes benchmarks/prepare_corpus.json

Arms run interleaved (round-robin, order rotated every round) so that load from other users of a
shared machine falls on all of them alike; each figure is min/median/max over rounds, with the load
average read before and after each run. Peak memory is the largest sum of the resident sizes of the
whole process tree (the pool's workers included), sampled every 20 ms.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BARE_LOOP = r"""
import json, sys, glob, numpy as np, sentencepiece as spm
sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
tokens = 0
for path in sorted(glob.glob(sys.argv[2])):
  with open(path, encoding="utf-8") as f:
    for line in f:
      ids = np.asarray(sp.encode(json.loads(line)["text"]), np.uint16)
      tokens += len(ids) + 1
print(tokens)
"""


def make_corpus(directory: Path, megabytes: float, files: int = 16, seed: int = 0) -> int:
  """JSONL files of embedded-doc documents in a random order, each with a numbered header."""
  import numpy as np
  from llmjax.data.sources import embedded_documents
  docs = embedded_documents()
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)
  per_file, written, n = int(megabytes * 1e6 / files), 0, 0
  for i in range(files):
    size = 0
    with open(directory / f"part-{i:03d}.jsonl", "w", encoding="utf-8") as f:
      while size < per_file:
        line = json.dumps({"text": f"Document {n}.\n" + docs[rng.integers(len(docs))]}) + "\n"
        f.write(line)
        size += len(line.encode())
        n += 1
    written += size
  return written


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
  """Wall time and peak resident memory of the process tree (sum over the pool)."""
  import psutil
  import resource
  load_before = os.getloadavg()[0]
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu_before = usage.ru_utime + usage.ru_stime
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  root, peak = psutil.Process(proc.pid), 0
  while proc.poll() is None:
    try:
      procs = [root] + root.children(recursive=True)
      peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
    except psutil.Error:
      pass
    time.sleep(0.02)
  out, err = proc.communicate()
  wall = time.perf_counter() - t0
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the pool's workers included (reaped)
  cpu = usage.ru_utime + usage.ru_stime - cpu_before
  if proc.returncode != 0:
    raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
  return {"seconds": wall, "cpu_seconds": cpu, "peak_rss_mb": peak / 1e6, "load_before": load_before,
          "load_after": os.getloadavg()[0]}


def spread(values):
  return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--mb", type=float, default=120.0, help="corpus size (MB of JSONL)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--sp_vocab_size", type=int, default=8192)
  p.add_argument("--arms", default="bare,one,pool",
                 help="which of bare (loop), one (prepare, 1 worker), pool (N workers) to time")
  p.add_argument("--memory_rounds", type=int, default=1,
                 help="pool runs on the 1x and 2x corpora (interleaved) for the memory check")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "prepare_corpus.json"))
  args = p.parse_args(argv)

  from llmjax.data.sources import embedded_documents
  from llmjax.data.tokenizers import train_sentencepiece
  model = train_sentencepiece("\n\n".join(embedded_documents()), args.sp_vocab_size).model_file
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  tmp = Path(tempfile.mkdtemp(prefix="llmjax-prepare-bench-"))
  try:
    size = make_corpus(tmp / "corpus", args.mb)
    big = make_corpus(tmp / "corpus2x", 2 * args.mb, seed=1)
    print(f"corpus: {size / 1e6:.1f} MB of JSONL (and {big / 1e6:.1f} MB for the memory check) "
          f"in {tmp}; sentencepiece {args.sp_vocab_size} ids", flush=True)

    def prepare_cmd(corpus, out, workers):
      return [sys.executable, "-m", "llmjax.data.prepare", f"--input={corpus}/*.jsonl",
              f"--output={out}", "--tokenizer=sentencepiece", f"--tokenizer_path={model}",
              f"--num_workers={workers}", "--noprogress", "--val_fraction=0.01"]

    arms = {
        "bare_loop_1_process": lambda r: [sys.executable, "-c", BARE_LOOP, model,
                                          f"{tmp}/corpus/*.jsonl"],
        "prepare_1_worker": lambda r: prepare_cmd(tmp / "corpus", tmp / f"o1_{r}", 1),
        f"prepare_{args.workers}_workers": lambda r: prepare_cmd(tmp / "corpus", tmp / f"oN_{r}",
                                                                 args.workers),
    }
    keep = {"bare": "bare_loop_1_process", "one": "prepare_1_worker",
            "pool": f"prepare_{args.workers}_workers"}
    arms = {keep[a]: arms[keep[a]] for a in args.arms.split(",") if a}
    samples = {name: [] for name in arms}
    names = list(arms)
    for r in range(args.rounds):
      order = names[r % len(names):] + names[:r % len(names)]
      for name in order:
        m = run_measured(arms[name](r), env)
        samples[name].append(m)
        print(f"round {r} {name}: {m['seconds']:.1f} s ({m['cpu_seconds']:.1f} CPU s), peak {m['peak_rss_mb']:.0f} MB, load "
              f"{m['load_before']:.1f}->{m['load_after']:.1f}", flush=True)
      for d in tmp.glob("o*_*"):
        shutil.rmtree(d)
    pool_name = f"prepare_{args.workers}_workers"
    memory = {"1x": [], "2x": []}
    for r in range(args.memory_rounds):
      for label, corpus in (("1x", "corpus"), ("2x", "corpus2x"))[::1 if r % 2 == 0 else -1]:
        m = run_measured(prepare_cmd(tmp / corpus, tmp / f"m{label}_{r}", args.workers), env)
        memory[label].append(m)
        print(f"memory round {r} {label} corpus {pool_name}: {m['seconds']:.1f} s "
              f"({m['cpu_seconds']:.1f} CPU s), peak "
              f"{m['peak_rss_mb']:.0f} MB, load {m['load_before']:.1f}->{m['load_after']:.1f}",
              flush=True)
        shutil.rmtree(tmp / f"m{label}_{r}")
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
  finally:
    shutil.rmtree(tmp, ignore_errors=True)

  results = {}
  for name, ms in samples.items():
    secs = [m["seconds"] for m in ms]
    results[name] = {"seconds": spread(secs), "mb_per_s": spread([size / 1e6 / s for s in secs]),
                     "cpu_seconds": spread([m["cpu_seconds"] for m in ms]),
                     "peak_rss_mb": spread([m["peak_rss_mb"] for m in ms]),
                     "load": spread([m["load_before"] for m in ms] + [m["load_after"] for m in ms])}
  med = lambda name: results[name]["seconds"]["median"] if name in results else float("nan")  # noqa: E731
  base, one, pool = med("bare_loop_1_process"), med("prepare_1_worker"), med(pool_name)
  report = {
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
      "uptime_at_end": uptime, "corpus_mb": size / 1e6, "rounds": args.rounds,
      "command": " ".join(["python", "benchmarks/prepare_corpus.py", *(argv or sys.argv[1:])]),
      "results": results,
      "speedup_vs_bare_loop": base / pool, "speedup_vs_prepare_1_worker": one / pool,
      # On a loaded machine wall time measures the share of the cores a run got. CPU seconds do
      # not depend on load: N x (CPU of 1 worker) / (CPU of the pool) is the speedup N idle cores
      # would give if the pool's work spreads evenly (an estimate, labelled as such).
      "estimated_speedup_on_idle_cores": (
          args.workers * results["prepare_1_worker"]["cpu_seconds"]["median"]
          / results[pool_name]["cpu_seconds"]["median"])
      if "prepare_1_worker" in results and pool_name in results else None,
      "memory_check": {label: {"peak_rss_mb": spread([m["peak_rss_mb"] for m in ms]),
                               "seconds": spread([m["seconds"] for m in ms]),
                               "load": spread([m["load_before"] for m in ms])}
                       for label, ms in memory.items() if ms},
      "corpus_2x_mb": big / 1e6,
  }
  print(f"\n{'arm':<24} {'seconds min/med/max':>24} {'MB/s (median)':>14} {'peak RSS MB (max)':>18}")
  for name, r in results.items():
    s = r["seconds"]
    print(f"{name:<24} {s['min']:>8.1f}/{s['median']:.1f}/{s['max']:.1f} "
          f"{r['mb_per_s']['median']:>14.2f} {r['peak_rss_mb']['max']:>18.0f}")
  if report["estimated_speedup_on_idle_cores"]:
    print(f"CPU seconds: 1 worker {results['prepare_1_worker']['cpu_seconds']['median']:.1f}, "
          f"{pool_name} {results[pool_name]['cpu_seconds']['median']:.1f} -> estimated speedup on "
          f"{args.workers} idle cores {report['estimated_speedup_on_idle_cores']:.2f}x")
  print(f"speedup of {pool_name} (medians): {report['speedup_vs_bare_loop']:.2f}x vs the bare loop, "
        f"{report['speedup_vs_prepare_1_worker']:.2f}x vs prepare with 1 worker")
  if memory["1x"]:
    print(f"peak memory, {pool_name}: max {max(m['peak_rss_mb'] for m in memory['1x']):.0f} MB at "
          f"{size / 1e6:.0f} MB, max {max(m['peak_rss_mb'] for m in memory['2x']):.0f} MB at "
          f"{big / 1e6:.0f} MB")
  print(uptime)
  Path(args.out).write_text(json.dumps(report, indent=2))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
