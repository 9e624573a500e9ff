"""GPT-2 small (124M): 12 layers, 12 heads, 768 wide, context 1024, GPT-2 BPE-sized vocabulary.

The real configuration is for accelerators. On a CPU it starts, prints its parameter count and a
step-time ETA, and trains (slowly). Variants: `--config=experiments/gpt_small.py:tiny` is a
2-layer, 128-wide smoke-test model with the same architecture.
"""
from llmjax.config import default_config


def get_config(variant: str = ""):
  c = default_config()
  c.model.update(num_layers=12, num_heads=12, embed_dim=768, max_seq_len=1024, dropout=0.0,
                 position="learned", norm="layernorm", mlp="gelu", use_bias=True,
                 tie_embeddings=True, dtype="bfloat16", param_dtype="float32")
  c.data.update(tokenizer="sentencepiece", sp_vocab_size=8192, seq_len=1024, batch_size=32)
  c.optim.update(lr=6e-4, min_lr_ratio=0.1, warmup_steps=2000, b1=0.9, b2=0.95, weight_decay=0.1)
  c.train.update(steps=600_000, eval_every=2000, eval_batches=50, log_every=10,
                 checkpoint_every=2000)
  if variant == "tiny":
    c.model.update(num_layers=2, num_heads=4, embed_dim=128, max_seq_len=128, dtype="float32")
    c.data.update(sp_vocab_size=512, seq_len=128, batch_size=8)
    c.optim.update(warmup_steps=10)
    c.train.update(steps=50, eval_every=25, eval_batches=2, log_every=10, checkpoint_every=25,
                   sample_tokens=64)
  elif variant:
    raise ValueError(f"unknown gpt_small variant {variant!r}; use 'tiny' or none")
  return c
