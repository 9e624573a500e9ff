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
- What the beam/greedy ratio is made of: beam1 is the beam-search loop itself with one beam (the
  same while loop, top-k, cache reorder and bookkeeping, one row of work), greedy_rows is greedy
  decoding of the source repeated num_beams times (the rows of work 4 beams do, without the
  search). beam/beam1 is the cost of the extra rows, beam1/greedy the search's own overhead.
Every path is compiled first; then the timed runs are interleaved (round r times every path once)
so that a change of machine load hits all paths alike. Prints min/median/max over --repeats rounds
and writes JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llmjax import beam_search as bs  # noqa: E402
from llmjax import seq2seq_decode  # noqa: E402
from llmjax.model import TransformerConfig, build_model, num_params  # noqa: E402


def timed(fns: dict, repeats: dict) -> dict:
  """{name: fn} -> {name: min/median/max seconds}; runs interleaved round by round."""
  for fn in fns.values():
    fn()  # compile
  times = {name: [] for name in fns}
  for r in range(max(repeats.values())):
    for name, fn in fns.items():
      if r < repeats[name]:
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times[name].append(time.perf_counter() - start)
  return {name: {"min_s": min(t), "median_s": float(np.median(t)), "max_s": max(t)}
          for name, t in times.items()}


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

  batch = seq2seq_decode._prepare(model, sources, n)

  def beam1():  # the search loop with a single beam: its overhead without extra rows
    return seq2seq_decode._beams_on_device(
        model, batch.cache_len, n, bs.BeamConfig(1), params, batch.tokens, batch.segment_ids,
        jnp.int32(-1))[0]

  def greedy_rows():  # greedy over num_beams copies of each source: the beams' rows of work
    return seq2seq_decode.generate(model, params, [s for s in sources for _ in range(args.beams)],
                                   n, temperature=0.0)

  assert cached() == recompute(), "cached decoding disagrees with recomputation"
  assert np.asarray(beam1()).tolist() == cached(), "one beam is greedy"
  results = timed({"cached": cached, "recompute": recompute, "beam": beams, "beam1": beam1,
                   "greedy_rows": greedy_rows},
                  {"cached": args.repeats, "recompute": max(1, args.repeats // 2),
                   "beam": args.repeats, "beam1": args.repeats, "greedy_rows": args.repeats})
  assert all(len(r) == n for r in beams())  # every step ran: per-token costs compare
  speedup = results["recompute"]["median_s"] / results["cached"]["median_s"]
  beam_ratio = results["beam"]["median_s"] / results["cached"]["median_s"]
  ratio = lambda a, b, k="median_s": results[a][k] / results[b][k]  # noqa: E731
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
      "beam_cost_per_token_vs_greedy_min": ratio("beam", "cached", "min_s"),
      "beam_vs_beam1": ratio("beam", "beam1"),
      "beam1_vs_greedy": ratio("beam1", "cached"),
      "greedy_rows_vs_greedy": ratio("greedy_rows", "cached"),
      "load_average": list(os.getloadavg()),
  }
  for name, r in results.items():
    print(f"{name:10s} {n} tokens: min {r['min_s']*1e3:8.1f} ms  median {r['median_s']*1e3:8.1f} "
          f"ms  max {r['max_s']*1e3:8.1f} ms")
  print(f"cache speedup vs recompute (median): {speedup:.1f}x   "
        f"{args.beams}-beam cost per token vs greedy: {beam_ratio:.2f}x (medians), "
        f"{summary['beam_cost_per_token_vs_greedy_min']:.2f}x (minima)")
  print(f"beam/beam1 {summary['beam_vs_beam1']:.2f}x   beam1/greedy "
        f"{summary['beam1_vs_greedy']:.2f}x   greedy x{args.beams} rows/greedy "
        f"{summary['greedy_rows_vs_greedy']:.2f}x   load average {os.getloadavg()[0]:.1f}")
  Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
  main()
