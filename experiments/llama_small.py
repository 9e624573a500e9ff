"""A small Llama-style model: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied
embeddings. Sized to train on a CPU in minutes; scale the model.* fields up for accelerators."""
from llmjax.config import default_config


def get_config():
  c = default_config()
  c.model.update(num_layers=4, num_heads=8, num_kv_heads=2, embed_dim=256, mlp_dim=688,
                 max_seq_len=256, position="rotary", rope_theta=10000.0, norm="rmsnorm",
                 norm_eps=1e-5, mlp="swiglu", use_bias=False, tie_embeddings=False, dropout=0.0)
  c.data.update(tokenizer="sentencepiece", sp_vocab_size=2048, seq_len=256, batch_size=16)
  c.optim.update(lr=1e-3, warmup_steps=100, b1=0.9, b2=0.95, weight_decay=0.1)
  c.train.update(steps=1000, eval_every=250, log_every=25, checkpoint_every=500)
  return c
