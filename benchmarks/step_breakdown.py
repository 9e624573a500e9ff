"""Where a training step's time goes: host batch work, forward, forward+backward, the full step.

Builds the real `llmjax.loop.Run` for a config (same jitted train_step as the loop) and times each
part separately, medians over interleaved repeats, and counts the ops XLA compiled the step into
(fusions, gathers, scatters, dots, collectives). Used for benchmarks/RESULTS.md.

  python benchmarks/step_breakdown.py                                   # shakespeare_char
  python benchmarks/step_breakdown.py --set model.scan_layers=False --set mesh.cpu_devices=1
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


_PENDING = []  # async step outputs, waited for inside the timed region


def _timeit(fn, iters: int) -> float:
  start = time.perf_counter()
  for _ in range(iters):
    fn()
  import jax
  jax.block_until_ready(_PENDING)
  return (time.perf_counter() - start) / iters * 1e3


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="experiments/shakespeare_char.py")
  parser.add_argument("--set", action="append", default=[], help="key=value config override")
  parser.add_argument("--iters", type=int, default=30)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--hlo", action="store_true", help="print the op histogram of the step")
  args = parser.parse_args()

  from llmjax.experiment import load_config, override
  config = load_config(ROOT / args.config)
  config.data.path = str(SHAKESPEARE) if SHAKESPEARE.exists() else ""
  override(config, args.set)

  from llmjax import config as cfglib
  from llmjax.cpu_devices import configure_cpu_devices
  cfglib.validate(config)
  configure_cpu_devices(config)
  import jax
  from llmjax import loop, train as trainlib

  with tempfile.TemporaryDirectory() as workdir:
    run = loop.Run(config, workdir)
    state = run.initial_state()
    loss_fn = trainlib.make_loss_fn(run.model)
    batch = run.batch("train", 0)
    rng = jax.random.key(0)
    with run.program.scope():  # the mesh + rules the loop traces under (jax.set_mesh)
      fwd = jax.jit(lambda p, b: loss_fn(p, b, rng, True)[0])
      grad = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, rng, True)[0]))
      params = jax.tree.map(lambda x: x.copy(), state.params)  # the step donates state
      fwd(params, batch).block_until_ready()
      jax.block_until_ready(grad(params, batch))
      box = {"state": state, "step": 0}

      def step_sync():
        box["state"], m = run.train_step(box["state"], run.batch("train", box["step"]))
        box["step"] += 1
        jax.block_until_ready(m)

      def step_async():  # what the loop does between log steps: no sync
        box["state"], m = run.train_step(box["state"], run.batch("train", box["step"]))
        box["step"] += 1
        _PENDING[:] = [m]

      step_sync()
      parts = {
          "host: sample + put batch": lambda: run.batch("train", 1),
          "forward (loss)": lambda: fwd(params, batch).block_until_ready(),
          "forward + backward": lambda: jax.block_until_ready(grad(params, batch)),
          "train step, synced each step": step_sync,
          "train step, async (loop)": lambda: (step_async(), None)[1],
      }
      times = collections.defaultdict(list)
      for _ in range(args.repeats):
        for name, fn in parts.items():
          times[name].append(_timeit(fn, args.iters))
      out = {name: statistics.median(v) for name, v in times.items()}
      for name, ms in out.items():
        print(f"{name:>30}: {ms:7.2f} ms")

      if args.hlo:
        text = run.train_step.lower(box["state"], batch).compile().as_text()
        ops = collections.Counter(re.findall(r"= \S+ (\w[\w-]*)\(", text))
        keep = ("fusion", "gather", "scatter", "dot", "all-reduce", "convolution", "custom-call",
                "while", "copy", "transpose", "reduce")
        hist = {k: v for k, v in sorted(ops.items()) if any(k.startswith(p) for p in keep)}
        print("compiled step ops:", json.dumps(hist))
        out["ops"] = hist
    print(json.dumps({"devices": jax.device_count(), "overrides": args.set, **out}))


if __name__ == "__main__":
  main()
