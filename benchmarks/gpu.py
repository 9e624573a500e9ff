"""One-GPU benchmark: training MFU, step time and memory; decode tokens/s against the HBM bound.

  python benchmarks/gpu.py                 # one H100/H200: about 3-5 minutes (budget: < 8)
  python benchmarks/gpu.py --dry_run       # CPU, tiny shapes: every code path in ~1 minute
                                           # (the test suite runs this, so the script cannot rot)

It prints a short table and writes JSON to benchmarks/out/gpu.json (--out to change):
- training, bf16 compute with float32 parameters and optimizer state, attention through cuDNN's
  fused kernel (model.attention_impl='cudnn'), the real jitted train step of llmjax.program:
    gpt2_small  GPT-2 124M (12L/12H/768, vocab 50304), sequence 1024, batch 32
    llama_1b    a TinyLlama-shaped 1.1B Llama (22L/32H/4 KV heads/2048, SwiGLU 5632, RMSNorm,
                rotary, untied, vocab 32000), sequence 2048, batch 8
  step time (median of timed windows), tokens/s, model FLOP/s and MFU against the chip's datasheet
  bf16 peak and against a bf16 matmul measured in the same run, and peak device memory;
- decoding (bf16 weights, KV cache of 128 prompt + 256 new tokens) at batch 1 and 64: tokens/s and
  the bound set by memory bandwidth (every step reads all weights and the whole allocated cache once),
  with the bandwidth both from the datasheet and measured in the same run.

A case that fails (e.g. out of memory on a smaller GPU) is reported as failed, and the others run.

Dependencies. The GPU image this was written for has jax (CUDA), flax, optax, orbax, absl and
sentencepiece but not ml_collections (llmjax's config) or tensorboardX. tensorboardX is optional:
llmjax imports it only when a training run writes TensorBoard files (this script never does; a
training run without it notes so once and writes metrics.jsonl alone).
ml_collections (pure Python; it needs PyYAML) travels as wheels. On a machine with network:

  pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \\
      -d wheels ml-collections            # ml_collections + PyYAML (+ absl-py) wheels

copy `wheels/` next to the repository, then on the GPU machine:

  pip install --no-index --find-links wheels ml-collections
  python benchmarks/gpu.py

(add `tensorboardX` to both commands to train with TensorBoard logging there.)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:
  import ml_collections  # noqa: F401  (llmjax.config needs it)
except ImportError:
  print("gpu.py: error: ml_collections is not installed; bring it as wheels (see the top of "
        "benchmarks/gpu.py: pip download ... ml-collections, then pip install --no-index "
        "--find-links wheels ml-collections)", file=sys.stderr)
  sys.exit(2)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llmjax import config as cfglib  # noqa: E402
from llmjax import generate as gen  # noqa: E402
from llmjax import metrics as mlib  # noqa: E402
from llmjax import program as proglib  # noqa: E402
from llmjax import sharding as shd  # noqa: E402
from llmjax.model import Transformer, num_params  # noqa: E402
from llmjax.sampling import Sampler  # noqa: E402

# Model shapes (config.model fields), with the sequence and batch each trains at.
GPT2_SMALL = dict(vocab_size=50304, num_layers=12, num_heads=12, embed_dim=768, max_seq_len=1024,
                  position="learned", norm="layernorm", mlp="gelu", use_bias=True,
                  tie_embeddings=True)
LLAMA_1B = dict(vocab_size=32000, num_layers=22, num_heads=32, num_kv_heads=4, embed_dim=2048,
                mlp_dim=5632, max_seq_len=2048, position="rotary", norm="rmsnorm", mlp="swiglu",
                use_bias=False, tie_embeddings=False)
CASES = {"gpt2_small": (GPT2_SMALL, 1024, 32), "llama_1b": (LLAMA_1B, 2048, 8)}
# --dry_run: the same two families, tiny, so a CPU runs every path in seconds.
DRY = {"gpt2_small": (dict(GPT2_SMALL, vocab_size=256, num_layers=2, num_heads=4, embed_dim=64,
                           max_seq_len=512), 64, 4),
       "llama_1b": (dict(LLAMA_1B, vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                         embed_dim=64, mlp_dim=160, max_seq_len=512), 64, 4)}

# HBM bandwidth per chip from vendor data sheets (bytes/s); SXM parts.
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "H800": 3.35e12, "A100": 2.0e12,
                   "B200": 8.0e12, "L4": 0.3e12}
PROMPT, NEW_TOKENS, DECODE_BATCHES = 128, 256, (1, 64)


def _datasheet(table: dict, kind: str):
  return next((v for k, v in table.items() if k.lower() in kind.lower()), None)


def _median_window(fn, windows: int, per_window: int) -> list[float]:
  """Seconds per call in each of `windows` timed windows of `per_window` calls (dispatch is
  asynchronous: fn returns arrays, and each window ends by waiting for the last of them)."""
  times = []
  for _ in range(windows):
    start = time.perf_counter()
    out = None
    for _ in range(per_window):
      out = fn()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / per_window)
  return times


def measure_matmul_peak(size: int) -> float:
  """Best bf16 x bf16 -> float32-accumulated matmul FLOP/s on the default device."""
  a = jnp.ones((size, size), jnp.bfloat16)
  mm = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
  jax.block_until_ready(mm(a))
  return 2 * size**3 / min(_median_window(lambda: mm(a), 5, 3))


def measure_bandwidth(mbytes: int) -> float:
  """Device memory read bandwidth (bytes/s) of a jitted sum over a large array."""
  x = jnp.ones((mbytes << 20) // 4, jnp.float32)
  total = jax.jit(jnp.sum)
  jax.block_until_ready(total(x))
  return x.nbytes / min(_median_window(lambda: total(x), 5, 3))


def device_peak_memory() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def train_case(name: str, model_fields: dict, seq: int, batch: int, attention: str, steps: int,
               peaks: dict) -> dict:
  config = cfglib.default_config()
  config.model.update(dtype="bfloat16", param_dtype="float32", attention_impl=attention,
                      scan_layers=True, remat_policy="none", dropout=0.0, **model_fields)
  config.data.update(seq_len=seq, batch_size=batch)
  config.train.update(steps=1000, grad_accum_steps=1)
  config.mesh.update(cpu_devices=1)
  model_cfg = cfglib.model_config(config)
  mesh = shd.make_mesh(config, jax.devices()[:1])
  program = proglib.build(config, mesh, model_cfg)
  with program.scope():
    state = program.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model_cfg.vocab_size, (batch, seq + 1), dtype=np.int32)
    data = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
                          program.batch_sharding)
    start = time.perf_counter()
    compiled = program.train_step.lower(state, data).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    box = {"state": state}

    def step():
      box["state"], metrics = compiled(box["state"], data)
      return metrics["loss"]
    jax.block_until_ready(step())  # first run: allocation, autotuning
    windows = _median_window(step, 3, steps)
    loss = float(step())
  step_s = statistics.median(windows)
  flops = mlib.flops_per_token(model_cfg, seq) * batch * seq
  out = dict(case=name, params=num_params(model_cfg), seq_len=seq, batch=batch,
             attention_impl=attention, compile_s=compile_s, loss=loss,
             step_ms=[w * 1e3 for w in windows], step_ms_median=step_s * 1e3,
             tokens_per_s=batch * seq / step_s, model_tflops=flops / step_s / 1e12,
             mfu_datasheet=(flops / step_s / peaks["datasheet_flops"]
                            if peaks["datasheet_flops"] else None),
             mfu_measured_matmul=flops / step_s / peaks["matmul_flops"],
             peak_memory_bytes=device_peak_memory(),
             compiled_temp_bytes=getattr(memory, "temp_size_in_bytes", None),
             compiled_argument_bytes=getattr(memory, "argument_size_in_bytes", None))
  del box, state, compiled
  return out


def decode_case(name: str, model_fields: dict, batch: int, steps: int, bandwidth: dict,
                prompt_len: int = PROMPT, new_tokens: int = NEW_TOKENS) -> dict:
  model_cfg = cfglib.model_config(cfglib.default_config())
  model_cfg = dataclasses.replace(model_cfg, **model_fields, dtype="bfloat16",
                                  param_dtype="bfloat16", dropout=0.0)
  model = Transformer(model_cfg)
  params = jax.jit(lambda: gen.decode_params(jax.tree.map(
      lambda p: getattr(p, "value", p),
      model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"],
      is_leaf=lambda p: hasattr(p, "value"))))()
  length = prompt_len + new_tokens
  sampler = Sampler(temperature=0.0)
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, model_cfg.vocab_size, (batch, prompt_len),
                                                         dtype=np.int32))
  lengths = jnp.full((batch,), prompt_len, jnp.int32)
  key = jax.random.key(0)
  token, _, cache = gen.prefill(model, None, sampler.static, length, params, prompt, lengths, key,
                                sampler.dynamic())
  box = {"cache": cache, "token": token, "position": lengths, "i": 1}

  def step():
    box["token"], _, box["cache"] = gen.decode_step(
        model, None, sampler.static, params, box["cache"], box["token"], box["position"], key,
        jnp.int32(box["i"]), sampler.dynamic())
    box["position"] = box["position"] + 1
    box["i"] += 1
    return box["token"]
  jax.block_until_ready(step())  # compiles
  per_window = max(1, min(steps, (new_tokens - 2) // 3))
  windows = _median_window(step, 3, per_window)
  step_s = statistics.median(windows)
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  cache_bytes = sum(x.nbytes for x in jax.tree.leaves(box["cache"]))
  read = weight_bytes + cache_bytes  # per step: every weight and the whole allocated cache
  out = dict(case=name, batch=batch, cache_len=length, step_ms=[w * 1e3 for w in windows],
             tokens_per_s=batch / step_s, weight_bytes=weight_bytes, cache_bytes=cache_bytes)
  for source, bw in bandwidth.items():
    if bw:
      bound = batch * bw / read
      out[f"bound_tokens_per_s_{source}"] = bound
      out[f"fraction_of_bound_{source}"] = out["tokens_per_s"] / bound
  del box, params
  return out


def _gb(x):
  return "-" if x is None else f"{x / 2**30:.1f}"


def _pct(x):
  return "-" if x is None else f"{x:.1%}"


def print_table(result: dict) -> None:
  env = result["environment"]
  print(f"\n{env['device_kind']} ({env['backend']}), jax {env['jax']}, {env['date']}"
        f"{'  [DRY RUN: tiny shapes, not a measurement]' if env['dry_run'] else ''}")
  ds_flops = "-" if not env["datasheet_flops"] else f"{env['datasheet_flops'] / 1e12:.0f}"
  ds_bw = "-" if not env["bandwidth_datasheet"] else f"{env['bandwidth_datasheet'] / 1e9:.0f}"
  print(f"peaks: bf16 matmul measured {env['matmul_flops'] / 1e12:.2f} TFLOP/s, datasheet "
        f"{ds_flops} TFLOP/s; memory read measured {env['bandwidth_measured'] / 1e9:.0f} GB/s, "
        f"datasheet {ds_bw} GB/s")
  print(f"{'training':<12} {'params':>8} {'tokens':>7} {'step ms':>9} {'tok/s':>10} {'TFLOP/s':>8} "
        f"{'MFU':>6} {'MFU(mm)':>8} {'peak GB':>8}")
  for r in result["train"]:
    if "error" in r:
      print(f"{r['case']:<12} failed: {r['error'][:90]}")
      continue
    print(f"{r['case']:<12} {r['params'] / 1e6:>7.0f}M {r['batch'] * r['seq_len']:>7} "
          f"{r['step_ms_median']:>9.1f} {r['tokens_per_s']:>10,.0f} {r['model_tflops']:>8.1f} "
          f"{_pct(r['mfu_datasheet']):>6} {_pct(r['mfu_measured_matmul']):>8} "
          f"{_gb(r['peak_memory_bytes'] or r['compiled_temp_bytes']):>8}")
  print(f"{'decode':<12} {'batch':>5} {'ms/step':>8} {'tok/s':>10} {'bound(ds)':>10} {'of bound':>9} "
        f"{'bound(meas)':>11} {'of bound':>9}")
  for r in result["decode"]:
    if "error" in r:
      print(f"{r['case']:<12} failed: {r['error'][:90]}")
      continue
    ds = r.get("bound_tokens_per_s_datasheet")
    ds = "-" if ds is None else f"{ds:,.0f}"
    print(f"{r['case']:<12} {r['batch']:>5} {statistics.median(r['step_ms']):>8.2f} "
          f"{r['tokens_per_s']:>10,.0f} {ds:>10} "
          f"{_pct(r.get('fraction_of_bound_datasheet')):>9} "
          f"{r['bound_tokens_per_s_measured']:>11,.0f} {_pct(r['fraction_of_bound_measured']):>9}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dry_run", action="store_true", help="tiny shapes on any backend (CPU test)")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "gpu.json"))
  p.add_argument("--cases", default="gpt2_small,llama_1b")
  p.add_argument("--train_steps", type=int, default=10, help="steps per timed window (3 windows)")
  p.add_argument("--decode_steps", type=int, default=40, help="steps per timed window (3 windows)")
  args = p.parse_args(argv)
  cases = DRY if args.dry_run else CASES
  names = [c for c in args.cases.split(",") if c]
  unknown = [c for c in names if c not in cases]
  if unknown:
    print(f"gpu.py: error: unknown case(s) {unknown}; choose from {sorted(cases)}", file=sys.stderr)
    sys.exit(2)
  device = jax.devices()[0]
  if device.platform != "gpu" and not args.dry_run:
    print(f"gpu.py: error: no GPU here (default backend {jax.default_backend()!r}); on a CPU "
          "use --dry_run, which checks every code path on tiny shapes", file=sys.stderr)
    sys.exit(2)
  attention = "cudnn" if device.platform == "gpu" else "xla"
  kind = device.device_kind
  env = dict(device_kind=kind, backend=device.platform, jax=jax.__version__, dry_run=args.dry_run,
             date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             datasheet_flops=_datasheet(mlib.PEAK_FLOPS_BY_KIND, kind),
             bandwidth_datasheet=_datasheet(HBM_BYTES_PER_S, kind))
  env["matmul_flops"] = measure_matmul_peak(512 if args.dry_run else 8192)
  env["bandwidth_measured"] = measure_bandwidth(64 if args.dry_run else 2048)
  peaks = {"datasheet_flops": env["datasheet_flops"], "matmul_flops": env["matmul_flops"]}
  bandwidth = {"datasheet": env["bandwidth_datasheet"], "measured": env["bandwidth_measured"]}
  result = dict(environment=env, train=[], decode=[])
  train_steps = 2 if args.dry_run else args.train_steps
  decode_steps = 4 if args.dry_run else args.decode_steps
  for name in names:
    fields, seq, batch = cases[name]
    try:
      result["train"].append(train_case(name, fields, seq, batch, attention, train_steps, peaks))
    except Exception as e:  # noqa: BLE001  (report it, run the other cases)
      result["train"].append(dict(case=name, error=f"{type(e).__name__}: {e}".splitlines()[0]))
    for b in DECODE_BATCHES:
      try:
        result["decode"].append(decode_case(name, fields, b, decode_steps, bandwidth,
                                            *((16, 32) if args.dry_run else (PROMPT, NEW_TOKENS))))
      except Exception as e:  # noqa: BLE001
        result["decode"].append(dict(case=name, batch=b,
                                     error=f"{type(e).__name__}: {e}".splitlines()[0]))
  print_table(result)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix(".tmp")
  tmp.write_text(json.dumps(result, indent=2))
  tmp.replace(out)  # atomic: a reader never sees half a file
  print(f"\nwrote {out}")
  return result


if __name__ == "__main__":
  main()
