"""The speedrun's step: a Muon step against an AdamW step, and which settings make it cheaper
(Newton-Schulz dtype and iterations, gradient accumulation).

Builds the real `llmjax.loop.Run` (same jitted train step as the loop) of the speedrun recipe
(experiments/shakespeare_speedrun.py) once per variant in one process, then times the variants
interleaved: `--steps` train steps per timing (dispatched asynchronously, as the loop does),
`--rounds` rounds; prints median/min/max ms per step and writes JSON. Variants are
name:key=value,key=value over the recipe; the name `optax` (any overrides) builds its Muon with
optax.contrib.muon instead of llmjax.muon (the unstacked float32 reference).

  python benchmarks/speedrun_step.py                      # the default variants below
  python benchmarks/speedrun_step.py --variant=adamw:optim.optimizer=adamw --variant=ns3:optim.muon_ns_steps=3
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
DEFAULT_VARIANTS = [  # overrides of the recipe (bf16 Newton-Schulz, 3 micro-batches of 4)
    "recipe:",
    "acc1:train.grad_accum_steps=1",
    "f32_ns:optim.muon_ns_dtype=float32",
    "optax:optim.muon_ns_dtype=float32",
    "adamw:optim.optimizer=adamw",
    "adamw_acc1:optim.optimizer=adamw,train.grad_accum_steps=1",
]


def recipe():
  from llmjax.experiment import load_config
  config = load_config("shakespeare_speedrun")
  config.data.path = str(SHAKESPEARE) if SHAKESPEARE.exists() else ""
  return config


def apply(config, overrides: str):
  """"section.field=value,..." set on the config (values as Python literals where they parse)."""
  from llmjax.experiment import override
  return override(config, filter(None, overrides.split(",")))


@contextlib.contextmanager
def optax_muon():
  """llmjax.muon.muon replaced by optax.contrib.muon (same arguments), for the reference."""
  from optax import contrib
  from llmjax import muon
  original = muon.muon

  def reference(lr, dims, *, beta, ns_steps, ns_dtype, weight_decay, weight_decay_mask,
                adam_learning_rate, adam_b1, adam_b2, adam_weight_decay, eps=1e-8):
    del ns_dtype
    return contrib.muon(lr, ns_steps=ns_steps, beta=beta, eps=eps, weight_decay=weight_decay,
                        weight_decay_mask=weight_decay_mask, adam_b1=adam_b1, adam_b2=adam_b2,
                        adam_learning_rate=adam_learning_rate,
                        adam_weight_decay=adam_weight_decay, muon_weight_dimension_numbers=dims)
  muon.muon = reference
  try:
    yield
  finally:
    muon.muon = original


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variant", action="append", default=[])
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "speedrun_step.json"))
  args = p.parse_args()
  variants = args.variant or DEFAULT_VARIANTS
  from llmjax import config as cfglib
  from llmjax.cpu_devices import configure_cpu_devices
  base = recipe()
  cfglib.validate(base)
  configure_cpu_devices(base)
  import jax
  from llmjax import loop

  runs = {}
  with contextlib.ExitStack() as stack:
    for spec in variants:
      name, _, overrides = spec.partition(":")
      config = apply(recipe(), overrides)
      cfglib.validate(config)
      workdir = stack.enter_context(tempfile.TemporaryDirectory())
      with optax_muon() if name == "optax" else contextlib.nullcontext():
        run = loop.Run(config, workdir)
      state = run.initial_state()
      batches = [run.batch("train", i) for i in range(args.steps)]
      with run.program.scope():
        start = time.perf_counter()
        state, m = run.train_step(state, batches[0])
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - start
      runs[name] = {"run": run, "state": state, "batches": batches, "times": [],
                    "compile_s": compile_s}
      print(f"{name}: {overrides or '(recipe)'}; first step (compile) {compile_s:.1f} s", flush=True)

    for r in range(args.rounds):
      for name, v in runs.items():
        with v["run"].program.scope():
          start = time.perf_counter()
          for b in v["batches"]:
            v["state"], m = v["run"].train_step(v["state"], b)
          jax.block_until_ready(m)
          v["times"].append((time.perf_counter() - start) / args.steps * 1e3)
  report = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_1min": os.getloadavg()[0], "steps": args.steps, "rounds": args.rounds,
            "variants": {}}
  for name, v in runs.items():
    t = v["times"]
    report["variants"][name] = {"ms_median": statistics.median(t), "ms_min": min(t),
                                "ms_max": max(t), "ms": t, "compile_s": v["compile_s"]}
    print(f"{name:>10}: {statistics.median(t):7.2f} ms/step (min {min(t):.2f}, max {max(t):.2f})")
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2))
  print(f"wrote {out} (load {report['load_1min']:.1f})")


if __name__ == "__main__":
  main()
