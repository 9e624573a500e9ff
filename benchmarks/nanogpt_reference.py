"""A PyTorch reimplementation of nanoGPT's model and training iteration, for side-by-side timing.

Written from nanoGPT's design (karpathy/nanoGPT model.py + train.py), not copied: a pre-LayerNorm
GPT with optional biases (off here, as in nanoGPT's default `bias=False`), a fused QKV projection,
`F.scaled_dot_product_attention(is_causal=True)`, exact GELU, the lm head tied to the token
embedding, GPT-2 init (normal 0.02; residual projections 0.02/sqrt(2 * layers)), AdamW with decay on
every >= 2-D tensor (embeddings included) and `fused=False` (CPU), nanoGPT's `get_lr` (linear warmup
then cosine to min_lr), global-norm clipping at 1.0, and `get_batch` drawing random windows.

One training iteration is what nanoGPT's loop does with gradient_accumulation_steps=1 on CPU:
set the lr, forward, fetch the next batch, backward, clip, step, zero_grad; `loss.item()` every
`log_interval` iterations (nanoGPT's CPU recipe uses log_interval=1, which we default to).

Used by benchmarks/train_throughput.py (`--nanogpt`); runnable alone:
  python benchmarks/nanogpt_reference.py --data=../shared/data/tinyshakespeare/input.txt --iters=200
  # nanoGPT's quality run: 2000 iterations, then the val loss over 200 batches
  python benchmarks/nanogpt_reference.py --data=... --warmup=0 --iters=2000 --eval_batches=200
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F

# nanoGPT's shakespeare_char CPU recipe (its README): 4L/4H/128, block 64, batch 12, no dropout.
SHAKESPEARE_CHAR = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, bias=False,
                        lr=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=2000, betas=(0.9, 0.99),
                        weight_decay=0.1, grad_clip=1.0)


class LayerNorm(tnn.Module):
  """LayerNorm with an optional bias (torch's own has no bias=False before 2.1)."""

  def __init__(self, dim: int, bias: bool):
    super().__init__()
    self.weight = tnn.Parameter(torch.ones(dim))
    self.bias = tnn.Parameter(torch.zeros(dim)) if bias else None

  def forward(self, x):
    return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class SelfAttention(tnn.Module):
  def __init__(self, n_embd: int, n_head: int, bias: bool):
    super().__init__()
    self.n_head = n_head
    self.qkv = tnn.Linear(n_embd, 3 * n_embd, bias=bias)
    self.proj = tnn.Linear(n_embd, n_embd, bias=bias)

  def forward(self, x):
    b, t, c = x.shape
    q, k, v = self.qkv(x).split(c, dim=2)
    q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(tnn.Module):
  def __init__(self, n_embd: int, n_head: int, bias: bool):
    super().__init__()
    self.ln1 = LayerNorm(n_embd, bias)
    self.attn = SelfAttention(n_embd, n_head, bias)
    self.ln2 = LayerNorm(n_embd, bias)
    self.fc = tnn.Linear(n_embd, 4 * n_embd, bias=bias)
    self.proj = tnn.Linear(4 * n_embd, n_embd, bias=bias)

  def forward(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(tnn.Module):
  def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
               bias: bool = False):
    super().__init__()
    self.wte = tnn.Embedding(vocab_size, n_embd)
    self.wpe = tnn.Embedding(block_size, n_embd)
    self.blocks = tnn.ModuleList(Block(n_embd, n_head, bias) for _ in range(n_layer))
    self.ln_f = LayerNorm(n_embd, bias)
    self.lm_head = tnn.Linear(n_embd, vocab_size, bias=False)
    self.lm_head.weight = self.wte.weight  # tied
    for module in self.modules():
      if isinstance(module, (tnn.Linear, tnn.Embedding)):
        tnn.init.normal_(module.weight, 0.0, 0.02)
        if getattr(module, "bias", None) is not None:
          tnn.init.zeros_(module.bias)
    for name, p in self.named_parameters():
      if name.endswith(".proj.weight"):  # attention and MLP output projections
        tnn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

  def forward(self, idx, targets=None):
    t = idx.shape[1]
    x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
    for block in self.blocks:
      x = block(x)
    logits = self.lm_head(self.ln_f(x))
    loss = None
    if targets is not None:
      loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
    return logits, loss


def make_optimizer(model: GPT, lr: float, weight_decay: float, betas) -> torch.optim.AdamW:
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
  return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=False)


def get_lr(it: int, lr: float, min_lr: float, warmup_iters: int, lr_decay_iters: int) -> float:
  if it < warmup_iters:
    return lr * (it + 1) / (warmup_iters + 1)
  if it > lr_decay_iters:
    return min_lr
  ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
  return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def char_corpus(path: str):
  """nanoGPT's prepare.py for shakespeare_char: sorted characters as ids, first 90% train."""
  text = open(path, encoding="utf-8").read()
  chars = sorted(set(text))
  lookup = {c: i for i, c in enumerate(chars)}
  ids = np.fromiter((lookup[c] for c in text), dtype=np.uint16, count=len(text))
  n = int(0.9 * len(ids))
  return ids[:n], ids[n:], len(chars)


def get_batch(data: np.ndarray, block_size: int, batch_size: int):
  ix = torch.randint(len(data) - block_size, (batch_size,))
  x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
  y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
  return x, y


class Trainer:
  """Model + optimizer + data, advanced one nanoGPT iteration at a time."""

  def __init__(self, data_path: str, seed: int = 1337, log_interval: int = 1, **overrides):
    hp = dict(SHAKESPEARE_CHAR, **overrides)
    self.hp, self.log_interval = hp, log_interval
    torch.manual_seed(seed)
    self.train_data, self.val_data, vocab = char_corpus(data_path)
    self.model = GPT(vocab, hp["block_size"], hp["n_layer"], hp["n_head"], hp["n_embd"], hp["bias"])
    self.optimizer = make_optimizer(self.model, hp["lr"], hp["weight_decay"], hp["betas"])
    self.iter = 0
    self.batch = get_batch(self.train_data, hp["block_size"], hp["batch_size"])
    self.last_loss = float("nan")

  def step(self) -> None:
    hp = self.hp
    lr = get_lr(self.iter, hp["lr"], hp["min_lr"], hp["warmup_iters"], hp["lr_decay_iters"])
    for group in self.optimizer.param_groups:
      group["lr"] = lr
    self.model.train()
    _, loss = self.model(*self.batch)
    self.batch = get_batch(self.train_data, hp["block_size"], hp["batch_size"])  # as nanoGPT: prefetch
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), hp["grad_clip"])
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    if self.iter % self.log_interval == 0:
      self.last_loss = loss.item()
    self.iter += 1

  @torch.no_grad()
  def estimate_val_loss(self, batches: int = 20) -> float:
    self.model.eval()
    losses = [self.model(*get_batch(self.val_data, self.hp["block_size"], self.hp["batch_size"]))[1].item()
              for _ in range(batches)]
    return float(np.mean(losses))

  def num_params(self) -> int:
    return sum(p.numel() for p in self.model.parameters())


def time_iterations(trainer: Trainer, iters: int) -> float:
  """Seconds per iteration over `iters` iterations."""
  start = time.perf_counter()
  for _ in range(iters):
    trainer.step()
  return (time.perf_counter() - start) / max(iters, 1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", required=True, help="a text file (tiny Shakespeare)")
  parser.add_argument("--iters", type=int, default=200)
  parser.add_argument("--warmup", type=int, default=10)
  parser.add_argument("--eval_batches", type=int, default=0,
                      help="after training, report the val loss over this many random batches "
                      "(nanoGPT's estimate_loss uses 20)")
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
  parser.add_argument("--seed", type=int, default=1337)
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  trainer = Trainer(args.data, seed=args.seed)
  time_iterations(trainer, args.warmup)
  sec = time_iterations(trainer, args.iters)
  out = {"ms_per_iter": sec * 1e3, "tokens_per_sec": 12 * 64 / sec, "threads": torch.get_num_threads(),
         "iters": trainer.iter, "params": trainer.num_params()}
  if args.eval_batches:
    out["val_loss"] = trainer.estimate_val_loss(args.eval_batches)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
