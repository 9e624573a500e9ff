"""The Optax chain: global-norm clipping, then AdamW with a decay mask, on a warmup + decay schedule."""
from __future__ import annotations

import jax
import optax

NO_DECAY_LEAVES = ("bias", "scale")                        # norms and biases
EMBEDDING_LEAVES = ("token_embedding", "position_embedding")


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine / linear decay to lr*min_lr_ratio, or constant."""
  o = optim_config
  peak, warmup = o.lr, o.warmup_steps
  decay_steps = max((o.decay_steps or total_steps) - warmup, 1)
  end = o.lr * o.min_lr_ratio
  if o.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=o.min_lr_ratio)
  elif o.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif o.schedule == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"optim.schedule={o.schedule!r} is not one of cosine, linear, constant")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def weight_decay_mask(params, decay_embeddings: bool = False):
  """True where weight decay applies: matrices, never norms or biases; embeddings if asked."""
  def decide(path, _):
    names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
    if names[-1] in NO_DECAY_LEAVES:
      return False
    if names[-1] in EMBEDDING_LEAVES:
      return decay_embeddings
    return True
  return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(optim_config, total_steps: int):
  o = optim_config
  schedule = learning_rate_schedule(o, total_steps)
  adamw = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                      mask=lambda p: weight_decay_mask(p, o.decay_embeddings))
  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  return optax.chain(*parts, adamw), schedule
