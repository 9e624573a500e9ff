"""XLA CPU options, measured: the real jitted train step of a config under each XLA_FLAGS value.

Each flag runs in a fresh process (XLA reads XLA_FLAGS once, when the backend starts), one
process after the other, `--rounds` times round-robin; each process builds the config's
`llmjax.loop.Run` in one process (mesh.cpu_processes=1), compiles, then times `--steps` train
steps `--repeats` times and prints one JSON line: wall ms and CPU ms (user+sys of the process) per
step, medians over the repeats. CPU ms is the steadier figure on a shared machine.

  python benchmarks/xla_flags.py --config=speedrun                       # the default flags
  python benchmarks/xla_flags.py --config=cpu_6l384 --steps=4 --repeats=2 \
      --flag= --flag=--xla_cpu_prefer_vector_width=512

Configs: the names of benchmarks/train_throughput.py's CONFIGS, or `speedrun`
(experiments/shakespeare_speedrun.py). Results: benchmarks/RESULTS.md (issue 12).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
DEFAULT_FLAGS = [
    "",
    "--xla_cpu_experimental_ynn_fusion_type=dot",
    "--xla_cpu_experimental_ynn_fusion_type=",
    "--xla_cpu_experimental_ynn_fusion_type=individual_dot,dot,eltwise,reduce",
    "--xla_cpu_use_xnnpack=false",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_prefer_vector_width=512",
]


def load_config(name: str):
  import train_throughput as tt
  from llmjax.experiment import load_config as load_experiment
  if name == "speedrun":
    path, overrides = ROOT / "experiments" / "shakespeare_speedrun.py", {}
  else:
    experiment, overrides, _ = tt.CONFIGS[name]
    path = ROOT / experiment
  config = load_experiment(path)
  for key, value in overrides.items():
    section, field = key.split(".", 1)
    config[section][field] = value
  config.mesh.cpu_processes = 1
  config.data.path = str(tt.SHAKESPEARE) if tt.SHAKESPEARE.exists() else ""
  return config


def worker(args) -> dict:
  from llmjax import config as cfglib
  from llmjax.cpu_devices import configure_cpu_devices
  config = load_config(args.config)
  cfglib.validate(config)
  configure_cpu_devices(config)
  import jax
  from llmjax import loop
  with tempfile.TemporaryDirectory() as workdir:
    run = loop.Run(config, workdir)
    state = run.initial_state()
    batches = [run.batch("train", i) for i in range(args.steps)]
    wall, cpu = [], []
    with run.program.scope():
      state, metrics = run.train_step(state, batches[0])
      jax.block_until_ready(metrics)
      for _ in range(args.repeats):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for batch in batches:
          state, metrics = run.train_step(state, batch)
        jax.block_until_ready(metrics)
        after = resource.getrusage(resource.RUSAGE_SELF)
        wall.append((time.perf_counter() - start) / args.steps * 1e3)
        cpu.append((after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
                   / args.steps * 1e3)
  return {"flags": os.environ.get("XLA_FLAGS", ""), "config": args.config,
          "wall_ms": statistics.median(wall), "wall_min_ms": min(wall),
          "cpu_ms": statistics.median(cpu), "load_1min": os.getloadavg()[0]}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="speedrun")
  p.add_argument("--flag", action="append", default=None, help="an XLA_FLAGS value ('' = none)")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--rounds", type=int, default=1)
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "xla_flags.json"))
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    print(json.dumps(worker(args)), flush=True)
    return
  rows = []
  for _ in range(args.rounds):
    for flag in args.flag if args.flag is not None else DEFAULT_FLAGS:
      env = dict(os.environ, XLA_FLAGS=flag,
                 PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
      cmd = [sys.executable, __file__, "--worker", f"--config={args.config}",
             f"--steps={args.steps}", f"--repeats={args.repeats}"]
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
      if proc.returncode:
        print(f"{flag!r}: failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
        continue
      row = json.loads(proc.stdout.strip().splitlines()[-1])
      rows.append(row)
      print(f"{flag or '(none)':>75}: {row['wall_ms']:8.1f} ms wall, {row['cpu_ms']:8.1f} ms CPU "
            f"per step (load {row['load_1min']:.1f})", flush=True)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "rows": rows}, indent=2))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
