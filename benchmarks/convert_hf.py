"""Hugging Face conversion cost for a GPT-2 small (124M) or Llama-shaped model on this machine.

  python benchmarks/convert_hf.py --family=gpt2 --out=/tmp/convert_hf.json

Times save_hf (llmjax params -> config.json + safetensors) and load_hf (back), checks the round
trip is exact, and reports peak host memory (ru_maxrss) relative to the model size. No torch.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import flax.linen as nn  # noqa: E402
import numpy as np  # noqa: E402

from llmjax import convert  # noqa: E402
from llmjax.model import Transformer, TransformerConfig  # noqa: E402

MODELS = {
    "gpt2": TransformerConfig(vocab_size=50257, num_layers=12, num_heads=12, embed_dim=768,
                              max_seq_len=1024),
    "llama": TransformerConfig(vocab_size=32000, num_layers=12, num_heads=12, num_kv_heads=4,
                               embed_dim=768, mlp_dim=2048, max_seq_len=2048, position="rotary",
                               norm="rmsnorm", mlp="swiglu", use_bias=False, tie_embeddings=False),
}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--family", choices=sorted(MODELS), default="gpt2")
  parser.add_argument("--max_shard_mb", type=int, default=5 * 1024)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  cfg = MODELS[args.family]
  shapes = nn.meta.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0),
                                        jnp.zeros((1, 8), jnp.int32))["params"])
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    written = convert.save_hf(cfg, params, tmp, max_shard_bytes=args.max_shard_mb << 20)
    t1 = time.perf_counter()
    back = convert.load_hf(tmp)
    t2 = time.perf_counter()
    exact = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params),
                                                     jax.tree.leaves(back.params)))
  result = {
      "family": args.family, "params_millions": round(nbytes / 4 / 1e6, 1),
      "bytes": nbytes, "files": written, "export_s": round(t1 - t0, 2),
      "import_s": round(t2 - t1, 2), "export_MB_per_s": round(nbytes / 2**20 / (t1 - t0)),
      "import_MB_per_s": round(nbytes / 2**20 / (t2 - t1)), "round_trip_exact": exact,
      "peak_rss_over_model_size": round(
          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / nbytes, 2),
      "device": jax.devices()[0].device_kind,
  }
  print(json.dumps(result, indent=2))
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
