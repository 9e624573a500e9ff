"""Decoding speed: tokens/s at batch 1 and 16, the memory-bandwidth bound, and KV cache vs recompute.

  python benchmarks/decode.py                      # ~57M-param GPT-2-style model, 256 new tokens
  python benchmarks/decode.py --quantize=int8      # the same with int8 weights
  python benchmarks/decode.py --layers=2 --width=256 --new_tokens=64   # quick look

At batch 1 every decoded token must read all weights and the filled part of the KV cache once, so
(bytes read per token) / (memory bandwidth) is a floor on the time per token; the script measures
this machine's bandwidth itself and reports the fraction of that bound reached. The recompute
baseline (no cache, the whole sequence through the model for every new token, as nanoGPT's
`generate` does) is timed at five sequence lengths and summed over the 256 steps by the trapezoid
rule, because compiling every length would take longer than the measurement.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llmjax import generate as gen  # noqa: E402
from llmjax import quantize as quant  # noqa: E402
from llmjax.model import Transformer, TransformerConfig, num_params  # noqa: E402


def median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure_bandwidth(mbytes: int = 512, repeats: int = 7) -> dict:
  """Copy (numpy, bytes read + written, STREAM's convention) and read (jitted JAX sum) in GB/s."""
  n = mbytes * (1 << 20) // 4
  src = np.random.default_rng(0).random(n, dtype=np.float32)
  dst = np.empty_like(src)
  copy = median_time(lambda: np.copyto(dst, src), repeats)
  x = jnp.asarray(src)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  read = median_time(lambda: total(x).block_until_ready(), repeats)
  return {"copy_gbps": 2 * src.nbytes / copy / 1e9, "read_gbps": src.nbytes / read / 1e9}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--width", type=int, default=768)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--vocab", type=int, default=256)
  p.add_argument("--context", type=int, default=512)
  p.add_argument("--prompt", type=int, default=16)
  p.add_argument("--new_tokens", type=int, default=256)
  p.add_argument("--batches", default="1,16")
  p.add_argument("--quantize", default="none", choices=quant.MODES)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--skip_recompute", action="store_true")
  p.add_argument("--out", default=str(Path(__file__).with_name("decode.json")))
  args = p.parse_args()

  cfg = TransformerConfig(vocab_size=args.vocab, num_layers=args.layers, num_heads=args.heads,
                          embed_dim=args.width, max_seq_len=args.context)
  model = Transformer(cfg)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  params = quant.quantize_params(params, args.quantize)
  weight_bytes = quant.weight_bytes(params)
  bw = measure_bandwidth()
  print(f"model: {num_params(cfg) / 1e6:.1f}M params, weights {weight_bytes / 1e6:.1f} MB "
        f"({args.quantize}); bandwidth: copy {bw['copy_gbps']:.1f} GB/s, read {bw['read_gbps']:.1f} GB/s")
  result = {"model": cfg.to_dict(), "params": num_params(cfg), "quantize": args.quantize,
            "weight_bytes": weight_bytes, "bandwidth": bw, "new_tokens": args.new_tokens,
            "prompt_tokens": args.prompt, "jax": jax.__version__, "devices": str(jax.devices()),
            "batches": {}}

  rng = np.random.default_rng(0)
  for batch in [int(b) for b in args.batches.split(",")]:
    prompts = rng.integers(0, args.vocab, (batch, args.prompt)).tolist()
    run = lambda: gen.generate(model, params, prompts, args.new_tokens, temperature=0.0)
    stream = lambda: list(gen.stream_tokens(model, params, prompts, args.new_tokens, temperature=0.0))
    run(), stream()  # compile
    t_loop = median_time(run, args.repeats)
    t_stream = median_time(stream, args.repeats)
    best = min(t_loop, t_stream)
    per_token = best / args.new_tokens
    entry = {"on_device_loop_s": t_loop, "streaming_s": t_stream,
             "tokens_per_s": batch * args.new_tokens / best,
             "on_device_tokens_per_s": batch * args.new_tokens / t_loop,
             "streaming_tokens_per_s": batch * args.new_tokens / t_stream,
             "ms_per_step": per_token * 1e3}
    # Bytes one step reads: all weights + the filled part of the K and V caches (mean fill).
    kv_bytes_per_pos = 2 * cfg.num_layers * cfg.kv_heads * cfg.dim_per_head * 4
    mean_len = args.prompt + args.new_tokens / 2
    step_bytes = weight_bytes + batch * kv_bytes_per_pos * mean_len
    entry["bytes_per_step"] = step_bytes
    if batch == 1:
      for kind in ("copy", "read"):
        bound = step_bytes / (bw[f"{kind}_gbps"] * 1e9)
        entry[f"bound_ms_{kind}"] = bound * 1e3
        entry[f"fraction_of_bound_{kind}"] = bound / per_token
    result["batches"][str(batch)] = entry
    line = (f"batch {batch:3d}: {entry['tokens_per_s']:8.1f} tokens/s  ({per_token * 1e3:.2f} ms/step; "
            f"on-device loop {t_loop:.2f}s, streaming {t_stream:.2f}s)")
    if batch == 1:
      line += (f"  bound {entry['bound_ms_copy']:.2f} ms at copy bandwidth -> "
               f"{entry['fraction_of_bound_copy']:.0%} of it ({entry['fraction_of_bound_read']:.0%} "
               "of the read-bandwidth bound)")
    print(line, flush=True)

  if not args.skip_recompute:
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t)[:, -1].argmax(-1))
    lengths = np.linspace(args.prompt, args.prompt + args.new_tokens - 1, 5).astype(int)
    per_len = []
    for length in lengths:
      tokens = jnp.asarray(rng.integers(0, args.vocab, (1, int(length))), jnp.int32)
      forward(params, tokens).block_until_ready()
      per_len.append(median_time(lambda: forward(params, tokens).block_until_ready(), args.repeats))
    steps = np.arange(args.prompt, args.prompt + args.new_tokens)
    recompute_s = float(np.sum(np.interp(steps, lengths, per_len)))
    cached_s = result["batches"]["1"]["on_device_loop_s"] if "1" in result["batches"] else None
    result["recompute"] = {"lengths": lengths.tolist(), "forward_s": per_len,
                           "total_s_estimated": recompute_s}
    if cached_s:
      result["recompute"]["speedup_of_cache"] = recompute_s / cached_s
      print(f"recompute without cache: {recompute_s:.2f}s for {args.new_tokens} tokens at batch 1 "
            f"-> the KV cache is {recompute_s / cached_s:.1f}x faster")
  Path(args.out).write_text(json.dumps(result, indent=2))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
