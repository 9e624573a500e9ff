"""Which dots XLA:CPU runs in bf16, and what the float32 fallback costs (issue 12, session 5).

XLA:CPU (jaxlib 0.10) runs a bf16 x bf16 -> f32 dot in YNNPACK only in some forms; a dot whose
operand is a transpose that XLA folds into it (the weight gradient x.T @ g, a batched attention
dot over transposed heads) gets both operands converted to float32 and runs in float32 (Eigen or
YNNPACK), at about half the speed. This script shows both sides:

1. the compiled train step of a config: every dot's operand dtypes (llmjax's bf16 matmuls and
   bf16 attention should leave no float32 dot when model.matmul_dtype=bfloat16);
2. fwd+bwd of the dense layers of a config's shapes, timed interleaved: the plain autodiff-style
   backward (`g @ w.T`, `x.T @ g`: XLA folds the transposes, so the gradient dots run in float32)
   against `llmjax.model.layers.bf16_matmul` (dx as a dot contracting both last axes, dw with a
   materialized x.T: all three dots stay bf16).

  python benchmarks/xla_cpu_dots.py                          # shakespeare_char shapes
  python benchmarks/xla_cpu_dots.py --shape=cpu_6l384 --iters=3
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

# name -> (overrides of experiments/shakespeare_char.py, dense shapes [tokens, in, out] of one
# layer's micro-batch: q, k, v, out, fc, proj)
SHAPES = {
    "shakespeare_char": ({}, [(256, 128, 128)] * 4 + [(256, 128, 512), (256, 512, 128)]),
    "cpu_6l384": ({"model.num_layers": 6, "model.num_heads": 6, "model.embed_dim": 384,
                   "model.max_seq_len": 256, "data.seq_len": 256, "data.batch_size": 8,
                   "train.grad_accum_steps": 1},
                  [(2048, 384, 384)] * 4 + [(2048, 384, 1536), (2048, 1536, 384)]),
}


def dot_operand_types(hlo_text: str) -> collections.Counter:
  """(lhs dtype, rhs dtype) of every dot in an optimized HLO module, counted."""
  types = {m.group(1): m.group(2) for m in re.finditer(r"%(\S+) = (\w+)\[", hlo_text)}
  return collections.Counter((types[a], types[b])
                             for a, b in re.findall(r" dot\(%(\S+), %(\S+)\)", hlo_text))


def train_step_dots(overrides: dict) -> dict:
  from llmjax import config as cfglib, loop
  from llmjax.experiment import load_config
  config = load_config("shakespeare_char")
  config.data.path = str(SHAKESPEARE) if SHAKESPEARE.exists() else ""
  config.mesh.cpu_processes = 1
  for key, value in overrides.items():
    section, field = key.split(".", 1)
    config[section][field] = value
  cfglib.validate(config)
  with tempfile.TemporaryDirectory() as workdir:
    run = loop.Run(config, workdir)
    state = run.initial_state()
    with run.program.scope():
      text = run.train_step.lower(state, run.batch("train", 0)).compile().as_text()
  return {f"{a} x {b}": n for (a, b), n in dot_operand_types(text).items()}


def dense_timings(shapes, iters: int, rounds: int) -> dict:
  import jax
  import jax.numpy as jnp
  from llmjax.model.layers import bf16_matmul

  def dot(a, b):
    return jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                   preferred_element_type=jnp.float32)

  @jax.custom_vjp
  def transposes_folded(x, w):  # the backward as autodiff writes it
    return dot(x, w)
  transposes_folded.defvjp(lambda x, w: (dot(x, w), (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))),
                           lambda s, g: (dot(g, s[1].T), dot(s[0].T, g)))

  key = jax.random.key(0)
  ws = [jax.random.normal(key, (i, o)) * 0.02 for _, i, o in shapes]
  xs = [jax.random.normal(key, (t, i)) for t, i, _ in shapes]
  fns, dots = {}, {}
  for name, mm in (("backward with folded transposes", transposes_folded),
                   ("llmjax bf16_matmul", bf16_matmul)):
    loss = lambda ws, xs, mm=mm: sum(jnp.sum(jnp.tanh(mm(x, w))) for w, x in zip(ws, xs))  # noqa: E731
    fns[name] = jax.jit(jax.grad(loss, argnums=(0, 1)))
    dots[name] = {f"{a} x {b}": n for (a, b), n in
                  dot_operand_types(fns[name].lower(ws, xs).compile().as_text()).items()}
    jax.block_until_ready(fns[name](ws, xs))
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      for _ in range(iters):
        out = fn(ws, xs)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / iters * 1e3)
  return {name: {"ms_median": statistics.median(t), "ms_min": min(t), "ms_max": max(t),
                 "dots": dots[name]} for name, t in times.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shape", default="shakespeare_char", choices=sorted(SHAPES))
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "xla_cpu_dots.json"))
  args = parser.parse_args(argv)
  import os
  overrides, shapes = SHAPES[args.shape]
  report = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "shape": args.shape,
            "load": os.getloadavg()[0],
            "train_step_dots": train_step_dots(overrides),
            "dense_fwd_bwd": dense_timings(shapes, args.iters, args.rounds)}
  print(f"compiled train step ({args.shape}), dots by operand dtypes: {report['train_step_dots']}")
  for name, r in report["dense_fwd_bwd"].items():
    print(f"{name:>32}: {r['ms_median']:7.2f} ms ({r['ms_min']:.2f}-{r['ms_max']:.2f}) "
          f"fwd+bwd of one layer's dense matmuls; dots {r['dots']}")
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(report, indent=1))
  print(f"wrote {args.out} (1-min load {report['load']:.1f})")
  return report


if __name__ == "__main__":
  main()
