"""Training throughput of the real llmjax training loop: tokens/s, ms/step and MFU.

Each measurement runs `llmjax.loop.train` itself (batch sampling from llmjax.data, putting the
batch on the mesh, the jitted train step, the progress bar, and fetching + writing metrics every
`log_every` steps) in a fresh subprocess, and reads the step times the loop logs to metrics.jsonl.
The first log interval (it includes compilation) is dropped; periodic eval, checkpoints and the
text sample are switched off so they do not pollute the intervals.

These 2-core machines are shared and noisy, so variants are measured *interleaved*: round 1 runs
every variant once, round 2 again, ...; the figures are medians over all intervals of all rounds.
With --nanogpt, nanoGPT's own train.py (../shared/ref/nanoGPT, run from a temporary copy with
torch's default threads; benchmarks/nanogpt_train.py) takes part in the same rounds on both configs:
its per-iteration times from its own log, grouped into intervals of the same length as llmjax's.
Each round reports the ratio nanoGPT ms / llmjax ms from that round's medians; the summary is the
median ratio over rounds with its min and max. Every round also measures the host's matmul peak
(fp32, and bf16 x bf16 with float32 accumulation), so MFU is against a peak of the same hour.
Without ../shared, --nanogpt prints why and measures llmjax alone. --twin adds the older PyTorch
re-implementation (benchmarks/nanogpt_reference.py) on shakespeare_char.

  python benchmarks/train_throughput.py                       # both configs, 3 rounds
  python benchmarks/train_throughput.py --nanogpt --rounds=5  # the figures in RESULTS.md
  python benchmarks/train_throughput.py --configs=shakespeare_char \
      --variant=base: --variant=unrolled:model.scan_layers=False     # A/B any config fields
  python benchmarks/train_throughput.py --tiny                # seconds; used by the tests

Results: benchmarks/RESULTS.md. JSON: --out (default benchmarks/out/train_throughput.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
# LLMJAX_SHARED_DIR: where ../shared is (tests point it at a missing directory to behave as a
# fresh clone does)
SHARED = Path(os.environ.get("LLMJAX_SHARED_DIR") or ROOT.parent / "shared")
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"

# name -> (experiment file, overrides, steps per log interval). The compute-bound config is the
# brief's "6 layers, 6 heads, 384 wide, block 256, batch 8" on the shakespeare_char recipe.
CONFIGS = {
    "shakespeare_char": ("experiments/shakespeare_char.py", {}, 50),
    "cpu_6l384": ("experiments/shakespeare_char.py",
                  {"model.num_layers": 6, "model.num_heads": 6, "model.embed_dim": 384,
                   "model.max_seq_len": 256, "data.seq_len": 256, "data.batch_size": 8,
                   # the fastest settings measured for this shape (issue 12, RESULTS.md,
                   # session 5): bf16 x bf16 -> f32 matmuls and attention (val loss unchanged),
                   # one process, each batch of 8 as 4 micro-batches of 2 (619 ms/step against
                   # 713-735 for two processes of 4 or 2x2 rows, quiet, 3 interleaved rounds)
                   "train.grad_accum_steps": 4, "mesh.cpu_processes": 1,
                   "model.matmul_dtype": "bfloat16"}, 5),
    # --tiny: a 2-layer model, a few steps; checks the plumbing in seconds.
    "tiny": ("experiments/shakespeare_char.py",
             {"model.num_layers": 2, "model.embed_dim": 64, "model.num_heads": 2}, 4),
}


def _parse_variant(text: str) -> tuple[str, dict]:
  """'name:key=value,key=value' -> (name, {key: value}) with values parsed as Python literals."""
  name, _, rest = text.partition(":")
  overrides = {}
  for item in filter(None, rest.split(",")):
    key, _, value = item.partition("=")
    overrides[key.strip()] = value.strip()
  return name or "default", overrides


# ------------------------------------------------------------------------------------------------
# Worker: one measurement in this process (run by the driver as a subprocess).

def worker(spec: dict) -> dict:
  """Runs llmjax.loop.train for spec['intervals'] + 1 log intervals; returns the logged step times."""
  from llmjax import config as cfglib
  from llmjax.cpu_devices import configure_cpu_devices
  from llmjax import loop
  from llmjax import metrics as mlib
  from llmjax.experiment import load_config

  experiment, overrides, log_every = CONFIGS[spec["config"]]
  config = load_config(ROOT / experiment)
  flat = dict(overrides)
  for key, value in spec.get("overrides", {}).items():
    if key.startswith("env."):  # env.XLA_FLAGS=... : an environment variable for this worker
      os.environ[key[4:]] = value
    else:
      flat[key] = _literal(value)
  log_every = int(flat.pop("train.log_every", log_every))
  steps = log_every * (spec["intervals"] + 1)
  flat.update({"data.path": spec["data"], "train.steps": steps, "train.log_every": log_every,
               "train.eval_every": 0, "train.eval_batches": 1, "train.checkpoint_every": 0,
               "train.sample_tokens": 0, "train.progress": True, "train.tensorboard": True,
               # the lr schedule is part of the config, but keep the shape of a full run's steps
               "optim.decay_steps": config.train.steps})
  for key, value in flat.items():
    section, field = key.split(".", 1)
    config[section][field] = value
  cfglib.validate(config)
  # mesh.cpu_processes (issue 12): as llmjax.main does, this worker re-launches itself as the
  # processes, all on one workdir; rank 0 prints the result line.
  from llmjax import cpu_processes
  worker_of = cpu_processes.join(config)
  configure_cpu_devices(config)  # as llmjax.main does, before JAX starts
  count = cpu_processes.choose(config) if worker_of is None else 1
  if count > 1 and not cpu_processes.why_not(config):
    with tempfile.TemporaryDirectory(prefix="llmjax_bench_") as workdir:
      spec = dict(spec, workdir=workdir)
      status = cpu_processes.launch(count, [sys.argv[0], "--worker", json.dumps(spec)])
    sys.exit(status)
  from llmjax import distributed
  distributed.initialize(config)
  import jax
  cfglib.validate(config, num_devices=jax.device_count())
  with _workdir(spec.get("workdir")) as workdir:
    devnull = open(os.devnull, "w")
    stderr, sys.stderr = sys.stderr, devnull  # the progress bar still runs; keep the pipe quiet
    try:
      loop.train(config, workdir)
    finally:
      sys.stderr = stderr
    records = [r for r in mlib.read_metrics(workdir) if r.get("split") == "train"]
    from llmjax.data import load_tokenizer
    vocab = load_tokenizer(workdir).vocab_size  # 65 on tiny Shakespeare, more on other corpora
  from llmjax.model import num_params
  from llmjax.config import model_config
  intervals = [r["step_time_ms"] for r in records[1:]]  # the first interval includes compilation
  cfg = model_config(config, vocab)
  return {"step_time_ms": intervals, "devices": jax.device_count(),
          "processes": jax.process_count(),
          "tokens_per_step": config.data.batch_size * config.data.seq_len,
          "flops_per_token": mlib.flops_per_token(cfg, config.data.seq_len),
          "params": num_params(cfg), "vocab_size": vocab,
          "final_loss": records[-1]["loss"] if records else None}


def _workdir(given: str | None):
  """The launcher's shared workdir in a cpu_processes worker, else a fresh temporary one."""
  import contextlib
  if given:
    return contextlib.nullcontext(given)
  return tempfile.TemporaryDirectory(prefix="llmjax_bench_")


def _literal(value: str):
  import ast
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


def nanogpt_worker(spec: dict) -> dict:
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import nanogpt_reference as ref
  import torch
  if spec.get("threads"):
    torch.set_num_threads(spec["threads"])
  trainer = ref.Trainer(spec["data"], log_interval=1)
  per = spec["log_every"]
  ref.time_iterations(trainer, per)  # warm-up interval, like the dropped first llmjax interval
  intervals = [ref.time_iterations(trainer, per) * 1e3 for _ in range(spec["intervals"])]
  import torch
  return {"step_time_ms": intervals, "threads": torch.get_num_threads(),
          "torch": torch.__version__, "params": trainer.num_params(),
          "tokens_per_step": trainer.hp["batch_size"] * trainer.hp["block_size"]}


# ------------------------------------------------------------------------------------------------
# Driver.

def _run_worker(spec: dict, timeout: float) -> dict:
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    raise RuntimeError(f"benchmark worker {spec} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def host_peaks(size: int = 2048, repeats: int = 5) -> dict:
  """The host's matmul peaks now (best of `repeats`, both cores): fp32, and bf16 x bf16 with
  float32 accumulation (what a bf16 model's matmuls run as)."""
  import jax
  import jax.numpy as jnp
  out = {}
  for name, dtype, acc in (("fp32", jnp.float32, None), ("bf16_f32acc", jnp.bfloat16, jnp.float32)):
    a = jnp.ones((size, size), dtype)
    mm = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=acc))
    mm(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
      start = time.perf_counter()
      mm(a).block_until_ready()
      best = min(best, time.perf_counter() - start)
    out[name] = 2 * size**3 / best
  return out


def _run_nanogpt(module, reference, config_name: str, per: int, intervals: int) -> dict:
  """One whole nanoGPT train.py process: `intervals` intervals of `per` iterations after 5
  start-up iterations (iteration 0 also runs its evaluation)."""
  skip = 5
  result = module.run(reference, module.command(config_name, skip + per * intervals))
  hp = module.CONFIGS[config_name]
  return {"step_time_ms": module.interval_ms(result["iters"], per, skip),
          "wall_s": result["wall_s"], "tokens_per_step": hp["batch_size"] * hp["block_size"],
          "final_loss": result["iters"][-1][1], "source": str(module.NANOGPT)}


def summarize(samples: list[float], tokens_per_step: int, flops_per_token: float | None,
              peak: float) -> dict:
  ms = statistics.median(samples)
  out = {"ms_per_step": ms, "tokens_per_sec": tokens_per_step / ms * 1e3,
         "ms_per_step_min": min(samples), "ms_per_step_max": max(samples), "samples": len(samples)}
  if flops_per_token:
    out["mfu"] = flops_per_token * tokens_per_step / (ms / 1e3) / peak
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", default="shakespeare_char,cpu_6l384",
                      help=f"comma-separated, from {', '.join(CONFIGS)}")
  parser.add_argument("--variant", action="append", default=[],
                      help="NAME:key=value,... config overrides measured side by side (repeatable); "
                      "env.VAR=value sets an environment variable (e.g. env.XLA_FLAGS=...)")
  parser.add_argument("--nanogpt", action="store_true",
                      help="also run nanoGPT's own train.py (../shared/ref/nanoGPT) in every round")
  parser.add_argument("--twin", action="store_true",
                      help="also time benchmarks/nanogpt_reference.py (a PyTorch re-implementation)")
  parser.add_argument("--nanogpt_threads", type=int, default=0,
                      help="torch threads for the twin (0: torch's default, all cores)")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
  parser.add_argument("--intervals", type=int, default=3, help="timed log intervals per round")
  parser.add_argument("--data", default=str(SHAKESPEARE) if SHAKESPEARE.exists() else "",
                      help="text corpus ('' = the embedded corpus); default tiny Shakespeare")
  parser.add_argument("--peak_flops", type=float, default=0.0, help="host peak FLOP/s for MFU; "
                      "0 = measure an fp32 matmul once")
  parser.add_argument("--tiny", action="store_true", help="a 2-layer model, 1 round: seconds")
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "train_throughput.json"))
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.worker:
    spec = json.loads(args.worker)
    result = nanogpt_worker(spec) if spec.get("kind") == "nanogpt" else worker(spec)
    if spec.get("kind") == "nanogpt":
      print(json.dumps(result))
    else:
      import jax
      if jax.process_index() == 0:  # with mesh.cpu_processes, rank 0 reports for the run
        print(json.dumps(result))
    return result

  if args.tiny:
    configs, args.rounds, args.intervals = ["tiny"], 1, 2
    if args.nanogpt:  # a quick check of the nanoGPT plumbing on its smaller config
      configs = ["shakespeare_char"]
  else:
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
  for name in configs:
    if name not in CONFIGS:
      parser.error(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
  variants = [_parse_variant(v) for v in args.variant] or [("llmjax", {})]
  if (args.nanogpt or args.twin) and not args.data:
    parser.error("--nanogpt/--twin need a text corpus: pass --data=PATH (tiny Shakespeare)")
  reference = None
  if args.nanogpt:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import nanogpt_train
    why = nanogpt_train.available()
    if why:
      print(f"note: skipping nanoGPT: {why}", flush=True)
    else:
      reference = nanogpt_train.prepare(tempfile.mkdtemp(prefix="llmjax_nanogpt_"))

  started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
  samples: dict[tuple[str, str], list[float]] = {}
  info: dict[tuple[str, str], dict] = {}
  rounds: list[dict] = []  # per round: peaks, load, each job's median ms
  for round_index in range(args.rounds):
    this = {"load": os.getloadavg(), "ms": {}}
    if not args.peak_flops:
      this["peaks"] = host_peaks()
    rounds.append(this)
    for config_name in configs:
      jobs = [(v, {"config": config_name, "overrides": o, "intervals": args.intervals,
                   "data": args.data}) for v, o in variants]
      if args.twin and config_name == "shakespeare_char":
        jobs.append(("twin", {"kind": "nanogpt", "intervals": args.intervals, "data": args.data,
                              "log_every": CONFIGS[config_name][2],
                              "threads": args.nanogpt_threads}))
      if reference is not None and config_name in nanogpt_train.CONFIGS:
        jobs.append(("nanogpt", {"kind": "nanogpt_train", "config": config_name}))
      for variant_name, spec in jobs:
        if spec.get("kind") == "nanogpt_train":
          result = _run_nanogpt(nanogpt_train, reference, config_name, CONFIGS[config_name][2],
                                args.intervals)
        else:
          result = _run_worker(spec, timeout=1800)
        key = (config_name, variant_name)
        this["ms"][f"{config_name}/{variant_name}"] = statistics.median(result["step_time_ms"])
        samples.setdefault(key, []).extend(result.pop("step_time_ms"))
        info[key] = result
        print(f"round {round_index + 1}/{args.rounds} {config_name:>16} {variant_name:>12}: "
              f"{this['ms'][f'{config_name}/{variant_name}']:8.1f} ms/step this round, "
              f"{statistics.median(samples[key]):8.1f} median so far (load {this['load'][0]:.1f})",
              flush=True)

  if reference is not None:
    shutil.rmtree(reference.parent, ignore_errors=True)  # the temporary copy of nanoGPT
  if args.peak_flops:
    peak, peak_source, bf16_peak = args.peak_flops, "--peak_flops", None
  else:
    peak = statistics.median(r["peaks"]["fp32"] for r in rounds)
    bf16_peak = statistics.median(r["peaks"]["bf16_f32acc"] for r in rounds)
    peak_source = "fp32 matmul 2048^2 measured every round (median)"
  report = {"date": started, "machine": f"{os.cpu_count()}-core CPU", "peak_flops": peak,
            "peak_source": peak_source, "bf16_f32acc_peak_flops": bf16_peak,
            "rounds": args.rounds, "intervals_per_round": args.intervals,
            "data": args.data or "embedded corpus", "command": " ".join([sys.executable] + sys.argv),
            "per_round": rounds, "results": {}}
  for (config_name, variant_name), values in samples.items():
    meta = info[(config_name, variant_name)]
    if "flops_per_token" not in meta:  # nanoGPT: the same architecture, so the same FLOPs
      meta["flops_per_token"] = next((m["flops_per_token"] for (c, _), m in info.items()
                                      if c == config_name and "flops_per_token" in m), None)
    entry = summarize(values, meta["tokens_per_step"], meta.get("flops_per_token"), peak)
    entry.update({k: v for k, v in meta.items() if k != "tokens_per_step"})
    entry["overrides"] = dict(CONFIGS[config_name][1], **dict(variants).get(variant_name, {}))
    report["results"].setdefault(config_name, {})[variant_name] = entry
  for config_name, entries in report["results"].items():
    for reference_name in ("nanogpt", "twin"):
      if reference_name not in entries:
        continue
      for name, entry in entries.items():
        if name in ("nanogpt", "twin"):
          continue
        ratios = [r["ms"][f"{config_name}/{reference_name}"] / r["ms"][f"{config_name}/{name}"]
                  for r in rounds]
        entry[f"speedup_vs_{reference_name}_per_round"] = ratios
        entry[f"speedup_vs_{reference_name}"] = statistics.median(ratios)
    if bf16_peak:
      for entry in entries.values():
        if "mfu" in entry:
          entry["mfu_vs_bf16_peak"] = entry["mfu"] * peak / bf16_peak

  load = [r["load"][0] for r in rounds]
  print(f"\npeak {peak / 1e9:.0f} GFLOP/s ({peak_source})"
        + (f", bf16->fp32 {bf16_peak / 1e9:.0f} GFLOP/s" if bf16_peak else "")
        + f"; medians of {args.rounds} interleaved rounds; 1-min load {min(load):.1f}-{max(load):.1f}")
  print(f"{'config':>16} {'variant':>12} {'ms/step':>9} {'min':>7} {'max':>7} {'tokens/s':>10} "
        f"{'MFU':>7} {'vs nanoGPT (min-max over rounds)':>32}")
  for config_name, entries in report["results"].items():
    for variant_name, e in entries.items():
      mfu = f"{e['mfu']:.1%}" if "mfu" in e else "-"
      speed = ""
      for ref_name in ("nanogpt", "twin"):
        if f"speedup_vs_{ref_name}" in e:
          per = e[f"speedup_vs_{ref_name}_per_round"]
          speed += f" {e[f'speedup_vs_{ref_name}']:.2f}x ({min(per):.2f}-{max(per):.2f}) vs {ref_name}"
      print(f"{config_name:>16} {variant_name:>12} {e['ms_per_step']:9.1f} {e['ms_per_step_min']:7.1f} "
            f"{e['ms_per_step_max']:7.1f} {e['tokens_per_sec']:10,.0f} {mfu:>7} {speed}")
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2))
  print(f"wrote {out}")
  return report


if __name__ == "__main__":
  main()
