"""A small BERT (4 layers, 128 wide, 1.1M parameters; sized for minutes on a CPU) pretrained from scratch on the embedded corpus (Python's documentation prose) with
the original recipe: masked LM (15% selected; 80% [MASK], 10% random, 10% unchanged; whole words)
plus next-sentence prediction on [CLS] A [SEP] B [SEP] rows.

  python -m llmjax.main --config=experiments/bert_small.py --workdir=runs/bert_small
  python -m llmjax.fill_mask --workdir=runs/bert_small --text="Return the [MASK] of the list."

Post-norm blocks, learned positions, token types and a pooler as BERT; a sentencepiece vocabulary
trained on the corpus with BERT's special tokens appended. It logs the MLM loss/accuracy and the
NSP accuracy on validation. Variants: ':tiny' is a 2-layer smoke test; ':no_nsp' drops NSP
(benchmarks/bert_topic.py pretrains ':no_nsp' at lr 2e-3 for 2000 steps, on the corpus minus its
held-out text, and fine-tunes it on few topic labels: benchmarks/RESULTS.md, issue 11).
"""
from llmjax.config import default_config


def get_config(variant: str = ""):
  c = default_config()
  c.model.update(family="encoder", causal=False, norm_position="post", num_layers=4, num_heads=4,
                 embed_dim=128, mlp_dim=512, max_seq_len=64, position="learned",
                 norm="layernorm", norm_eps=1e-12, mlp="gelu", gelu_approximate=False,
                 use_bias=True, tie_embeddings=True, type_vocab_size=2, pooler=True,
                 nsp_head=True, dropout=0.1)
  c.data.update(tokenizer="sentencepiece", sp_vocab_size=2048, seq_len=64, batch_size=32,
                special_tokens="[PAD],[UNK],[CLS],[SEP],[MASK]")
  c.optim.update(lr=1e-3, schedule="linear", warmup_steps=100, min_lr_ratio=0.0, b1=0.9,
                 b2=0.98, eps=1e-6, weight_decay=0.01)
  c.train.update(objective="masked_lm", mlm_probability=0.15, mlm_whole_word=True, mlm_nsp=True,
                 steps=1500, eval_every=250, eval_batches=10, log_every=25,
                 checkpoint_every=500, sample_tokens=0)
  if variant == "tiny":
    c.model.update(num_layers=2, embed_dim=64, mlp_dim=128)
    c.data.update(sp_vocab_size=512, batch_size=8)
    c.optim.update(warmup_steps=5)
    c.train.update(steps=20, eval_every=10, eval_batches=2, log_every=5, checkpoint_every=10)
  elif variant == "no_nsp":
    c.model.update(nsp_head=False)
    c.train.update(mlm_nsp=False)
  elif variant:
    raise ValueError(f"unknown bert_small variant {variant!r}; use 'tiny', 'no_nsp' or none")
  return c
