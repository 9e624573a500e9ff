"""Start-up on a prepared corpus (issue 13): time from process start to the end of the first
training step, and resident memory then, on a 100M+ token prepared directory vs one 10x larger (the
same shard files listed 10 times), vs the same model on the embedded 0.5 MB corpus (the "model
only" baseline whose memory is subtracted); then the input pipeline's host time per step.

  python benchmarks/first_step.py [--mb=105] [--rounds=3] [--steps=60]
  -> prints tables, writes benchmarks/first_step.json

The corpus is made in a temporary directory (synthetic JSONL from the embedded docs, prepared with
the byte tokenizer: 1 token per byte). Arms run interleaved, each in a fresh process, min/median/max
over rounds with the load average around each run. The host-time part trains shakespeare_char on
the prepared corpus through llmjax.main and reads what the loop logs (data_host_ms: assembling one
batch on the prefetch thread; data_wait_ms: how long the step waited for it; step_time_ms), and
times batches of GPT-2 small's shape (32 x 1024) against what an H100 would consume.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

MODEL = ["--config.model.vocab_size=0", "--config.data.tokenizer=byte",
         "--config.train.sample_tokens=0", "--config.train.progress=False",
         "--config.train.tensorboard=False", "--config.train.peak_flops=1e12"]


def child(data_path: str) -> None:
  """Runs in a fresh process: builds the run, takes one step, prints seconds since the process
  started and the resident set size."""
  import psutil
  born = psutil.Process().create_time()
  import jax
  from llmjax import loop
  sys.path.insert(0, str(ROOT / "experiments"))
  import shakespeare_char
  config = shakespeare_char.get_config()
  config.data.update(path=data_path, tokenizer="byte")
  config.model.vocab_size = 0
  config.train.update(steps=1, checkpoint_every=0)
  from llmjax.data import load_dataset
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.time()
    dataset = load_dataset(config.data, config.train.seed)  # the corpus-dependent part, alone
    dataset.batch("train", 0, config.data.batch_size)
    data_s = time.time() - t0
    t0 = time.time()
    run = loop.Run(config, workdir)
    built = time.time()
    state = run.initial_state()
    with run.program.scope():
      state, metrics = run.train_step(state, run.batch("train", 0))
      jax.block_until_ready(metrics)
    done = time.time()
    rss = psutil.Process().memory_info().rss
    run.checkpointer.close()
  print(json.dumps({"first_step_s": done - born, "run_built_s": built - t0, "data_s": data_s,
                    "import_s": t0 - born, "rss_mb": rss / 1e6,
                    "train_tokens": len(run.dataset.train)}))


def measure(data_path: str, env) -> dict:
  load = os.getloadavg()[0]
  proc = subprocess.run([sys.executable, __file__, "--child", data_path], cwd=ROOT, env=env,
                        capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"child failed on {data_path}:\n{proc.stderr[-3000:]}")
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  out.update(load_before=load, load_after=os.getloadavg()[0])
  return out


def repeat_dir(src: Path, dst: Path, times: int) -> None:
  """A prepared directory whose manifest lists every shard of `src` `times` times (symlinks)."""
  manifest = json.loads((src / "manifest.json").read_text())
  dst.mkdir()
  for f in src.iterdir():
    if f.is_file() and f.name != "manifest.json":
      shutil.copy(f, dst / f.name)
  for split in ("train", "val"):
    (dst / split).mkdir()
    shards = []
    for k in range(times if split == "train" else 1):
      for s in manifest["splits"][split]["shards"]:
        name = f"{split}/{len(shards):05d}.bin"
        os.symlink(src / s["file"], dst / name)
        shards.append(dict(s, file=name))
    manifest["splits"][split].update(
        shards=shards, tokens=sum(s["tokens"] for s in shards),
        documents=sum(s["documents"] for s in shards))
  (dst / "manifest.json").write_text(json.dumps(manifest, indent=1))


def spread(values):
  return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def host_time_in_training(data_path: str, env, steps: int) -> dict:
  """shakespeare_char on the prepared corpus through llmjax.main: the loop's own figures."""
  with tempfile.TemporaryDirectory() as workdir:
    cmd = [sys.executable, "-m", "llmjax.main", "--config=experiments/shakespeare_char.py",
           f"--workdir={workdir}", f"--config.data.path={data_path}", *MODEL,
           f"--config.train.steps={steps}", "--config.train.log_every=10",
           "--config.train.eval_every=0", "--config.train.eval_batches=1",
           "--config.train.checkpoint_every=0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
      raise SystemExit(proc.stderr[-3000:])
    records = [json.loads(x) for x in Path(workdir, "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if r["split"] == "train"][1:]  # the first window holds the compile
  host = [r["data_host_ms"] for r in train]
  wait = [r["data_wait_ms"] for r in train]
  step = [r["step_time_ms"] for r in train]
  return {"windows_of_10_steps": len(train), "data_host_ms": spread(host),
          "data_wait_ms": spread(wait), "step_time_ms": spread(step),
          "host_share_of_step": spread([h / s for h, s in zip(host, step)]),
          "wait_share_of_step": spread([w / s for w, s in zip(wait, step)])}


def gpt2_small_host_rate(data_path: str, batches: int = 40) -> dict:
  """Host time to assemble GPT-2 small batches (32 x 1024 windows) from the prepared corpus, vs the
  tokens/s an H100 could consume at 100% of its bf16 peak."""
  from llmjax import config as cfglib
  from llmjax import metrics as mlib
  from llmjax.data import load_dataset
  from llmjax.experiment import load_config
  config = load_config("gpt_small")
  config.data.update(path=data_path, tokenizer="byte")
  ds = load_dataset(config.data, seed=0)
  b, t = config.data.batch_size, config.data.seq_len
  times = []
  for step in range(batches):
    t0 = time.perf_counter()
    ds.batch("train", step, b)
    times.append(time.perf_counter() - t0)
  model = cfglib.model_config(config, 50304)  # GPT-2's (padded) vocabulary
  flops_per_token = mlib.flops_per_token(model, t)
  h100_peak = 989e12  # H100 SXM dense bf16
  ceiling = h100_peak / flops_per_token
  ms = spread([x * 1e3 for x in times])
  return {"batch": [b, t], "host_ms_per_batch": ms,
          "host_tokens_per_s_one_thread": b * t / (ms["median"] / 1e3),
          "gpt2_small_flops_per_token": flops_per_token,
          "h100_tokens_per_s_at_100pct_mfu": ceiling,
          "headroom_x": b * t / (ms["median"] / 1e3) / ceiling}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--mb", type=float, default=105.0)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "first_step.json"))
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child is not None:
    child(args.child)
    return
  from prepare_corpus import make_corpus
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  tmp = Path(tempfile.mkdtemp(prefix="llmjax-first-step-"))
  try:
    make_corpus(tmp / "corpus", args.mb)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmjax.data.prepare", f"--input={tmp}/corpus/*.jsonl",
                    f"--output={tmp}/x1", "--tokenizer=byte", "--noprogress"], cwd=ROOT, env=env,
                   check=True)
    prepare_s = time.perf_counter() - t0
    shutil.rmtree(tmp / "corpus")
    repeat_dir(tmp / "x1", tmp / "x10", 10)
    arms = {"model_only_embedded_corpus": "", "prepared_1x": str(tmp / "x1"),
            "prepared_10x": str(tmp / "x10")}
    samples = {k: [] for k in arms}
    names = list(arms)
    for r in range(args.rounds):
      for name in names[r % 3:] + names[:r % 3]:
        m = measure(arms[name], env)
        samples[name].append(m)
        print(f"round {r} {name}: first step at {m['first_step_s']:.2f} s (imports "
              f"{m['import_s']:.2f} s, corpus opened + first batch {m['data_s']:.3f} s, run built in "
              f"{m['run_built_s']:.2f} s), RSS {m['rss_mb']:.0f} MB, {m['train_tokens']:,} train "
              f"tokens, load {m['load_before']:.1f}->{m['load_after']:.1f}", flush=True)
    host = host_time_in_training(str(tmp / "x1"), env, args.steps)
    gpt2 = gpt2_small_host_rate(str(tmp / "x10"))
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
  finally:
    shutil.rmtree(tmp, ignore_errors=True)

  base_rss = statistics.median(m["rss_mb"] for m in samples["model_only_embedded_corpus"])
  results = {}
  for name, ms in samples.items():
    results[name] = {"train_tokens": ms[0]["train_tokens"],
                     "first_step_s": spread([m["first_step_s"] for m in ms]),
                     "run_built_s": spread([m["run_built_s"] for m in ms]),
                     "data_s": spread([m["data_s"] for m in ms]),
                     "import_s": spread([m["import_s"] for m in ms]),
                     "rss_mb": spread([m["rss_mb"] for m in ms]),
                     "rss_beyond_model_mb": spread([m["rss_mb"] - base_rss for m in ms]),
                     "load": spread([m["load_before"] for m in ms] + [m["load_after"] for m in ms])}
  r1, r10 = results["prepared_1x"], results["prepared_10x"]
  report = {
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
      "uptime_at_end": uptime, "rounds": args.rounds, "prepare_byte_1x_s": prepare_s,
      "command": " ".join(["python", "benchmarks/first_step.py", *(argv or sys.argv[1:])]),
      "results": results,
      "ratio_10x_over_1x": {"first_step_s": r10["first_step_s"]["median"] / r1["first_step_s"]["median"],
                            "rss_mb": r10["rss_mb"]["median"] / r1["rss_mb"]["median"]},
      "host_time_shakespeare_char": host, "gpt2_small_batches": gpt2,
  }
  print(f"\n{'arm':<28} {'train tokens':>14} {'first step s min/med/max':>26} "
        f"{'data s (med)':>13} {'RSS MB (med)':>13} {'beyond model':>13}")
  for name, r in results.items():
    s = r["first_step_s"]
    print(f"{name:<28} {r['train_tokens']:>14,} {s['min']:>10.2f}/{s['median']:.2f}/{s['max']:.2f}"
          f" {r['data_s']['median']:>13.3f} {r['rss_mb']['median']:>13.0f}"
          f" {r['rss_beyond_model_mb']['median']:>13.0f}")
  print(f"10x / 1x medians: first step {report['ratio_10x_over_1x']['first_step_s']:.3f}, "
        f"RSS {report['ratio_10x_over_1x']['rss_mb']:.3f}")
  h = host
  print(f"shakespeare_char on the prepared corpus: data_host_ms median {h['data_host_ms']['median']:.3f}"
        f", data_wait_ms median {h['data_wait_ms']['median']:.3f}, step {h['step_time_ms']['median']:.1f}"
        f" ms -> host {100 * h['host_share_of_step']['median']:.2f}% (max "
        f"{100 * h['host_share_of_step']['max']:.2f}%), wait {100 * h['wait_share_of_step']['median']:.2f}%"
        " of the step")
  g = gpt2
  print(f"GPT-2 small batches 32x1024: {g['host_ms_per_batch']['median']:.2f} ms each on one host "
        f"thread = {g['host_tokens_per_s_one_thread'] / 1e6:.1f}M tokens/s vs "
        f"{g['h100_tokens_per_s_at_100pct_mfu'] / 1e6:.2f}M tokens/s an H100 consumes at 100% MFU "
        f"({g['headroom_x']:.0f}x headroom)")
  print(uptime)
  Path(args.out).write_text(json.dumps(report, indent=2))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
