"""int8 weight-only quantization of a trained run: weight memory and validation perplexity.

  python benchmarks/quantize.py --workdir=runs/shakespeare   # a trained run directory

Perplexity is measured on the run's whole validation split, cut into non-overlapping windows of
data.seq_len tokens (every validation token scored once, no sampling), for the float weights and
for their int8 version. Memory is reported three ways: bytes of the stored weights, and XLA's own
accounting (arguments and temporaries) of the compiled decode step, which shows that only one
layer at a time is dequantized.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from llmjax import generate as gen  # noqa: E402
from llmjax import quantize as quant  # noqa: E402
from llmjax import runs  # noqa: E402
from llmjax.data import load_dataset  # noqa: E402


def val_perplexity(model, params, val: np.ndarray, seq_len: int, batch: int, max_windows: int):
  windows = (len(val) - 1) // seq_len
  windows = min(windows, max_windows) if max_windows else windows
  starts = np.arange(windows) * seq_len
  loss_sum = jax.jit(lambda p, x, y: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x), y)))
  total = 0.0
  for i in range(0, windows, batch):
    idx = starts[i: i + batch]
    if len(idx) < batch:  # keep one compiled shape: pad with the first windows, subtract them
      idx = np.concatenate([idx, starts[: batch - len(idx)]])
    rows = np.stack([val[s: s + seq_len + 1] for s in idx]).astype(np.int32)
    x, y = jnp.asarray(rows[:, :-1]), jnp.asarray(rows[:, 1:])
    if i + batch > windows:
      keep = windows - i
      per_row = jax.jit(lambda p, x, y: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
          model.apply({"params": p}, x), y), axis=1))(params, x, y)
      total += float(jnp.sum(per_row[:keep]))
    else:
      total += float(loss_sum(params, x, y))
  loss = total / (windows * seq_len)
  return loss, math.exp(loss), windows * seq_len


def decode_step_memory(model, params, batch: int = 1) -> dict:
  cache = gen.init_cache(model, batch, model.cfg.max_seq_len)
  tokens = jnp.zeros((batch,), jnp.int32)
  sampler = gen.Sampler(temperature=0.0)
  params = gen.decode_params(params)  # the per-layer layout decode_step reads
  compiled = gen.decode_step.lower(model, None, sampler.static, params, cache, tokens, tokens,
                                   jax.random.key(0), jnp.int32(1), sampler.dynamic()).compile()
  mem = compiled.memory_analysis()
  return {"argument_bytes": int(mem.argument_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes)}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--max_windows", type=int, default=0, help="0: the whole validation split")
  p.add_argument("--out", default=str(Path(__file__).with_name("quantize.json")))
  args = p.parse_args()

  run = runs.load_run(args.workdir)
  data = load_dataset(run.config.data, run.config.train.seed, run.tokenizer)
  val = np.asarray(data.val)
  result = {"workdir": args.workdir, "step": run.step, "model": run.model_config.to_dict()}
  seq_len = run.config.data.seq_len
  for mode in ("none", "int8"):
    params = quant.quantize_params(run.params, mode)
    loss, ppl, tokens = val_perplexity(run.model, params, val, seq_len, args.batch, args.max_windows)
    entry = {"val_loss": loss, "val_perplexity": ppl, "val_tokens": tokens,
             "weight_bytes": quant.weight_bytes(params), **decode_step_memory(run.model, params)}
    result[mode] = entry
    print(f"{mode:5s}: val loss {loss:.4f}, perplexity {ppl:.4f} over {tokens:,} tokens; weights "
          f"{entry['weight_bytes'] / 1e6:.3f} MB; decode step: arguments "
          f"{entry['argument_bytes'] / 1e6:.3f} MB, temporaries {entry['temp_bytes'] / 1e6:.3f} MB",
          flush=True)
  ratio = result["int8"]["weight_bytes"] / result["none"]["weight_bytes"]
  change = result["int8"]["val_perplexity"] / result["none"]["val_perplexity"] - 1
  result.update(weight_ratio=ratio, perplexity_change=change)
  print(f"int8 weights: {ratio:.1%} of float; validation perplexity change {change:+.3%}")
  Path(args.out).write_text(json.dumps(result, indent=2))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
