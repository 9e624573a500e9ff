"""nanoGPT's shakespeare_char CPU configuration: 4 layers, 4 heads, 128 wide, block 64, batch 12.

Trains on the embedded corpus by default; for tiny Shakespeare itself:
  --config.data.path=../shared/data/tinyshakespeare/input.txt
"""
from llmjax.config import default_config


def get_config():
  c = default_config()
  c.model.update(num_layers=4, num_heads=4, embed_dim=128, max_seq_len=64, dropout=0.0,
                 use_bias=False, tie_embeddings=True, position="learned", norm="layernorm",
                 mlp="gelu", gelu_approximate=False,  # nanoGPT uses the exact (erf) GELU
                 # 4 small layers: unrolled runs 1.4-1.9x faster than scanned on a 2-core CPU
                 # (benchmarks/RESULTS.md), and compiles in seconds either way
                 scan_layers=False, matmul_dtype="bfloat16")
  c.data.update(tokenizer="char", seq_len=64, batch_size=12)
  # One process, bf16 x bf16 -> float32 matmuls (model.matmul_dtype; activations, norms and
  # softmax stay float32): 42.3 vs 48.3 ms/step with float32 matmuls, faster in each of 3 quiet
  # interleaved rounds, validation loss at step 2000 unchanged (issue 12, benchmarks/RESULTS.md).
  # Since session 5 this also covers the backward's dots (before, XLA:CPU ran them as float32
  # Eigen dots) and attention's batched dots (llmjax.model.bf16_attention): 30% less CPU time
  # per step, validation loss at step 2000 1.8984 (unchanged).
  # Two data-parallel processes (--config.mesh.cpu_processes=0) or two in-process devices
  # (--config.mesh.cpu_devices=2) were slower for this small model (54-58 ms/step), and since
  # session 5 also for the 6-layer 384-wide variant (its benchmark: one process, 4 micro-batches of 2).
  # nanoGPT: lr 1e-3 -> 1e-4 (cosine) over 2000 iterations after 100 warmup, AdamW betas 0.9/0.99,
  # weight decay 0.1 on every matrix (embeddings included), clip 1.0.
  c.optim.update(lr=1e-3, min_lr_ratio=0.1, warmup_steps=100, b1=0.9, b2=0.99, weight_decay=0.1,
                 decay_embeddings=True, grad_clip=1.0)
  # Each step's batch of 12 runs as 3 micro-batches of 4 (gradient accumulation: the same update
  # up to float rounding). The backward's working set then fits a 32 MB L3 cache: 26-29 instead
  # of 35-39 ms per step on the 2-core EPYC (benchmarks/RESULTS.md). With a data.batch_size that
  # 3 does not divide, also set train.grad_accum_steps (1: no accumulation).
  c.train.update(steps=2000, eval_every=250, eval_batches=20, log_every=50, checkpoint_every=1000,
                 grad_accum_steps=3)
  return c
