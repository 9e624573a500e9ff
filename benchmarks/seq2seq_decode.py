"""Encoder-decoder decoding speed: the cached path vs recomputation, and beam search vs greedy.

  python benchmarks/seq2seq_decode.py                 # T5-style 4+4 layers, 256 wide, 128 new tokens
  python benchmarks/seq2seq_decode.py --new_tokens=32 --repeats=2   # quick look

- cached: llmjax.seq2seq_decode.generate (encoder once; decoder self-attention KV cache; the
  cross-attention keys/values projected once at prefill).
- recompute: seq2seq_decode.recompute_generate: every new token re-runs the encoder and the whole
  decoder prefix (no cache), as a naive loop would.
- beam: generate(num_beams=4): 4 rows per source in the caches, top-k over 4 x vocab, cache rows
  reordered every step. Compared per generated token with greedy (both run all new_tokens steps:
  no EOS is given).
Prints min/median/max over --repeats timed runs after one warm-up (compile) run and writes JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llmjax import seq2seq_decode  # noqa: E402
from llmjax.model import TransformerConfig, build_model, num_params  # noqa: E402


def timed(fn, repeats: int) -> dict:
  fn()  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return {"min_s": min(times), "median_s": float(np.median(times)), "max_s": max(times)}


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--width", type=int, default=256)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--vocab", type=int, default=1000)
  p.add_argument("--source_len", type=int, default=32)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--beams", type=int, default=4)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
  args = p.parse_args()

  cfg = TransformerConfig(
      family="encoder_decoder", vocab_size=args.vocab, num_layers=args.layers,
      encoder_layers=args.layers, num_heads=args.heads, embed_dim=args.width,
      mlp_dim=4 * args.width, max_seq_len=512, position="relative", norm="rmsnorm", mlp="geglu",
      use_bias=False, scale_attention=False)
  model = build_model(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
                                    jnp.zeros((1, 8), jnp.int32))["params"])
  rng = np.random.default_rng(0)
  sources = [rng.integers(3, args.vocab, args.source_len).tolist() for _ in range(args.batch)]
  n = args.new_tokens

  def cached():
    return seq2seq_decode.generate(model, params, sources, n, temperature=0.0)

  def recompute():
    return seq2seq_decode.recompute_generate(model, params, sources, n)

  def beams():
    return seq2seq_decode.generate(model, params, sources, n, num_beams=args.beams)

  assert cached() == recompute(), "cached decoding disagrees with recomputation"
  results = {"cached": timed(cached, args.repeats),
             "recompute": timed(recompute, max(1, args.repeats // 2)),
             "beam": timed(beams, args.repeats)}
  assert all(len(r) == n for r in beams())  # every step ran: per-token costs compare
  speedup = results["recompute"]["median_s"] / results["cached"]["median_s"]
  beam_ratio = results["beam"]["median_s"] / results["cached"]["median_s"]
  summary = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": f"{platform.machine()} {platform.processor() or ''} {jax.devices()[0].device_kind}"
                 f" x{jax.device_count()}",
      "model": {"params": num_params(cfg), "layers": args.layers, "width": args.width,
                "vocab": args.vocab, "source_len": args.source_len, "batch": args.batch},
      "new_tokens": n, "beams": args.beams, "timings": results,
      "cached_tokens_per_s": args.batch * n / results["cached"]["median_s"],
      "cache_speedup_vs_recompute": speedup,
      "beam_cost_per_token_vs_greedy": beam_ratio,
  }
  for name, r in results.items():
    print(f"{name:10s} {n} tokens: min {r['min_s']*1e3:8.1f} ms  median {r['median_s']*1e3:8.1f} "
          f"ms  max {r['max_s']*1e3:8.1f} ms")
  print(f"cache speedup vs recompute (median): {speedup:.1f}x   "
        f"{args.beams}-beam cost per token vs greedy: {beam_ratio:.2f}x")
  Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
  main()
