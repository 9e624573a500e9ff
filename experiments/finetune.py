"""Fine-tune an existing run (an llmjax run or an HF import) on task data.

  python -m llmjax.main --config=experiments/finetune.py:runs/base --workdir=runs/ft \\
      --config.data.path=train.jsonl --config.data.val_path=val.jsonl
  # a given step of the base, or its best checkpoint: experiments/finetune.py:runs/base:best

Takes the base run's model and tokenizer, sets train.init_from to it, and uses defaults suited to
fine-tuning: a 10x lower learning rate than pretraining usually uses (1e-4), a short warmup, no
weight decay, loss on completions / assistant turns only, packed examples, 3 epochs, validation
every 100 steps keeping the best checkpoint by val/loss. Any field can be overridden as usual
(e.g. --config.train.objective=classification for {"text", "label"} data).
"""
from llmjax import config as cfglib
from llmjax import runs


def get_config(base: str):
  if not base:
    raise ValueError("name the base run: --config=experiments/finetune.py:<workdir>[:step|:best]")
  head, sep, tail = base.rpartition(":")
  workdir = head if sep and (tail.isdigit() or tail == "best") else base
  source = runs.read_config(workdir)
  c = cfglib.default_config()
  c.model = source.model                      # the architecture must match the weights
  c.mesh = source.mesh
  for field in ("tokenizer", "tokenizer_path", "sp_vocab_size", "seq_len", "batch_size"):
    c.data[field] = source.data[field]
  c.data.update(path="", packing=True, train_on="completion", truncate="right", format="auto")
  c.optim.update(lr=1e-4, schedule="cosine", warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.0,
                 grad_clip=1.0)
  c.train.update(init_from=base, epochs=3, eval_every=100, keep_best="val/loss",
                 checkpoint_every=0, log_every=20, sample_tokens=0, grad_accum_steps=1,
                 seed=source.train.seed)
  return c
